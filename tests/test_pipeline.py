"""The user's day end to end on a synthetic CSV, and the shipped model on FER2013's PublicTest split."""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, synthetic_faces, write_csv

from ferlite.training.checkpoints import load_checkpoint
from ferlite.training.network import head_names

MODEL = ROOT / "models" / "Facial_Emotion_Recognizer.pt"


def shipped_metrics():
    """The metrics JSON beside the shipped model (tools/ensemble.py's: the ensemble's, and its members')."""
    return json.loads(MODEL.with_name("Facial_Emotion_Recognizer.metrics.json").read_text())


def member_metrics():
    """The metrics JSON train.py wrote for each of the shipped model's members, in the order they were joined."""
    return [m["metrics"] for m in shipped_metrics()["members"]]


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


FER2013 = SHARED / "fer2013" / "fer2013.csv.gz"  # Kaggle's file, Training and PublicTest rows
FERPLUS = SHARED / "fer2013" / "fer2013new.csv"  # FER+'s votes for the same rows
# The results tables' rows for the shipped model's heads, the answering one first (network.head_names).
HEAD_ROWS = {
    "ferplus": "| **ours**, `models/Facial_Emotion_Recognizer.pt`, FER+ head",
    "fer2013": "| **ours**, `models/Facial_Emotion_Recognizer.pt`, FER2013 head",
}


def table_row(document, start):
    return next((line for line in (ROOT / document).read_text().splitlines() if line.startswith(start)), "")


def row_figures(row):
    """The figures of a results row after its first cell: '70.1%' and '0.683' alike, in order."""
    return re.findall(r"\d+\.\d+%?", row.split("|", 2)[2])


@pytest.fixture(scope="module")
def shipped_scores(tmp_path_factory):
    """test.py --eval of the shipped model on FER2013's PublicTest rows with FER+'s votes, each head, run once."""
    if not FER2013.exists() or not FERPLUS.exists():
        pytest.skip(
            "FER2013's fer2013.csv.gz and FER+'s fer2013new.csv are not at ../shared/data/fer2013 (present in CI, "
            "not on a user's machine)"
        )
    tmp, scores = tmp_path_factory.mktemp("scores"), {}
    for head in head_names(load_checkpoint(MODEL)):
        out = tmp / head
        run("test.py", "--eval", FER2013, "--ferplus", FERPLUS, "--head", head, "--json", out / "s.json", "--out", out,
            cwd=tmp)  # fmt: skip
        scores[head] = json.loads((out / "s.json").read_text())
    return scores


@pytest.mark.parametrize("document", ["README.md", "RESULTS.md"])
def test_results_tables_state_what_the_shipped_model_scores(shipped_scores, document):
    """Each answer's row: FER2013's labels (accuracy, macro-F1), then FER+'s majority faces, as test.py --eval finds."""
    assert list(HEAD_ROWS) == list(shipped_scores), list(shipped_scores)
    for head, scored in shipped_scores.items():
        assert scored["n"] == 3583 and scored["ferplus"]["faces"] == 2854
        want = [f"{scored['accuracy']:.1%}", f"{scored['macro_f1']:.3f}"]
        want += [f"{scored['ferplus']['accuracy']:.1%}", f"{scored['ferplus']['macro_f1']:.3f}"]
        row = table_row(document, HEAD_ROWS[head])
        assert row_figures(row)[:4] == want, (row, want)


def test_the_recorded_validation_is_the_one_train_py_chose_by():
    """Each member's metrics JSON: its validation figures are the answering head's on Test data (FER+'s folders) at
    the epoch it was chosen by; the ensemble's are on the same faces."""
    ensemble = shipped_metrics()
    assert ensemble["arch"] == load_checkpoint(MODEL)["arch"] == "Ensemble"
    assert ensemble["validation"]["validation_set"] == "Test data" and ensemble["validation"]["n"] == 3529
    for metrics in member_metrics():
        v = metrics["validation"]
        assert v["validation_set"] == "Test data" and v["n"] == 3529
        assert metrics["heads"] == load_checkpoint(MODEL)["heads"] == ["ferplus", "fer2013"]
        best = next(h for h in metrics["history"] if h["epoch"] == metrics["best_epoch"])
        assert best["val_acc"] == v["accuracy"]
        assert f"{metrics['train_args']['epochs']} epochs" in table_row("README.md", HEAD_ROWS[metrics["heads"][0]])


def test_train_defaults_reproduce_the_shipped_model(train):
    """`python train.py --seed K` with nothing else is the recipe of the shipped model's K-th member (0, 1, ...)."""
    defaults = vars(train.parse_args([]))
    for seed, metrics in enumerate(member_metrics()):
        flags = ("epochs", "batch_size", "lr", "bf16")
        assert {k: metrics["train_args"][k] for k in flags} == {k: defaults[k] for k in flags}
        assert metrics["train_args"]["seed"] == seed and not metrics["train_args"].get("teacher")
        assert not any(metrics["train_args"].get(k) for k in train.DROPPED_FLAGS), "trained with a dropped experiment"
        # The recipe's constants: in the metrics JSON's "recipe" (older models: among its train_args).
        recorded = {**metrics["train_args"], **metrics.get("recipe", {})}
        for k in ("weight_decay", "label_smoothing", "ema_decay"):
            assert recorded[k] == train.RECIPE[k], k
        arch_args = {**train.DEFAULT_ARCH_ARGS, "extra_heads": list(train.HEADS[1:])}  # trained on FER+'s votes
        assert (metrics["arch"], metrics["arch_args"]) == (train.DEFAULT_ARCH, arch_args)
        for k in ("class_weight_power", "tone"):
            assert metrics["recipe"][k] == train.RECIPE[k], k
        assert metrics["train_args"]["max_batches"] == 0, "the shipped model came from a shortened run"
