"""The user's day end to end on a synthetic CSV, and the shipped model on FER2013's validation split."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, synthetic_faces, write_csv

MODEL = ROOT / "models" / "Facial_Emotion_Recognizer.pt"


def shipped_metrics():
    """The metrics JSON train.py wrote beside the shipped model."""
    return json.loads(MODEL.with_name("Facial_Emotion_Recognizer.metrics.json").read_text())


def run(script, *args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_prepare_train_test(tmp_path):
    faces, labels = synthetic_faces(140)
    csv = write_csv(tmp_path / "train.csv", faces, labels)
    ds = tmp_path / "face_datasets"
    out = run("preparation.py", "--csv", csv, "--out", ds, "--no-progress", cwd=tmp_path)
    assert "wrote 140 images" in out
    model = tmp_path / "models" / "m.pt"
    out = run(
        "train.py",
        "--data",
        ds / "Train data",
        "--out",
        model,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--no-progress",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert "epoch   1/1" in out and model.exists()
    out = run(
        "test.py", ROOT / "samples" / "grace_hopper.jpg", "--model", model, "--out", tmp_path / "outputs", cwd=tmp_path
    )
    assert "face 1 at" in out and (tmp_path / "outputs" / "grace_hopper_emotions.jpg").exists()
    out = run(
        "test.py",
        "--eval",
        csv,
        "--model",
        model,
        "--json",
        tmp_path / "e.json",
        "--out",
        tmp_path / "outputs",
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 140


@pytest.mark.skipif(
    not (SHARED / "fer2013" / "val.csv.gz").exists(),
    reason="FER2013's val.csv.gz is not at ../shared/data/fer2013 (present in CI, not on a user's machine)",
)
def test_shipped_model_scores_what_it_records(tmp_path):
    metrics = shipped_metrics()["validation"]
    assert metrics["validation_set"] == "val.csv.gz"
    run(
        "test.py",
        "--eval",
        SHARED / "fer2013" / "val.csv.gz",
        "--json",
        tmp_path / "v.json",
        "--out",
        tmp_path,
        cwd=tmp_path,
    )
    scored = json.loads((tmp_path / "v.json").read_text())
    assert scored["n"] == metrics["n"] == 3589
    assert abs(scored["accuracy"] - metrics["accuracy"]) <= 0.001, (scored["accuracy"], metrics["accuracy"])
    assert scored["accuracy"] >= 0.65


@pytest.mark.parametrize("document", ["README.md", "RESULTS.md"])
def test_results_tables_state_the_recorded_accuracy(document):
    """The README's and RESULTS.md's tables quote the shipped model's metrics JSON, not an older model's."""
    metrics = shipped_metrics()
    v = metrics["validation"]
    row = next(
        (
            line
            for line in (ROOT / document).read_text().splitlines()
            if line.startswith("| **ours**, `models/Facial_Emotion_Recognizer.pt`")
        ),
        "",
    )
    assert f"**{v['accuracy']:.1%}**" in row and f"({v['accuracy_no_tta']:.1%} without the mirror image)" in row, row
    assert f"| {v['macro_f1']:.3f} |" in row and f"{metrics['train_args']['epochs']} epochs" in row, row


def test_train_defaults_reproduce_the_shipped_model(train):
    """`python train.py --val ...` with nothing else is the recipe of the shipped model (its metrics JSON)."""
    metrics = shipped_metrics()
    defaults = vars(train.parse_args([]))
    flags = ("epochs", "batch_size", "lr", "mixup", "seed", "bf16", "photo_aug")
    assert {k: metrics["train_args"].get(k, False) for k in flags} == {k: defaults[k] for k in flags}
    # The recipe's constants: in the metrics JSON's "recipe" (older models: among its train_args).
    recorded = {**metrics["train_args"], **metrics.get("recipe", {})}
    for k in ("weight_decay", "label_smoothing", "ema_decay"):
        assert recorded[k] == train.RECIPE[k], k
    assert (metrics["arch"], metrics["arch_args"]) == (train.DEFAULT_ARCH, train.DEFAULT_ARCH_ARGS)
    assert metrics["train_args"]["max_batches"] == 0, "the shipped model came from a shortened run"
