"""train.py: loading the image folders, validation split, a tiny run, resume, and what it saves."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, synthetic_faces, tiny_checkpoint, write_csv

from ferlite import errors, fer2013, images, onnx_model
from ferlite.errors import UserError
from ferlite.names import EMOTIONS
from ferlite.training import checkpoints
from ferlite.training.checkpoints import load_checkpoint
from ferlite.training.network import TEST_SHIFT


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, preparation):
    """A small prepared dataset: 84 train and 28 test images over the seven emotions."""
    tmp = tmp_path_factory.mktemp("ds")
    faces, labels = synthetic_faces(112)
    usage = ["Training"] * 84 + ["PublicTest"] * 28
    csv = write_csv(tmp / "fer.csv", faces, labels, layout="orig", usage=usage)
    preparation.main(preparation.parse_args(["--csv", str(csv), "--out", str(tmp / "face_datasets"), "--no-progress"]))
    return tmp / "face_datasets"


@pytest.fixture(autouse=True)
def no_int8_copy(request, train, monkeypatch):
    """The runs here skip the int8 export at a run's end, but for the tests marked int8 that check it."""
    if "int8" not in request.keywords:
        monkeypatch.setattr(train, "write_int8_copy", lambda *a, **k: None)


def tiny_args(train, data, out, *extra, schedule=True):
    """A two-epoch run of two batches on the CPU (a GPU machine's auto device would pick CUDA)."""
    sched = ["--epochs", "2", "--batch-size", "16", "--max-batches", "2"] if schedule else []
    return train.parse_args(
        ["--data", str(data), *(["--out", str(out)] if out else []), *sched, "--no-progress", "--device", "cpu", *extra]
    )


def copy_data(dataset, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(dataset / "Train data", dst)
    return dst


def test_load_image_folder(train, dataset):
    faces, labels, classes, skipped, paths = images.load_image_folder(dataset / "Train data", progress=False)
    assert classes == sorted(EMOTIONS) and faces.shape == (84, 48, 48) and faces.dtype == np.uint8
    assert not skipped and np.bincount(labels).tolist() == [12] * 7
    assert [Path(p).parent.name for p in paths] == [classes[t] for t in labels]


def test_bad_files_are_skipped(train, dataset, tmp_path):
    data = copy_data(dataset, tmp_path)
    (data / "happy" / "empty.jpg").write_bytes(b"")
    (data / "happy" / "notes.jpg").write_text("not an image")
    good = next((data / "sad").glob("*.jpg")).read_bytes()
    (data / "sad" / "cut.jpg").write_bytes(good[: len(good) // 2])
    faces, labels, classes, skipped, _ = images.load_image_folder(data, progress=False)
    assert len(faces) == 84 and sorted(p.split("/")[-1] for p, _ in skipped) == ["cut.jpg", "empty.jpg", "notes.jpg"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "not found"),
        ("empty", "no class folders"),
        ("unknown", "'smile' is not one of the seven"),
        ("empty_class", "'fear' has no images"),
    ],
)
def test_bad_data_folders(train, dataset, tmp_path, case, message):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "unknown":
        data = copy_data(dataset, tmp_path)
        (data / "smile").mkdir()
    elif case == "empty_class":
        data = copy_data(dataset, tmp_path)
        for f in (data / "fear").iterdir():
            f.unlink()
    with pytest.raises(UserError, match=message):
        images.load_image_folder(data, progress=False)


def test_stratified_split(train):
    labels = np.repeat(np.arange(7), 20)
    tr, va = train.stratified_split(labels, 0.1, seed=0)
    assert len(va) == 14 and np.bincount(labels[va]).tolist() == [2] * 7 and not set(tr) & set(va)
    with pytest.raises(UserError, match="too few images"):
        train.stratified_split(np.array([0, 0, 1, 1, 2]), 0.1, seed=0)


def test_augment_is_seeded_and_keeps_shape(train):
    x = torch.randn(8, 1, 48, 48)
    a = train.augment(x, torch.Generator().manual_seed(3))
    b = train.augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.int8
def test_tiny_run_writes_everything(train, dataset, tmp_path):
    out = tmp_path / "models" / "m.pt"
    res = train.main(tiny_args(train, dataset / "Train data", out))  # picks up the sibling "Test data"
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["class_names"] == sorted(EMOTIONS) and ckpt["arch"] == "EmotionNet" and ckpt["epoch"] >= 1
    assert {"state_dict", "arch_args", "input_size", "mean", "std", "metrics", "train_args"} <= set(ckpt)
    metrics = json.loads((tmp_path / "models" / "m.metrics.json").read_text())
    assert metrics["validation"]["validation_set"] == "Test data" and metrics["validation"]["n"] == 28
    assert set(metrics["validation"]["per_class"]) == set(EMOTIONS) and metrics["parameters"] > 0
    assert len(metrics["epoch_seconds"]) == 2 and "accuracy_no_tta" in metrics["validation"]
    assert metrics["validation"]["test_shift"] == TEST_SHIFT  # how the faces were scored
    assert all(0 <= h["val_acc_no_tta"] <= 1 for h in metrics["history"])
    assert metrics["train_wall_seconds"] >= sum(metrics["epoch_seconds"])
    for key in ("cm_counts", "cm_rates", "curves", "last"):
        assert res["paths"][key].stat().st_size > 0
    assert onnx_model.load_int8(out, ckpt["class_names"])[0] is not None  # test.py's int8 copy, made from this file


@pytest.mark.int8
def test_a_run_whose_int8_copy_fails_still_succeeds(train, dataset, tmp_path, monkeypatch, capsys):
    def no_onnx(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnx'")

    monkeypatch.setattr(train, "write_int8", no_onnx)
    out = tmp_path / "m.pt"
    res = train.main(tiny_args(train, dataset / "Train data", out))
    assert res["best"] is not None and out.exists() and not onnx_model.int8_path(out).exists()
    err = capsys.readouterr().err
    assert "the int8 copy of" in err and "test.py will classify with PyTorch" in err and "export_int8.py" in err


def test_holdout_when_no_validation_folder(train, dataset, tmp_path):
    data = copy_data(dataset, tmp_path)  # no "Test data" beside it
    train.main(tiny_args(train, data, tmp_path / "m.pt"))
    metrics = json.loads((tmp_path / "m.metrics.json").read_text())
    assert metrics["validation"]["validation_set"].startswith("hold-out") and metrics["validation"]["n"] == 8


def test_resume_matches_uninterrupted_run(train, dataset, tmp_path, monkeypatch):
    data = dataset / "Train data"
    train.main(tiny_args(train, data, tmp_path / "a" / "m.pt"))
    full = torch.load(tmp_path / "a" / "m.last.pt", weights_only=True)

    real = train.train_one_epoch

    def interrupted(*args, **kwargs):
        if kwargs["epoch"] == 1:  # the second epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(train, data, tmp_path / "b" / "m.pt"))
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert torch.load(tmp_path / "b" / "m.last.pt", weights_only=True)["epoch"] == 1
    # The plots are written at the end of a run, and an interrupted run is no exception.
    assert (tmp_path / "b" / "m.confusion_counts.png").stat().st_size > 0
    assert (tmp_path / "b" / "m.training_curves.png").stat().st_size > 0
    wall_at_interrupt = json.loads((tmp_path / "b" / "m.metrics.json").read_text())["train_wall_seconds"]
    train.main(tiny_args(train, data, tmp_path / "b" / "m.pt", "--resume", str(tmp_path / "b" / "m.last.pt")))
    resumed = torch.load(tmp_path / "b" / "m.last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    assert json.loads((tmp_path / "b" / "m.metrics.json").read_text())["train_wall_seconds"] > wall_at_interrupt
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_plot_failure_does_not_hide_the_first_error(train, dataset, tmp_path, monkeypatch, capsys):
    real = train.train_one_epoch

    def disk_full(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    def no_plots(*args, **kwargs):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(train, "train_one_epoch", disk_full)
    monkeypatch.setattr(train, "write_plots", no_plots)
    with pytest.raises(OSError, match="No space left"):
        train.main(tiny_args(train, dataset / "Train data", tmp_path / "m.pt"))
    assert "warning: the plots were not drawn: RuntimeError: plotting broke" in capsys.readouterr().err
    # Without an earlier error, a plotting failure is itself the error.
    monkeypatch.setattr(train, "train_one_epoch", real)
    with pytest.raises(RuntimeError, match="plotting broke"):
        train.main(tiny_args(train, dataset / "Train data", tmp_path / "n.pt"))


def test_a_failed_checkpoint_write_stops_training_with_its_error(train, dataset, tmp_path, monkeypatch):
    def disk_full(obj, path, backup=None):
        raise OSError(f"No space left on device: {path}")

    monkeypatch.setattr(train, "atomic_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train.main(tiny_args(train, dataset / "Train data", tmp_path / "m.pt"))


def test_an_existing_model_is_replaced_only_with_replace(train, dataset, tmp_path, monkeypatch):
    """A trial run never replaces a model; --replace does, keeping the old one under a name of its own, also
    when two replacing runs start in the same second (a tiny run takes less)."""
    monkeypatch.setattr(train.time, "strftime", lambda fmt, *a: "20261203-120000")
    out = tmp_path / "m.pt"
    out.write_bytes(b"the earlier model")
    (tmp_path / "m.metrics.json").write_text(json.dumps({"validation": {"accuracy": 0.697, "validation_set": "v.csv"}}))
    with pytest.raises(UserError, match=r"m.pt exists \(69.7% on v.csv\): pass --replace"):
        train.main(tiny_args(train, dataset / "Train data", out))
    assert out.read_bytes() == b"the earlier model" and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.metrics.json",
        "m.pt",
    ]
    train.main(tiny_args(train, dataset / "Train data", out, "--replace"))
    load_checkpoint(out)
    train.main(tiny_args(train, dataset / "Train data", out, "--replace"))
    backups = sorted(tmp_path.glob("m.*.bak.pt"))  # one per replacing run: a second run keeps the first backup
    assert [b.name for b in backups] == ["m.20261203-120000-2.bak.pt", "m.20261203-120000.bak.pt"]
    assert backups[1].read_bytes() == b"the earlier model" and load_checkpoint(backups[0])


def test_default_output_is_a_new_run_folder(train, dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "RUNS_DIR", tmp_path / "runs")
    for _ in range(2):
        train.main(tiny_args(train, dataset / "Train data", None))
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "Facial_Emotion_Recognizer.pt").is_file() for r in runs)
    assert "use it: python test.py --model " in capsys.readouterr().out


def test_resume_takes_the_checkpoint_schedule_or_refuses_up_front(train, dataset, tmp_path, monkeypatch):
    data = dataset / "Train data"
    out = tmp_path / "m.pt"
    real = train.train_one_epoch

    def interrupted(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"m.pt holds the best epoch so far \(1, .*--resume .*m.last.pt"):
        train.main(tiny_args(train, data, out))
    monkeypatch.setattr(train, "train_one_epoch", real)
    last = str(tmp_path / "m.last.pt")
    loaded = []
    monkeypatch.setattr(train, "load_image_folder", lambda *a, **k: loaded.append(1) / 0)
    with pytest.raises(
        UserError, match=r"started with --epochs 2 \(not 5\), --max-batches 2 \(not 20\); resume without"
    ):
        train.main(train.parse_args(["--resume", last, "--epochs", "5", "--max-batches", "20", "--device", "cpu"]))
    assert not loaded, "the clash is found before the images load"
    monkeypatch.undo()
    res = train.main(
        tiny_args(train, data, None, "--resume", last, schedule=False)
    )  # no schedule flags: the checkpoint's
    assert res["model"] == out and torch.load(last, weights_only=True)["epoch"] == 2


def test_resume_of_a_missing_checkpoint_says_what_to_pass(train, tmp_path):
    with pytest.raises(UserError, match=r"nope.last.pt not found: pass the \*.last.pt file an earlier train.py run"):
        train.resume_schedule(train.parse_args(["--resume", str(tmp_path / "nope.last.pt")]))


@pytest.mark.parametrize("flag, recorded", [("mixup", 0.2), ("photo_aug", True)])
def test_a_run_of_a_dropped_experiment_is_not_resumed(train, tmp_path, flag, recorded):
    """Mixup and --photo-aug left train.py (RESULTS.md names the commit that has them): their runs cannot go on."""
    path = tmp_path / "old.last.pt"
    checkpoints.atomic_save(tiny_checkpoint(optimizer={}, train_args={"epochs": 2, flag: recorded})[1], path)
    dashed = flag.replace("_", "-")
    with pytest.raises(UserError, match=rf"that run used --{dashed}, which train.py no longer has .*start a new run"):
        train.resume_schedule(train.parse_args(["--resume", str(path)]))
    off = tmp_path / "off.last.pt"  # the shipped model's runs recorded them off: those resume
    checkpoints.atomic_save(
        tiny_checkpoint(optimizer={}, train_args={"epochs": 2, "mixup": 0.0, "photo_aug": False})[1], off
    )
    args = train.parse_args(["--resume", str(off)])
    train.resume_schedule(args)
    assert args.epochs == 2 and not hasattr(args, flag)
    with pytest.raises(SystemExit):
        train.parse_args([f"--{dashed}"])


def test_interrupt_before_the_first_epoch_writes_nothing(train, dataset, tmp_path, monkeypatch, capsys):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", stop)
    with pytest.raises(SystemExit) as e:
        errors.run_main(train.main, tiny_args(train, dataset / "Train data", tmp_path / "new" / "m.pt"))
    assert e.value.code == 130 and "interrupted: no epoch finished, so nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_recorded_paths_are_not_the_build_machines(train, dataset, tmp_path):
    train.main(tiny_args(train, dataset / "Train data", tmp_path / "m.pt"))
    recorded = torch.load(tmp_path / "m.pt", weights_only=True)["train_args"]
    assert recorded["data"] == "Train data" and recorded["out"] == "m.pt", recorded
    shipped = [m["train_args"] for m in load_checkpoint(ROOT / "models" / "Facial_Emotion_Recognizer.pt")["members"]]
    metrics = json.loads((ROOT / "models" / "Facial_Emotion_Recognizer.metrics.json").read_text())["members"]
    for args in shipped + [m["metrics"]["train_args"] for m in metrics]:  # the ensemble's members (tools/ensemble.py)
        paths = [v for v in args.values() if isinstance(v, str) and "/" in v]
        assert not [v for v in paths if v.startswith("/") or ".." in v], args


def test_cli_errors(train, dataset, tmp_path):
    for args, needle in [
        (["--data", str(tmp_path / "nope")], "not found"),
        (["--data", str(dataset / "Train data"), "--resume", str(tmp_path / "x.pt")], "not found"),
    ]:
        r = run_in_process(train, *args, "--no-progress", "--out", tmp_path / "m.pt")
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--epochs", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--epochs must be at least 1" in r.stderr  # as its own process once


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "0", "--lr must be a positive number"),
        ("--lr", "nan", "--lr must be a positive number"),
        ("--max-batches", "-1", "--max-batches must be 0 (all) or more"),
        ("--batch-size", "0", "--batch-size must be at least 1"),
    ],
)
def test_bad_numbers(train, flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_val_sources(train, dataset, tmp_path):
    """A wrong --val is named as --val (not as the --data folder), before the training images load."""
    r = run_in_process(train, "--val", tmp_path / "val.csv.gz")
    assert r.returncode == 2 and f"--val {tmp_path / 'val.csv.gz'} not found" in r.stderr, r.stderr
    notes = tmp_path / "val.txt"
    notes.write_text("not a csv")
    with pytest.raises(SystemExit):
        train.parse_args(["--val", str(notes)])
    val = fer2013.load_labelled(dataset / "Test data", sorted(EMOTIONS), flag="--val", lacks="x", progress=False)
    assert val.faces.shape == (28, 48, 48) and np.bincount(val.labels).tolist() == [4] * 7 and len(val.paths) == 28
    with pytest.raises(UserError, match=r"^--val .*Test data has emotion 'disgust' that the training data lacks$"):
        fer2013.load_labelled(dataset / "Test data", ["anger", "happy"], flag="--val", lacks="the training data lacks")


def test_val_csv_with_usage_validates_on_publictest_only(train, tmp_path):
    """Kaggle's fer2013.csv as --val: the PublicTest rows, never Training (learned) nor PrivateTest (the final test)."""
    faces, labels = synthetic_faces(21)
    usage = ["Training"] * 7 + ["PublicTest"] * 7 + ["PrivateTest"] * 7
    faces[7:14] = 200  # the PublicTest faces, recognisable
    path = write_csv(tmp_path / "fer2013.csv", faces, labels, layout="orig", usage=usage)
    load = lambda p: fer2013.load_labelled(p, list(EMOTIONS), flag="--val", lacks="x", only=fer2013.VALIDATION)  # noqa: E731
    val = load(path)
    assert len(val.faces) == 7 and (val.faces == 200).all() and val.labels.tolist() == labels[7:14].tolist()
    assert val.note == "rows by Usage: PublicTest 7; 14 other rows left out" and val.paths is None
    only_training = write_csv(tmp_path / "t.csv", faces, labels, layout="orig", usage=["Training"] * 21)
    with pytest.raises(UserError, match="every row is marked Training"):
        load(only_training)
