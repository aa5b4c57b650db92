"""tools/ensemble.py: models of one recipe joined into one model file that answers with their averaged
probabilities, in PyTorch and in its ONNX copies."""

import importlib.util

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_faces, tiny_checkpoint

from ferlite import onnx_model
from ferlite.errors import UserError
from ferlite.names import EMOTIONS
from ferlite.training import checkpoints, network

spec = importlib.util.spec_from_file_location("ensemble_tool", ROOT / "tools" / "ensemble.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
CPU = torch.device("cpu")
TWO_HEADS = {"widths": [8, 8, 8, 8], "extra_heads": ["fer2013"]}


def two_head_model(path, seed):
    """An untrained two-head model file (ferplus answering, fer2013 beside it)."""
    torch.manual_seed(seed)
    model = network.build_model("EmotionNet", TWO_HEADS, 7)
    _, ckpt = tiny_checkpoint(arch_args=TWO_HEADS, heads=["ferplus", "fer2013"], state_dict=model.state_dict())
    checkpoints.atomic_save(ckpt, path)
    return path


def image_folder(root, faces, labels):
    for i, (face, y) in enumerate(zip(faces, labels)):
        (root / sorted(EMOTIONS)[y]).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / sorted(EMOTIONS)[y] / f"{i}.png"), face)
    return root


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensemble")
    members = [two_head_model(tmp / f"m{seed}.pt", seed) for seed in (0, 1)]
    faces, labels = synthetic_faces(21, seed=3)
    args = ["--data", image_folder(tmp / "train", faces, labels), "--val", image_folder(tmp / "val", faces, labels)]
    out = tmp / "models" / "joined.pt"
    tool.main(tool.parse_args([*map(str, members), "--out", str(out), *map(str, args)]))
    return members, out, args


def test_the_joined_model_answers_with_its_members_averaged(joined):
    members, out, _ = joined
    faces = synthetic_faces(14, seed=5)[0]
    ckpt = checkpoints.load_checkpoint(out)
    assert ckpt["arch"] == "Ensemble" and network.head_names(ckpt) == ["ferplus", "fer2013"]
    assert [m["file"] for m in ckpt["members"]] == ["m0.pt", "m1.pt"]
    for head in ("ferplus", "fer2013"):
        each = [
            network.predict_proba(
                network.model_from_checkpoint(checkpoints.load_checkpoint(m), CPU, head=head), faces, CPU
            )
            for m in members
        ]
        both = network.predict_proba(network.model_from_checkpoint(ckpt, CPU, head=head), faces, CPU)
        assert torch.allclose(both, (each[0] + each[1]) / 2, atol=1e-5)
        assert not torch.allclose(each[0], each[1], atol=1e-3)  # the members differ, so the average is a test
        # The ONNX copies (int8 for the first head, float for the other) answer as the .pt does.
        copy, why = onnx_model.load_copy(out, head=head)
        assert why is None and np.abs(copy.predict_proba(faces, head=head) - both.numpy()).max() < 0.05
    assert (out.parent / "joined.metrics.json").is_file() and (out.parent / "joined.confusion_counts.png").is_file()


def test_test_py_reads_the_joined_model(joined, testpy):
    _, out, _ = joined
    faces = synthetic_faces(7, seed=6)[0]
    quick = testpy.Recognizer(out, CPU, engine="int8", head="fer2013")
    slow = testpy.Recognizer(out, CPU, engine="pytorch", head="fer2013", bf16=False)
    assert np.abs(quick.classify(faces) - slow.classify(faces)).max() < 0.05


def test_joining_refuses_what_it_cannot_join(joined, tmp_path):
    members, out, args = joined
    with pytest.raises(UserError, match="joined.pt exists: pass --replace"):
        tool.main(tool.parse_args([*map(str, members), "--out", str(out), *map(str, args)]))
    with pytest.raises(UserError, match="join the models train.py wrote, not an ensemble"):
        tool.joined([members[0], out])
    one_head = tmp_path / "one.pt"
    checkpoints.atomic_save(tiny_checkpoint()[1], one_head)
    with pytest.raises(UserError, match="one.pt has class_names|one.pt has heads"):
        tool.joined([members[0], one_head])
    with pytest.raises(SystemExit):
        tool.parse_args([str(members[0]), "--out", str(tmp_path / "x.pt")])  # one model is no ensemble
