"""The int8 copy of a model: used only while made from the model file loaded, and answering as PyTorch does."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED, run_cli, synthetic_faces, tiny_checkpoint, write_csv

from ferlite import images, onnx_model
from ferlite.errors import UserError
from ferlite.fer2013 import held_out_rows, read_csv
from ferlite.names import EMOTIONS
from ferlite.training import checkpoints, export, network
from ferlite.training.checkpoints import load_checkpoint

SHIPPED = ROOT / "models" / "Facial_Emotion_Recognizer.pt"
FER2013 = SHARED / "fer2013" / "fer2013.csv.gz"  # Kaggle's file; its PublicTest rows are scored
CPU = torch.device("cpu")
# How far the int8 copy may stray from PyTorch's answers (both average each face with its mirror image).
SAME_ANSWER = 0.985  # share of faces with the same emotion at least
MAX_PROB_DIFF = 0.08  # largest difference in any probability


@pytest.fixture
def model_with_copy(tmp_path):
    """A tiny model file with an int8 copy beside it, calibrated on synthetic faces."""
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    checkpoints.atomic_save(tiny_checkpoint()[1], path)
    export.write_int8(path, synthetic_faces(70)[0])
    return path


def test_the_copy_is_written_beside_the_model_and_names_it(model_with_copy):
    copy = onnx_model.int8_path(model_with_copy)
    assert copy == model_with_copy.with_name("m.int8.onnx") and copy.is_file()
    meta = onnx_model.Int8Model(copy).meta
    assert meta["source_sha256"] == onnx_model.file_sha256(model_with_copy)
    assert json.loads(meta["class_names"]) == sorted(EMOTIONS) and meta["source"] == "m.pt"
    assert not list(model_with_copy.parent.glob(".int8-*"))  # no scratch left behind
    assert not onnx_model.float_path(copy).exists()  # one head: the int8 copy answers for it, no float copy


def test_photos_use_the_copy_and_eval_uses_pytorch(model_with_copy, testpy):
    faces = synthetic_faces(14, seed=1)[0]
    rec = testpy.Recognizer(model_with_copy, CPU)
    assert rec.int8 is not None
    assert np.array_equal(rec.classify(faces), rec.int8.predict_proba(faces))
    pt = testpy.Recognizer(model_with_copy, CPU, engine="pytorch")
    assert pt.int8 is None
    expected = network.predict_proba(pt.model, faces, CPU, pt.mean, pt.std, bf16=True).numpy()  # photos: bf16
    assert np.array_equal(pt.classify(faces), expected)
    # --eval keeps PyTorch unless --engine int8 is asked for, so the scores it reports are the model's own.
    csv = write_csv(model_with_copy.parent / "f.csv", *synthetic_faces(14))
    seen = []
    real = testpy.Recognizer.load_engine
    testpy.Recognizer.load_engine = lambda self, engine, threads=None, head=None: (
        seen.append(engine) or real(self, engine, threads, head)
    )
    try:
        for extra in ([], ["--engine", "int8"]):
            out = model_with_copy.parent / f"out{len(seen)}"
            argv = ["--eval", str(csv), "--model", str(model_with_copy), "--out", str(out), *extra]
            testpy.main(testpy.parse_args(argv))
    finally:
        testpy.Recognizer.load_engine = real
    assert seen == ["pytorch", "int8"]


def test_a_stale_copy_is_never_used(model_with_copy, testpy, capsys):
    torch.manual_seed(1)
    checkpoints.atomic_save(tiny_checkpoint()[1], model_with_copy)  # the model retrained; its copy not rewritten
    rec = testpy.Recognizer(model_with_copy, CPU)
    assert rec.int8 is None
    err = capsys.readouterr().err
    assert "made from another version of m.pt" in err and "tools/export_int8.py --model" in err
    with pytest.raises(UserError, match="--engine int8: .*made from another version.*export_int8.py"):
        testpy.Recognizer(model_with_copy, CPU, engine="int8")
    faces = synthetic_faces(7)[0]
    expected = network.predict_proba(rec.model, faces, CPU, rec.mean, rec.std, bf16=True).numpy()  # photos: bf16
    assert np.array_equal(rec.classify(faces), expected)


def test_a_copy_for_other_classes_or_damaged_is_not_used(model_with_copy, testpy, capsys):
    ckpt = load_checkpoint(model_with_copy)
    ckpt["class_names"] = ["a", "b", "c", "d", "e", "f", "g"]
    checkpoints.atomic_save(ckpt, model_with_copy)
    export.write_int8(model_with_copy, synthetic_faces(14)[0])
    ckpt["class_names"] = sorted(EMOTIONS)
    checkpoints.atomic_save(ckpt, model_with_copy)
    assert onnx_model.load_int8(model_with_copy, sorted(EMOTIONS))[0] is None  # the hash differs anyway
    onnx_model.int8_path(model_with_copy).write_bytes(b"not onnx")
    int8, why = onnx_model.load_int8(model_with_copy, sorted(EMOTIONS))
    assert int8 is None and "could not be read" in why
    assert testpy.Recognizer(model_with_copy, CPU).int8 is None
    assert "could not be read" in capsys.readouterr().err


def test_no_copy_means_pytorch_without_a_word(tiny_model, testpy, capsys):
    rec = testpy.Recognizer(tiny_model, CPU)
    assert rec.int8 is None and capsys.readouterr().err == ""
    r = run_cli("samples/grace_hopper.jpg", "--model", tiny_model, "--engine", "int8", "--out", tiny_model.parent)
    assert r.returncode == 1 and "--engine int8:" in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_export_tool_writes_a_fresh_copy(model_with_copy, tmp_path, preparation):
    faces, labels = synthetic_faces(35)
    csv = write_csv(tmp_path / "f.csv", faces, labels)
    preparation.main(preparation.parse_args(["--csv", str(csv), "--out", str(tmp_path / "fd"), "--no-progress"]))
    torch.manual_seed(2)
    checkpoints.atomic_save(tiny_checkpoint()[1], model_with_copy)  # now stale
    spec = importlib.util.spec_from_file_location("export_int8", ROOT / "tools" / "export_int8.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tool.parse_args(["--model", str(model_with_copy), "--data", str(tmp_path / "fd" / "Train data")]))
    assert onnx_model.load_int8(model_with_copy, sorted(EMOTIONS))[0] is not None


def test_the_shipped_copy_was_made_from_the_shipped_model():
    ckpt = load_checkpoint(SHIPPED)
    int8, why = onnx_model.load_int8(SHIPPED, ckpt["class_names"])
    assert int8 is not None, f"{why}: run python tools/export_int8.py"


def test_the_shipped_copy_answers_as_pytorch_on_the_sample_photo(testpy):
    photo = images.read_image(ROOT / "samples" / "grace_hopper.jpg")
    fast, slow = testpy.Recognizer(SHIPPED, CPU), testpy.Recognizer(SHIPPED, CPU, engine="pytorch")
    a, b = fast.faces_in(photo), slow.faces_in(photo)
    assert fast.int8 is not None and len(a) == len(b) == 1
    assert a[0]["emotion"] == b[0]["emotion"]
    diff = max(abs(a[0]["probabilities"][c] - b[0]["probabilities"][c]) for c in fast.classes)
    assert diff <= MAX_PROB_DIFF


@pytest.mark.skipif(not FER2013.exists(), reason="../shared/data/fer2013 is absent (in CI, not on a user's machine)")
def test_the_shipped_copy_answers_as_pytorch_on_publictest():
    ckpt = load_checkpoint(SHIPPED)
    mean, std = ckpt["mean"], ckpt["std"]
    faces, ids, usage, _ = read_csv(FER2013, progress=False)
    rows, _ = held_out_rows(FER2013, usage)
    faces, ids = faces[rows], ids[rows]
    labels = np.array([ckpt["class_names"].index(EMOTIONS[i]) for i in ids])
    ref = network.predict_proba(network.model_from_checkpoint(ckpt, CPU), faces, CPU, mean, std).numpy()
    int8 = onnx_model.load_int8(SHIPPED, ckpt["class_names"], threads=torch.get_num_threads())[0]
    p = int8.predict_proba(faces)
    assert (p.argmax(1) == ref.argmax(1)).mean() >= SAME_ANSWER
    assert np.abs(p - ref).max() <= MAX_PROB_DIFF
    assert abs((p.argmax(1) == labels).mean() - (ref.argmax(1) == labels).mean()) <= 0.005  # 18 of 3,583 faces
