"""train.py under torchrun: two CPU processes (gloo) write one checkpoint whose metrics a single process confirms."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, synthetic_faces, write_csv

from ferlite.images import load_image_folder
from ferlite.scoring import confusion_matrix, metrics_from_confusion
from ferlite.training.checkpoints import load_checkpoint
from ferlite.training.network import model_from_checkpoint, predict_proba

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed"
)


def torchrun(*args, nproc=2, script=ROOT / "train.py"):
    """train.py under torchrun on CPU processes: on a GPU machine, --device auto would pick CUDA, one GPU each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *map(str, args),
        "--device",
        "cpu",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory, preparation):
    tmp = tmp_path_factory.mktemp("ddp")
    faces, labels = synthetic_faces(140, seed=3)
    usage = ["Training"] * 112 + ["PublicTest"] * 28
    csv = write_csv(tmp / "fer.csv", faces, labels, layout="orig", usage=usage)
    preparation.main(preparation.parse_args(["--csv", str(csv), "--out", str(tmp / "fd"), "--no-progress"]))
    return tmp / "fd"


def run_two(data, out):
    return torchrun(
        "--data",
        data / "Train data",
        "--out",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
        "--seed",
        "5",
    )


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory):
    """The two-process job every test here compares against, run once: (model file, torchrun's result)."""
    out = tmp_path_factory.mktemp("two") / "m" / "ddp.pt"
    return out, run_two(data, out)


def test_two_processes_write_one_checkpoint_that_a_single_process_confirms(data, two_process_run):
    out, r = two_process_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch   2/2") == 1, "logs come from rank 0 only"
    assert "2 processes (torchrun)" in r.stdout
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == [
        "ddp.confusion_counts.png",
        "ddp.confusion_normalized.png",
        "ddp.int8.onnx",
        "ddp.last.pt",
        "ddp.metrics.json",
        "ddp.pt",
        "ddp.training_curves.png",
    ]
    ck = load_checkpoint(out)
    model = model_from_checkpoint(ck, torch.device("cpu"))
    metrics = json.loads(out.with_name("ddp.metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["validation"]["n"] == 28
    # The same weights scored in one process, on the same validation folder, give the recorded figures.
    faces, labels, classes, _, _ = load_image_folder(data / "Test data", progress=False)
    assert classes == ck["class_names"]
    pred = predict_proba(model, faces, torch.device("cpu"), tta=True).argmax(1).numpy()
    single = metrics_from_confusion(confusion_matrix(labels, pred, 7), classes)
    assert abs(single["accuracy"] - ck["metrics"]["accuracy"]) <= 1 / 28 + 1e-9
    assert abs(single["accuracy"] - metrics["validation"]["accuracy"]) <= 1 / 28 + 1e-9


def test_same_seed_same_processes_same_weights(data, tmp_path, two_process_run):
    a, first = two_process_run
    b = tmp_path / "b" / "ddp.pt"
    r = run_two(data, b)
    assert first.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    sa, sb = (load_checkpoint(p.with_name("ddp.last.pt"))["state_dict"] for p in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


INTERRUPT_AFTER_FIRST_EPOCH = """
import sys
sys.path.insert(0, {root!r})
import train
from ferlite.errors import run_main

real = train.train_one_epoch
def once(*args, **kwargs):
    if kwargs["epoch"] == 1:  # the second epoch: stop as Ctrl-C would, after epoch 1's checkpoint
        raise KeyboardInterrupt
    return real(*args, **kwargs)
train.train_one_epoch = once
run_main(train.main, train.parse_args(sys.argv[1:]))
"""


def test_resume_under_torchrun_matches_uninterrupted_run(data, tmp_path, two_process_run):
    script = tmp_path / "interrupted_train.py"
    script.write_text(INTERRUPT_AFTER_FIRST_EPOCH.format(root=str(ROOT)))
    args = ["--data", data / "Train data", "--epochs", "2", "--batch-size", "8", "--no-progress", "--seed", "5"]
    whole, first = two_process_run
    assert first.returncode == 0
    cut = tmp_path / "cut" / "m.pt"
    r = torchrun(*args, "--out", cut, script=script)
    assert r.returncode != 0 and load_checkpoint(cut.with_name("m.last.pt"))["epoch"] == 1, r.stderr[-2000:]
    r = torchrun(*args, "--out", cut, "--resume", cut.with_name("m.last.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(whole.with_name("ddp.last.pt")), load_checkpoint(cut.with_name("m.last.pt"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
