"""Every figure is scored in float32, so one model gives one figure on every CPU (bfloat16 kernels round
differently on AMX, AVX-512 BF16 and GPUs); bfloat16 stays for training steps and for photos with PyTorch.

The checks record what precision each forward call asked network.autocast_for for, so they fail on code that
scores in bfloat16 whether or not this machine has bfloat16 kernels."""

import numpy as np
import pytest
import torch
from conftest import synthetic_faces, write_csv

from ferlite.training import network

CPU = torch.device("cpu")


@pytest.fixture
def asked(monkeypatch):
    """The `enabled` argument of every network.autocast_for call (True: bfloat16 where the CPU has it)."""
    calls, real = [], network.autocast_for
    monkeypatch.setattr(
        network, "autocast_for", lambda device, enabled=True: calls.append(enabled) or real(device, False)
    )
    return calls


def test_predict_proba_is_float32_unless_asked(asked):
    torch.manual_seed(0)
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7).eval()
    faces = synthetic_faces(5)[0]
    network.predict_proba(model, faces, CPU)
    network.predict_both(model, faces, CPU)
    assert asked and not any(asked)
    network.predict_proba(model, faces, CPU, bf16=True)
    assert asked[-1] is True


def test_eval_scores_in_float32_and_photos_may_use_bfloat16(asked, testpy, tiny_model, tmp_path):
    csv = write_csv(tmp_path / "f.csv", *synthetic_faces(14))
    testpy.main(testpy.parse_args(["--eval", str(csv), "--model", str(tiny_model), "--out", str(tmp_path / "e")]))
    assert asked and not any(asked), "--eval must score in float32"
    asked.clear()
    rec = testpy.Recognizer(tiny_model, CPU, engine="pytorch")
    rec.classify(synthetic_faces(3)[0])
    assert asked == [True], "photos classified with PyTorch keep bfloat16 where the CPU has it"


def test_train_validation_scores_in_float32(asked, train):
    torch.manual_seed(0)
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7)
    faces, labels = synthetic_faces(21)
    data = train.Data(faces, labels, list(range(7)), faces, labels, "synthetic", [])
    tta, plain = train.evaluate(model, data, labels, CPU)
    assert 0 <= tta["accuracy"] <= 1 and 0 <= plain["accuracy"] <= 1
    assert asked and not any(asked), "validation (best epoch, metrics JSON) must score in float32"


def test_the_same_faces_give_the_same_float32_scores_twice():
    """Nothing in the scoring path depends on state left from an earlier call (a figure must repeat exactly)."""
    torch.manual_seed(0)
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7).eval()
    faces = synthetic_faces(70)[0]
    a, b = network.predict_proba(model, faces, CPU), network.predict_proba(model, faces, CPU)
    assert np.array_equal(a.numpy(), b.numpy())
