"""FER+ votes: common's readers and labels, preparation.py --ferplus, a two-head train.py run, test.py --ferplus."""

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_in_process, synthetic_faces, write_csv

from ferlite import fer2013, images, onnx_model
from ferlite.errors import UserError
from ferlite.fer2013 import FERPLUS_COLUMNS
from ferlite.names import EMOTIONS
from ferlite.recognizer import Recognizer
from ferlite.training import export

HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
COLUMN_OF = {"anger": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness", "sad": "sadness",
             "surprise": "surprise", "neutral": "neutral"}  # fmt: skip
# Per block of seven faces (one of each label), how the ten people voted.
KINDS = ("agree", "disagree", "tie", "tie_without_label", "nf", "unknown", "contempt")
LEFT_OUT = ("nf", "unknown", "contempt")


def col(emotion_id):
    return FERPLUS_COLUMNS.index(COLUMN_OF[EMOTIONS[emotion_id]])


def kinds_for(n):
    return [KINDS[(i // 7) % len(KINDS)] for i in range(n)]


def votes_for(labels, kinds):
    """(N, 10) votes in FER+'s column order, for FER2013 labels and a kind of vote per face."""
    votes = np.zeros((len(labels), 10), dtype=np.int64)
    for v, y, kind in zip(votes, labels, kinds):
        o1, o2, o3 = (y + 1) % 7, (y + 2) % 7, (y + 3) % 7
        cells = {
            "agree": [(y, 8), (o1, 2)],
            "disagree": [(o1, 6), (y, 4)],
            "tie": [(y, 5), (o2, 5)],
            "tie_without_label": [(o1, 4), (o3, 4), (y, 2)],
            "nf": [("NF", 6), (y, 4)],
            "unknown": [("unknown", 5), (y, 3), (o1, 2)],
            "contempt": [("contempt", 7), ("NF", 3)],  # not one vote for our seven
        }[kind]
        for who, count in cells:
            v[FERPLUS_COLUMNS.index(who) if isinstance(who, str) else col(who)] += count
    return votes


def expected_plurality(y, kind):
    o1, o3 = (y + 1) % 7, (y + 3) % 7
    return {"agree": y, "disagree": o1, "tie": y, "tie_without_label": min(o1, o3, key=col)}.get(kind, -1)


def expected_majority(y, kind):
    return {"agree": y, "disagree": (y + 1) % 7}.get(kind, -1)


def write_ferplus(path, votes, usage):
    rows = [HEADER] + [f"{u},fer{i:07d}.png,{','.join(map(str, v))}" for i, (u, v) in enumerate(zip(usage, votes))]
    Path(path).write_text("\n".join(rows) + "\n")
    return Path(path)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """98 faces in FER2013's layout (21 PublicTest, 70 Training, 7 PrivateTest) and FER+'s votes for them."""
    tmp = tmp_path_factory.mktemp("ferplus")
    faces, labels = synthetic_faces(98)
    usage = ["PublicTest"] * 21 + ["Training"] * 70 + ["PrivateTest"] * 7  # the PrivateTest votes: contempt and NF
    kinds = kinds_for(98)
    votes = votes_for(labels, kinds)
    fer_csv = write_csv(tmp / "fer2013.csv", faces, labels, layout="orig", usage=usage)
    return {
        "dir": tmp,
        "csv": fer_csv,
        "ferplus": write_ferplus(tmp / "fer2013new.csv", votes, usage),
        "faces": faces,
        "labels": labels,
        "usage": usage,
        "kinds": kinds,
        "votes": votes,
    }


@pytest.fixture(scope="module")
def prepared(kaggle, preparation):
    """preparation.py --ferplus on the 98 faces: its output folder, result and printed summary."""
    out = kaggle["dir"] / "face_datasets"
    args = ["--csv", str(kaggle["csv"]), "--ferplus", str(kaggle["ferplus"]), "--out", str(out), "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = preparation.main(preparation.parse_args(args))
    return out, res, printed.getvalue()


# ---------------------------------------------------------------------------------------------
# common


def test_columns_are_fer_plus_header():
    assert ",".join(FERPLUS_COLUMNS) == HEADER.split(",", 2)[2] and fer2013.FERPLUS_VOTES_FILE == "ferplus_votes.csv"


def test_majority_needs_more_than_half_of_all_votes():
    votes = np.zeros((5, 10), dtype=np.int64)
    votes[0, [col(3), col(4)]] = [6, 4]  # 6 of 10 for happy
    votes[1, [col(3), col(4)]] = [5, 5]  # exactly half: no majority
    votes[2, [col(3), FERPLUS_COLUMNS.index("NF")]] = [5, 5]
    votes[3, [FERPLUS_COLUMNS.index("NF"), col(0)]] = [7, 3]  # a majority for not-a-face is none of ours
    votes[4, [col(6), col(0), col(1)]] = [4, 3, 3]  # the most votes, but not more than half
    assert fer2013.ferplus_majority(votes).tolist() == [3, -1, -1, -1, -1]
    labels = np.arange(91) % 7
    kinds = kinds_for(91)
    expected = [expected_majority(y, k) for y, k in zip(labels, kinds)]
    assert fer2013.ferplus_majority(votes_for(labels, kinds)).tolist() == expected


def test_plurality_breaks_ties_with_fer2013_and_drops_non_emotions():
    labels = np.arange(91) % 7
    kinds = kinds_for(91)
    got = fer2013.ferplus_plurality(votes_for(labels, kinds), labels)
    assert got.tolist() == [expected_plurality(y, k) for y, k in zip(labels, kinds)]
    assert (got[[k in LEFT_OUT for k in kinds]] == -1).all()
    # disgust tied with happy: FER2013's disgust wins though happiness comes first in FER+'s columns
    tie = np.zeros((1, 10), dtype=np.int64)
    tie[0, [col(1), col(3)]] = 5
    assert col(3) < col(1)
    assert fer2013.ferplus_plurality(tie, [1]).tolist() == [1]
    assert fer2013.ferplus_plurality(tie, [3]).tolist() == [3]
    assert fer2013.ferplus_plurality(tie, [0]).tolist() == [3]  # label not among the tied: FER+'s column order
    even = np.zeros((1, 10), dtype=np.int64)
    even[0, [col(4), FERPLUS_COLUMNS.index("NF")]] = 5  # an emotion as many votes as not-a-face: kept
    assert fer2013.ferplus_plurality(even, [0]).tolist() == [4]


def test_shares_sum_to_one_over_our_seven():
    votes = np.zeros((3, 10), dtype=np.int64)
    votes[0, [FERPLUS_COLUMNS.index("happiness"), FERPLUS_COLUMNS.index("sadness")]] = [6, 2]
    votes[0, FERPLUS_COLUMNS.index("NF")] = 2
    votes[1, FERPLUS_COLUMNS.index("contempt")] = 10
    votes[2, :7] = 1
    shares = fer2013.ferplus_shares(votes)
    assert shares.shape == (3, 7) and shares.dtype == np.float32
    assert shares[0, EMOTIONS.index("happy")] == pytest.approx(0.75)
    assert shares[0, EMOTIONS.index("sad")] == pytest.approx(0.25)
    assert shares[0].sum() == pytest.approx(1) and shares[2].sum() == pytest.approx(1)
    assert np.allclose(shares[2], 1 / 7) and (shares[1] == 0).all()


def test_read_ferplus(kaggle):
    votes, usage = fer2013.read_ferplus(kaggle["ferplus"])
    assert (votes == kaggle["votes"]).all() and usage == kaggle["usage"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_fear", r"line 1: no column 'fear'"),
        ("word", r"line 3: the votes are not 10 whole numbers"),
        ("short", r"line 4: the votes are not 10 whole numbers"),
        ("negative", r"line 2: a negative vote"),
        ("header_only", "has no rows"),
        ("missing", "not found"),
    ],
)
def test_read_ferplus_errors(tmp_path, case, message):
    path = tmp_path / "fer2013new.csv"
    lines = [HEADER] + ["Training,fer0000000.png,4,0,0,0,0,0,0,0,0,6"] * 3
    if case == "no_fear":
        lines[0] = HEADER.replace(",fear,", ",afraid,")
    elif case == "word":
        lines[2] = lines[2].replace(",4,", ",four,")
    elif case == "short":
        lines[3] = lines[3].rsplit(",", 2)[0]
    elif case == "negative":
        lines[1] = lines[1].replace(",4,", ",-4,")
    elif case == "header_only":
        lines = lines[:1]
    if case != "missing":
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        fer2013.read_ferplus(path)


# ---------------------------------------------------------------------------------------------
# preparation.py --ferplus


def test_faces_are_filed_by_fer_plus(prepared, kaggle):
    out, res, printed = prepared
    assert (out / "Test data" / "disgust" / "00007.jpg").exists()  # anger by FER2013, disgust by six of ten
    assert not (out / "Test data" / "anger" / "00007.jpg").exists()
    assert (out / "Test data" / "disgust" / "00015.jpg").exists()  # disgust 5, happiness 5: FER2013's disgust
    assert not (out / "Test data" / "happy" / "00015.jpg").exists()
    for i, (y, kind) in enumerate(zip(kaggle["labels"], kaggle["kinds"])):
        found = list(out.glob(f"*/*/{i:05d}.jpg"))
        want = expected_plurality(y, kind)
        assert [p.parent.name for p in found] == ([EMOTIONS[want]] if want >= 0 else []), i


def test_left_out_faces_are_counted(prepared, kaggle):
    out, res, printed = prepared
    left = sum(k in LEFT_OUT for k in kaggle["kinds"])
    assert left == 42 and res["written"] == 98 - left == len(list(out.rglob("*.jpg")))
    assert [sum(res["counts"][s]) for s in ("Train data", "Test data")] == [35, 21]
    assert "42 left out" in printed and "(NF 14, unknown 14, contempt 14)" in printed
    assert f"wrote {98 - left} images" in printed


def test_votes_file_keeps_fer2013_label_and_votes(prepared, kaggle):
    out, _, _ = prepared
    with open(out / "ferplus_votes.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "fer2013", *FERPLUS_COLUMNS]
    images = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert sorted(r[0] for r in rows[1:]) == images
    for image, label, *votes in rows[1:]:
        i = int(Path(image).stem)
        assert label == EMOTIONS[kaggle["labels"][i]] and list(map(int, votes)) == kaggle["votes"][i].tolist()


def test_without_ferplus_no_votes_file(kaggle, preparation, tmp_path):
    out = tmp_path / "ds"
    res = preparation.main(preparation.parse_args(["--csv", str(kaggle["csv"]), "--out", str(out), "--no-progress"]))
    assert res["written"] == 98 and not (out / "ferplus_votes.csv").exists()
    assert (out / "Test data" / "anger" / "00007.jpg").exists()


def test_mismatched_votes_file_is_refused(kaggle, preparation, tmp_path):
    out = tmp_path / "ds"
    args = ["--csv", str(kaggle["csv"]), "--out", str(out), "--no-progress", "--ferplus"]
    short = write_ferplus(tmp_path / "short.csv", kaggle["votes"][:-1], kaggle["usage"][:-1])
    with pytest.raises(UserError, match=r"has 97 rows but .*fer2013.csv has 98:"):
        preparation.main(preparation.parse_args([*args, str(short)]))
    usage = list(kaggle["usage"])
    usage[30] = "PrivateTest"
    moved = write_ferplus(tmp_path / "moved.csv", kaggle["votes"], usage)
    with pytest.raises(UserError, match=r"row 31 is 'PrivateTest' but .*row 31 is 'Training'"):
        preparation.main(preparation.parse_args([*args, str(moved)]))
    assert not out.exists()


def test_a_bad_votes_file_is_named_before_the_csv_is_read(preparation, tmp_path, monkeypatch):
    bad = tmp_path / "fer2013new.csv"
    bad.write_text("not,the,header\n")
    monkeypatch.setattr(preparation, "read_csv", lambda *a, **k: pytest.fail("the FER2013 CSV was read first"))
    args = ["--csv", "x.csv", "--ferplus", str(bad), "--out", str(tmp_path / "o")]
    with pytest.raises(UserError, match=r"--ferplus .*line 1: no column 'Usage'"):
        preparation.main(preparation.parse_args(args))


def test_skip_bad_drops_the_same_rows_of_the_votes(kaggle, preparation, tmp_path):
    lines = kaggle["csv"].read_text().splitlines()
    lines[5] = lines[5].replace(" ", ",", 1)  # row 4 (line 6) is bad
    lines.insert(2, "")  # and a blank line above it, which is not a row: the bad row is now on line 7
    fer_csv = tmp_path / "fer2013.csv"
    fer_csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    args = ["--csv", str(fer_csv), "--ferplus", str(kaggle["ferplus"]), "--out", str(out), "--skip-bad"]
    res = preparation.main(preparation.parse_args([*args, "--no-progress"]))
    assert [n for n, _ in res["bad"]] == [7]
    rows = list(csv.DictReader(open(out / "ferplus_votes.csv", newline="")))
    assert len(rows) == res["written"] == 98 - 42 - 1
    for row in rows:
        i = int(Path(row["image"]).stem)
        original = i if i < 4 else i + 1  # the rows after the bad one move up one
        assert row["fer2013"] == EMOTIONS[kaggle["labels"][original]]
        assert [int(row[c]) for c in FERPLUS_COLUMNS] == kaggle["votes"][original].tolist()


# ---------------------------------------------------------------------------------------------
# train.py on the votes


def test_read_votes(train, prepared, kaggle, tmp_path):
    out, _, _ = prepared
    faces, labels, classes, _, paths = images.load_image_folder(out / "Train data", progress=False)
    shares, labels2013 = fer2013.read_votes(out / "Train data", paths, classes)
    assert [Path(p).parent.name for p in paths] == [classes[t] for t in labels]
    rows = [int(Path(p).stem) for p in paths]
    assert [classes[t] for t in labels2013] == [EMOTIONS[kaggle["labels"][i]] for i in rows]
    assert (labels2013 != labels).any()  # the disagreeing faces' folders are FER+'s
    want = fer2013.ferplus_shares(kaggle["votes"][rows])[:, [EMOTIONS.index(c) for c in classes]]
    assert np.allclose(shares, want) and np.allclose(shares.sum(1), 1)
    assert fer2013.read_votes(tmp_path, paths, classes) is None  # no votes file beside tmp_path
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    lines = (copy / "ferplus_votes.csv").read_text().splitlines()
    (copy / "ferplus_votes.csv").write_text("\n".join(lines[:-1]) + "\n")
    copied = [copy / Path(p).relative_to(out) for p in paths]
    with pytest.raises(UserError, match="has no votes for .*run preparation.py --ferplus again"):
        fer2013.read_votes(copy / "Train data", copied, classes)


def test_two_head_run(train, testpy, prepared, tmp_path, monkeypatch, capsys):
    out, _, _ = prepared
    monkeypatch.setattr(train, "write_int8_copy", lambda *a, **k: None)
    real_cross_entropy, targets = torch.nn.functional.cross_entropy, []

    def spy(logits, target, *args, **kwargs):  # what train.py's loss modules call: record each loss's targets
        targets.append(target.detach().cpu().numpy())
        return real_cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    model = tmp_path / "m.pt"
    args = ["--data", str(out / "Train data"), "--out", str(model), "--epochs", "1", "--max-batches", "2"]
    train.main(train.parse_args([*args, "--batch-size", "16", "--no-progress", "--device", "cpu"]))
    assert "FER+'s votes" in capsys.readouterr().out
    # each batch: the answering head against vote shares, the other against the same faces' FER2013 labels
    _, _, classes, _, paths = images.load_image_folder(out / "Train data", progress=False)
    shares, labels2013 = fer2013.read_votes(out / "Train data", paths, classes)
    faces_known = {(tuple(np.round(s, 4)), int(y)) for s, y in zip(shares, labels2013)}
    assert len(targets) == 4 and all(t.dtype == np.float32 and t.shape == (16, 7) for t in targets[::2])
    for soft, hard in zip(targets[::2], targets[1::2]):
        assert hard.dtype == np.int64 and {(tuple(np.round(s, 4)), int(y)) for s, y in zip(soft, hard)} <= faces_known
    ckpt = torch.load(model, weights_only=True)
    assert ckpt["heads"] == ["ferplus", "fer2013"] and ckpt["arch_args"]["extra_heads"] == ["fer2013"]
    assert ckpt["state_dict"]["extra_heads.fer2013.weight"].shape == ckpt["state_dict"]["head.weight"].shape
    metrics = json.loads((tmp_path / "m.metrics.json").read_text())
    assert metrics["heads"] == ["ferplus", "fer2013"] and metrics["arch_args"]["extra_heads"] == ["fer2013"]
    assert 0 <= metrics["validation"]["other_heads"]["fer2013"]["accuracy"] <= 1
    assert all("val_acc_fer2013_head" in h for h in metrics["history"])

    cpu = torch.device("cpu")
    faces = synthetic_faces(14, seed=1)[0]
    default = testpy.Recognizer(model, cpu, engine="pytorch")
    other = testpy.Recognizer(model, cpu, engine="pytorch", head="fer2013")
    assert default.head == "ferplus" and other.head == "fer2013"
    a, b = default.classify(faces), other.classify(faces)
    assert np.allclose(a.sum(1), 1) and np.allclose(b.sum(1), 1) and not np.allclose(a, b, atol=1e-4)
    same = testpy.Recognizer(model, cpu, engine="pytorch", head="ferplus").classify(faces)
    assert np.allclose(same, a, atol=1e-6)
    with pytest.raises(UserError, match="--head smile: .*ferplus and fer2013 only"):
        testpy.Recognizer(model, cpu, head="smile")
    with pytest.raises(UserError, match="--engine int8: .*m.int8.onnx not found"):
        testpy.Recognizer(model, cpu, engine="int8", head="fer2013")
    # The int8 copy has both heads: each answers there as PyTorch's does, to int8's precision, with no PyTorch.
    export.write_int8(model, synthetic_faces(40, seed=2)[0])
    meta = onnx_model.Int8Model(onnx_model.int8_path(model)).meta
    assert json.loads(meta["heads"]) == ["ferplus", "fer2013"] and meta["format"] == str(onnx_model.FORMAT)
    for head, want in (("ferplus", a), ("fer2013", b)):
        quick = testpy.Recognizer(model, cpu, engine="int8", head=head)
        assert quick.int8 is not None and quick.model is None and quick.head == head
        # the first head from the int8 copy, the other from the float one beside it
        assert quick.int8.meta["precision"] == ("int8" if head == "ferplus" else "float32")
        assert np.abs(quick.classify(faces) - want).max() < 0.05
        api = Recognizer(model, head=head)  # the API alone: the same ONNX answers, to the last bit
        assert np.array_equal(api.classify(faces), quick.classify(faces))
    for named in (model, onnx_model.int8_path(model)):  # the .pt, or its ONNX copy named directly
        with pytest.raises(UserError, match="--head smile: .*ferplus and fer2013 only; pass one of those$"):
            testpy.Recognizer(named, cpu, engine="int8", head="smile")
    onnx_model.float_path(onnx_model.int8_path(model)).unlink()  # without the float copy the int8 one answers
    assert testpy.Recognizer(model, cpu, engine="int8", head="fer2013").int8.meta["precision"] == "int8"


# ---------------------------------------------------------------------------------------------
# train.py --teacher: distillation


@pytest.fixture(scope="module")
def teacher(train, prepared, tmp_path_factory):
    """A two-head model trained for one short epoch on the prepared faces: a teacher for the runs below."""
    out, _, _ = prepared
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    args = ["--data", str(out / "Train data"), "--out", str(path), "--epochs", "1", "--max-batches", "2"]
    real = train.write_int8_copy
    train.write_int8_copy = lambda *a, **k: None
    try:
        train.main(train.parse_args([*args, "--batch-size", "16", "--no-progress", "--device", "cpu", "--seed", "5"]))
    finally:
        train.write_int8_copy = real
    return path


def test_a_student_learns_the_blend_of_the_labels_and_the_teachers(train, prepared, teacher, tmp_path, monkeypatch):
    out, _, _ = prepared
    monkeypatch.setattr(train, "write_int8_copy", lambda *a, **k: None)
    real_cross_entropy, targets = torch.nn.functional.cross_entropy, []

    def spy(logits, target, *args, **kwargs):
        targets.append(target.detach().cpu().numpy())
        return real_cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    model = tmp_path / "s.pt"
    args = ["--data", str(out / "Train data"), "--out", str(model), "--epochs", "1", "--max-batches", "2"]
    args += ["--batch-size", "16", "--no-progress", "--device", "cpu", "--teacher", str(teacher), str(teacher)]
    train.main(train.parse_args(args))
    faces, _, classes, _, paths = images.load_image_folder(out / "Train data", progress=False)
    shares, labels2013 = fer2013.read_votes(out / "Train data", paths, classes)
    # as the run computes them: in its precision (bfloat16 where the CPU has it), averaged over the two teachers
    taught = train.teacher_probabilities([teacher], faces, classes, ["ferplus", "fer2013"], torch.device("cpu"), True,
                                         lambda *a: None)  # fmt: skip
    w = train.TEACHER_WEIGHT
    votes = w * taught["ferplus"].numpy() + (1 - w) * shares
    labels = w * taught["fer2013"].numpy() + (1 - w) * np.eye(7, dtype=np.float32)[labels2013]
    assert 0 < w < 1 and len(targets) == 4
    for want, got in ((votes, targets[0::2]), (labels, targets[1::2])):  # each batch: the vote head, then FER2013's
        for t in np.concatenate(got):
            assert t.shape == (7,) and np.isclose(t.sum(), 1, atol=1e-5)
            assert np.abs(want - t).max(1).min() < 1e-5, "a target that is no face's blend of labels and teachers"
    recorded = torch.load(model.with_name("s.last.pt"), weights_only=True)["train_args"]["teacher"]
    assert len(recorded) == 2 and all(r.endswith("t.pt") for r in recorded)


def test_a_resumed_student_keeps_its_teachers_or_refuses(train, prepared, teacher, tmp_path, monkeypatch):
    out, _, _ = prepared
    monkeypatch.setattr(train, "write_int8_copy", lambda *a, **k: None)
    model = tmp_path / "s.pt"
    args = ["--data", str(out / "Train data"), "--out", str(model), "--max-batches", "2", "--batch-size", "16"]
    args += ["--no-progress", "--device", "cpu"]
    train.main(train.parse_args([*args, "--epochs", "1", "--teacher", str(teacher)]))
    last = model.with_name("s.last.pt")
    resumed = train.parse_args([*args, "--resume", str(last)])
    train.resume_schedule(resumed)
    assert [p.name for p in resumed.teacher] == ["t.pt"] and resumed.teacher[0].is_file()
    other = train.parse_args([*args, "--resume", str(last), "--teacher", str(teacher), str(teacher)])
    with pytest.raises(UserError, match="--resume .* started with --teacher"):
        train.resume_schedule(other)


def test_bad_teachers_are_named(train, prepared, teacher, tiny_model, tmp_path, capsys):
    out, _, _ = prepared
    args = ["--data", str(out / "Train data"), "--out", str(tmp_path / "s.pt"), "--epochs", "1", "--no-progress"]
    with pytest.raises(SystemExit):
        train.parse_args([*args, "--teacher", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err
    assert "--teacher" in err and "nope.pt not found" in err
    faces, _, classes, _, _ = images.load_image_folder(out / "Train data", progress=False)
    cpu, quiet = torch.device("cpu"), lambda *a: None
    with pytest.raises(UserError, match=r"--teacher .*tiny.pt has no ferplus head"):  # a one-head model
        train.teacher_probabilities([tiny_model], faces, classes, ["ferplus", "fer2013"], cpu, False, quiet)
    with pytest.raises(UserError, match=r"--teacher .*t.pt was trained on other classes"):
        train.teacher_probabilities([teacher], faces, classes[::-1], ["ferplus", "fer2013"], cpu, False, quiet)


# ---------------------------------------------------------------------------------------------
# test.py --eval CSV --ferplus FILE


@pytest.fixture
def recognizer(testpy, tiny_model):
    return testpy.Recognizer(tiny_model, torch.device("cpu"), engine="pytorch")


def scored_shares(kaggle, classes):
    """The vote shares of the rows test.py scores (not Training), in the model's class order."""
    scored = [i for i, u in enumerate(kaggle["usage"]) if u != "Training"]
    return fer2013.ferplus_shares(kaggle["votes"][scored])[:, [EMOTIONS.index(c) for c in classes]], scored


def test_eval_with_ferplus(testpy, recognizer, kaggle, tmp_path):
    res = testpy.run_eval(recognizer, kaggle["csv"], tmp_path, tmp_path / "s.json", ferplus=kaggle["ferplus"])
    saved = json.loads((tmp_path / "s.json").read_text())
    _, scored = scored_shares(kaggle, recognizer.classes)
    majority = fer2013.ferplus_majority(kaggle["votes"][scored])
    fp = saved["ferplus"]
    assert res["n"] == 28 and fp["faces"] == int((majority >= 0).sum()) == 14 and fp["vote_faces"] == 21
    assert 0 <= fp["accuracy"] <= 1 and 0 <= fp["macro_f1"] <= 1 and fp["kl_divergence"] >= 0
    assert 0 <= fp["total_variation"] <= 1 and np.array(fp["confusion"]).sum() == 14
    assert set(fp["recall"]) == set(recognizer.classes) and res["ferplus"]["faces"] == 14
    assert "ferplus" not in testpy.run_eval(recognizer, kaggle["csv"], tmp_path, None)


def test_eval_ferplus_scores_against_the_shares(testpy, recognizer, kaggle, tmp_path, monkeypatch):
    shares, _ = scored_shares(kaggle, recognizer.classes)
    monkeypatch.setattr(recognizer, "classify", lambda faces: shares[: len(faces)].copy())
    fp = testpy.run_eval(recognizer, kaggle["csv"], tmp_path, None, ferplus=kaggle["ferplus"])["ferplus"]
    assert fp["accuracy"] == 1 and fp["macro_f1"] == 1
    assert fp["kl_divergence"] == pytest.approx(0, abs=1e-5) and fp["total_variation"] == pytest.approx(0, abs=1e-6)
    uniform = np.full_like(shares, 1 / 7)
    monkeypatch.setattr(recognizer, "classify", lambda faces: uniform[: len(faces)].copy())
    fp = testpy.run_eval(recognizer, kaggle["csv"], tmp_path, None, ferplus=kaggle["ferplus"])["ferplus"]
    kl = [sum(t * np.log(7 * t) for t in pair) for pair in ((0.8, 0.2), (0.6, 0.4), (0.5, 0.5))]  # agree, dis, tie
    assert fp["kl_divergence"] == pytest.approx(np.mean(kl), rel=1e-5)
    tv = [0.5 * (sum(abs(t - 1 / 7) for t in pair) + 5 / 7) for pair in ((0.8, 0.2), (0.6, 0.4), (0.5, 0.5))]
    assert fp["total_variation"] == pytest.approx(np.mean(tv), rel=1e-5)


def test_eval_ferplus_of_other_rows_is_refused(testpy, recognizer, kaggle, tmp_path):
    short = write_ferplus(tmp_path / "short.csv", kaggle["votes"][:-1], kaggle["usage"][:-1])
    with pytest.raises(UserError, match="has 97 rows but"):
        testpy.run_eval(recognizer, kaggle["csv"], tmp_path, None, ferplus=short)


def test_cli_ferplus_errors(testpy, kaggle, prepared, tiny_model, tmp_path):
    r = run_in_process(testpy, "--ferplus", kaggle["ferplus"], "x.jpg")
    assert r.returncode == 2 and "--ferplus goes with --eval" in r.stderr
    out, _, _ = prepared
    args = ("--eval", out / "Test data", "--ferplus", kaggle["ferplus"], "--model", tiny_model, "--out", tmp_path)
    r = run_in_process(testpy, *args)
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "--ferplus goes with --eval of a FER2013 CSV" in r.stderr and "Traceback" not in r.stderr
