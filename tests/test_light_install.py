"""The light install: photos, folders, video, --head fer2013, --detector haar and --skip-done run where `import torch`
raises (README's first command installs no PyTorch), and the Python API answers as test.py does."""

import ast
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT, SHARED, synthetic_faces, write_csv

from ferlite.recognizer import Recognizer

SAMPLE = ROOT / "samples" / "grace_hopper.jpg"
FACES_DEV = SHARED / "faces_dev"
# A Python where PyTorch cannot be imported, as in the light install: `import torch` raises ImportError.
NO_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
RUN_TEST_PY = (
    NO_TORCH + "import runpy; sys.argv = ['test.py', *sys.argv[1:]]; runpy.run_path('test.py', run_name='__main__')"
)
RUNTIME = sorted(p for p in (ROOT / "ferlite").glob("*.py"))  # the package's top level; ferlite/training/ is not


def without_torch(*args, code=RUN_TEST_PY):
    """`python test.py ARGS` (or `code`) in a subprocess where PyTorch cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_without_torch_means_without_torch():
    r = without_torch(code=NO_TORCH + "import torch")
    assert r.returncode == 1 and "import of torch halted" in r.stderr


def test_no_runtime_module_imports_torch():
    """Each module of ferlite's top level imports no torch, torchvision or ferlite.training, at the top or inside a
    function; and all of them import where PyTorch cannot."""
    for path in RUNTIME:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("torch", "torchvision") or n.startswith("ferlite.training")]
            assert not bad, f"{path.name}:{node.lineno} imports {bad[0]}"
    modules = ", ".join(f"ferlite.{p.stem}" for p in RUNTIME if p.stem != "__init__")
    r = without_torch(code=NO_TORCH + f"import {modules}; from ferlite import Recognizer; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_photo_and_the_api_agree_without_torch(tmp_path):
    r = without_torch(SAMPLE, "--out", tmp_path, "--json", tmp_path / "faces.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "grace_hopper_emotions.jpg").is_file()
    (face,) = json.loads((tmp_path / "faces.json").read_text())
    (api,) = Recognizer().analyze(SAMPLE)  # the same ONNX file, in this process
    assert face["box"] == api["box"] and face["emotion"] == api["emotion"]
    assert max(abs(face["probabilities"][c] - p) for c, p in api["probabilities"].items()) < 1e-6


def test_the_api_takes_a_path_an_array_or_a_pil_image():
    from PIL import Image

    rec = Recognizer()
    by_path = rec.analyze(str(SAMPLE))
    bgr = cv2.imread(str(SAMPLE))
    assert rec.analyze(bgr) == by_path
    assert rec.analyze(Image.open(SAMPLE)) == by_path
    assert set(by_path[0]) == {"box", "emotion", "confidence", "probabilities"}
    assert by_path[0]["emotion"] in rec.classes and abs(sum(by_path[0]["probabilities"].values()) - 1) < 1e-4
    assert rec.analyze(np.zeros((200, 300, 3), np.uint8)) == []  # no face: an empty list


def test_a_folder_both_heads_haar_and_skip_done_without_torch(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (photos / name).write_bytes(SAMPLE.read_bytes())
    out = tmp_path / "out"
    runs = {}
    for extra in ([], ["--head", "fer2013"], ["--detector", "haar"]):
        r = without_torch(photos, "--out", out, "--json", tmp_path / "f.json", *extra)
        assert r.returncode == 0, (extra, r.stderr[-2000:])
        assert "PyTorch classifies" not in r.stderr  # the int8 copy answered, every head
        runs[" ".join(extra)] = json.loads((tmp_path / "f.json").read_text())
    assert len(runs[""]) == 2 and runs[""][0]["probabilities"] == runs[""][1]["probabilities"]
    assert runs["--head fer2013"][0]["probabilities"] != runs[""][0]["probabilities"]  # the other head answered
    (out / "a_emotions.jpg").unlink()
    r = without_torch(photos, "--out", out, "--skip-done")  # both recorded as done: nothing is redone
    assert r.returncode == 0 and not (out / "a_emotions.jpg").exists(), r.stderr[-2000:]


def test_a_video_without_torch(tmp_path):
    clip, size = tmp_path / "clip.mp4", (320, 240)
    frame = cv2.resize(cv2.imread(str(SAMPLE)), size)
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for _ in range(6):
        writer.write(frame)
    writer.release()
    r = without_torch("--video", clip, "--out", tmp_path / "out", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "clip_emotions.mp4").is_file() and (tmp_path / "out" / "clip_frames.csv").is_file()
    record = json.loads((tmp_path / "v.json").read_text())
    assert len(record["frames"]) == 6 and len(record["faces"]) == 1  # one face, followed through six frames
    # the API's generator: the same tracking and smoothing
    api = [faces for _, faces in Recognizer(detect_size=640).video(clip)]
    assert [f["emotion"] for (f,) in api] == [r["emotion"] for r in record["frames"]]
    assert all(abs(f["confidence"] - r["confidence"]) < 1e-6 for (f,), r in zip(api, record["frames"]))


def test_what_needs_pytorch_says_which_install_brings_it(tmp_path):
    r = without_torch(SAMPLE, "--out", tmp_path, "--engine", "pytorch")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --engine pytorch needs PyTorch, which this install lacks: pip install -r requirements-full.txt"
    ]
    csv = write_csv(tmp_path / "faces.csv", *synthetic_faces(21))
    r = without_torch("--eval", csv, "--out", tmp_path / "eval", "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PyTorch is not installed, so --eval scores the ONNX copy" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["n"] == 21


@pytest.mark.skipif(
    not FACES_DEV.is_dir(), reason="../shared/data/faces_dev is absent (present in CI, not on a user's machine)"
)
def test_the_api_answers_as_test_py_on_the_dev_photos(tmp_path):
    r = without_torch(FACES_DEV, "--out", tmp_path / "out", "--json", tmp_path / "faces.json")
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / "faces.json").read_text())
    rec, n = Recognizer(), 0
    for photo in sorted(FACES_DEV.glob("*.jpg")):
        mine = [f for f in records if f["file"] == str(photo) and f["box"] is not None]
        theirs = rec.analyze(photo)
        assert [f["box"] for f in mine] == [f["box"] for f in theirs], photo.name
        for a, b in zip(mine, theirs):
            assert a["emotion"] == b["emotion"]
            assert max(abs(a["probabilities"][c] - p) for c, p in b["probabilities"].items()) < 1e-6
        n += len(mine)
    assert n >= 40  # faces_dev's photos hold 42 faces


def test_preparation_runs_and_train_py_says_what_to_install_without_torch(tmp_path):
    csv = write_csv(tmp_path / "fer2013.csv", *synthetic_faces(28))
    code = NO_TORCH + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    out = tmp_path / "faces"
    r = without_torch(ROOT / "preparation.py", "--csv", csv, "--out", out, code=code)
    assert r.returncode == 0 and (out / "Train data").is_dir(), r.stderr[-2000:]
    r = without_torch(ROOT / "train.py", "--data", out / "Train data", code=code)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: train.py trains with PyTorch, which this install lacks: pip install -r requirements-full.txt"
    ]


def test_the_api_names_what_is_wrong(tmp_path):
    from ferlite.errors import ImageReadError, UserError

    with pytest.raises(UserError, match="head 'smile': model file .* has ferplus and fer2013 only"):
        Recognizer(head="smile")
    with pytest.raises(UserError, match="model file nope.pt not found"):
        Recognizer("nope.pt")
    rec = Recognizer(head="fer2013")
    assert rec.head == "fer2013" and len(rec.analyze(SAMPLE)) == 1
    with pytest.raises(ImageReadError, match="missing.jpg: not found"):
        rec.analyze(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="must be 8-bit"):
        rec.analyze(np.zeros((50, 50)))
