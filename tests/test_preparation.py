"""The FER2013 CSV reader (common.py) and preparation.py: parsing, validation, the folders it writes,
and that failures lose nothing."""

import gzip
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, run_in_process, synthetic_faces, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ferlite import errors, fer2013
from ferlite.errors import UserError
from ferlite.names import EMOTIONS


def test_parse_pixels_round_trip(preparation):
    face = np.arange(2304, dtype=np.int64).reshape(48, 48) % 256
    out = fer2013.parse_pixels(" ".join(map(str, face.ravel())))
    assert out.dtype == np.uint8 and out.shape == (48, 48)
    assert (out == face).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 3", "has 3 pixel values"),
        (" ".join(["7"] * 2305), "has 2305 pixel values"),
        (" ".join(["7"] * 2303 + ["x"]), "non-numeric"),
        (" ".join(["7"] * 2303 + ["256"]), "outside 0-255"),
        (" ".join(["7"] * 2303 + ["-1"]), "outside 0-255"),
        (" ".join(["7"] * 2303 + ["2.5"]), "not a whole number"),
    ],
)
def test_parse_pixels_rejects(preparation, text, message):
    with pytest.raises(fer2013.RowError, match=message):
        fer2013.parse_pixels(text)


@pytest.mark.parametrize(
    "text, ok", [("0", 0), ("6", 6), (" 3 ", 3), ("7", None), ("-1", None), ("", None), ("a", None), ("2.5", None)]
)
def test_parse_label(preparation, text, ok):
    if ok is None:
        with pytest.raises(fer2013.RowError):
            fer2013.parse_label(text)
    else:
        assert fer2013.parse_label(text) == ok


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, (48, 48)), st.sampled_from([" ", "  ", "\t"]))
def test_accepted_rows_round_trip(preparation, face, sep):
    assert (fer2013.parse_pixels(sep.join(map(str, face.ravel()))) == face).all()


mutations = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 2304)),
    st.tuples(st.just("add"), st.integers(1, 5)),
    st.tuples(st.just("set"), st.integers(0, 2303), st.text("0123456789x.-e+", min_size=1, max_size=5)),
)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, (48, 48)), mutations, st.integers(0, 30))
def test_rows_accepted_round_trip_and_rejected_name_the_line(preparation, tmp_path_factory, face, mutation, row):
    """A mutated row: if the parser accepts it, read_csv gives back its image; if not, the error names its line."""
    values = [str(v) for v in face.ravel()]
    if mutation[0] == "cut":
        values = values[: mutation[1]]
    elif mutation[0] == "add":
        values += ["0"] * mutation[1]
    else:
        values[mutation[1]] = mutation[2]
    text = " ".join(values)
    faces, labels = synthetic_faces(row + 1)
    path = write_csv(tmp_path_factory.mktemp("h") / "t.csv", faces, labels)
    lines = path.read_text().splitlines()
    lines[row + 1] = f"{text},3"
    path.write_text("\n".join(lines) + "\n")
    try:
        expect = fer2013.parse_pixels(text)
    except fer2013.RowError:
        with pytest.raises(UserError, match=f"line {row + 2}: row "):
            fer2013.read_csv(path, progress=False)
    else:
        got, _, _, _ = fer2013.read_csv(path, progress=False)
        assert (got[row] == expect).all()
        assert [float(v) for v in values] == expect.ravel().tolist()


def test_read_both_layouts_gz_and_crlf(preparation, tmp_path):
    faces, labels = synthetic_faces(14)
    ours = write_csv(tmp_path / "a.csv", faces, labels, newline="\r\n")
    orig = write_csv(tmp_path / "b.csv", faces, labels, layout="orig", usage=["Training"] * 7 + ["PublicTest"] * 7)
    gz = tmp_path / "c.csv.gz"
    gz.write_bytes(gzip.compress(ours.read_bytes()))
    for path in (ours, orig, gz):
        f, y, usage, bad = fer2013.read_csv(path, progress=False)
        assert (f == faces).all() and (y == labels).all() and not bad
    assert fer2013.read_csv(orig, progress=False)[2][-1] == "PublicTest"


def test_quoted_fields_and_spaces(preparation, tmp_path):
    faces, labels = synthetic_faces(3)
    rows = ['"input", "target"'] + [f'" {" ".join(map(str, f.ravel()))} ", "{y}"' for f, y in zip(faces, labels)]
    path = tmp_path / "q.csv"
    path.write_text("\n".join(rows) + "\n")
    # csv's default dialect keeps the space after a comma, so quote without it as spreadsheets do
    path.write_text(path.read_text().replace('", "', '","'))
    f, y, _, _ = fer2013.read_csv(path, progress=False)
    assert (f == faces).all() and (y == labels).all()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"input,target\n", "no usable data rows"),
        (b"foo,bar\n1,2\n", "line 1: header"),
        (bytes(range(256)) * 40, "unreadable|header"),
    ],
)
def test_bad_files(preparation, tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        fer2013.read_csv(path, progress=False)


def test_missing_and_truncated_gz(preparation, tmp_path, small_csv):
    with pytest.raises(UserError, match="not found"):
        fer2013.read_csv(tmp_path / "nope.csv")
    data = gzip.compress(small_csv[0].read_bytes())
    gz = tmp_path / "t.csv.gz"
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        fer2013.read_csv(gz, progress=False)


def test_bad_row_stops_or_is_skipped(preparation, tmp_path, small_csv):
    path, faces, labels = small_csv
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",9"  # label out of range, line 6
    lines[9] = "1 2 3,4"  # too few values, line 10
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"line 6: row has label 9, .* \(2 bad rows, at lines 6, 10\)"):
        fer2013.read_csv(path, progress=False)
    f, y, _, bad = fer2013.read_csv(path, skip_bad=True, progress=False)
    assert [n for n, _ in bad] == [6, 10] and len(f) == len(faces) - 2


def test_writes_folders_and_reruns_cleanly(preparation, tmp_path, small_csv):
    path, faces, labels = small_csv
    out = tmp_path / "face_datasets"
    res = preparation.main(preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"]))
    for e in EMOTIONS:
        assert len(list((out / "Train data" / e).glob("*.jpg"))) == (labels == EMOTIONS.index(e)).sum()
    img = cv2.imread(str(out / "Train data" / "anger" / "00000.jpg"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (48, 48) and np.abs(img.astype(int) - faces[0]).mean() < 3
    assert (out / "class_distribution.png").stat().st_size > 0
    assert res["counts"]["Train data"] == np.bincount(labels, minlength=7).tolist()
    (out / "Train data" / "anger" / "stale.jpg").write_bytes(b"x")
    preparation.main(preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"]))
    assert not (out / "Train data" / "anger" / "stale.jpg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_usage_column_splits(preparation, tmp_path):
    """PublicTest is train.py's validation folder; PrivateTest stays apart for the final score."""
    faces, labels = synthetic_faces(14)
    usage = ["Training"] * 8 + ["PublicTest"] * 2 + ["PrivateTest"] * 4
    path = write_csv(tmp_path / "o.csv", faces, labels, layout="orig", usage=usage)
    out = tmp_path / "ds"
    res = preparation.main(preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"]))
    assert [sum(res["counts"][s]) for s in ("Train data", "Test data", "Final test data")] == [8, 2, 4]
    assert len(list((out / "Test data").rglob("*.jpg"))) == 2
    assert len(list((out / "Final test data").rglob("*.jpg"))) == 4


def kaggle_rows(n=14):
    faces, labels = synthetic_faces(n)
    usage = ["Training"] * (n - 4) + ["PublicTest"] * 2 + ["PrivateTest"] * 2
    return faces, labels, usage


@pytest.mark.parametrize("kind", ["zip", "zip-kaggle", "tar.gz", "tar"])
def test_reads_the_csv_inside_an_archive(tmp_path, kind):
    """Kaggle's download comes as a .zip (mirrors: .tar.gz); the CSV inside is read without extracting."""
    faces, labels, usage = kaggle_rows()
    csv_path = write_csv(tmp_path / "fer2013.csv", faces, labels, layout="orig", usage=usage)
    archive = tmp_path / f"download.{kind.split('-')[0]}"
    if kind.startswith("zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            if kind == "zip-kaggle":  # Kaggle's own zip: several CSVs, the one with every split is icml_face_data.csv
                z.writestr("example_submission.csv", "id,emotion\n1,0\n")
                z.writestr("train.csv", "emotion,pixels\n")
                z.write(csv_path, "icml_face_data.csv")
            else:
                z.write(csv_path, "fer2013/fer2013.csv")
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as t:
            t.add(csv_path, "fer2013/fer2013.csv")
    f, y, u, bad = fer2013.read_csv(archive, progress=False)
    assert (f == faces).all() and (y == labels).all() and u == usage and not bad


def test_archive_without_one_clear_csv(tmp_path):
    several = tmp_path / "several.zip"
    with zipfile.ZipFile(several, "w") as z:
        z.writestr("a.csv", "input,target\n")
        z.writestr("b.csv", "input,target\n")
    with pytest.raises(UserError, match=r"several CSVs \(a.csv, b.csv\): extract FER2013's CSV"):
        fer2013.read_csv(several, progress=False)
    none = tmp_path / "none.zip"
    with zipfile.ZipFile(none, "w") as z:
        z.writestr("readme.txt", "x")
    with pytest.raises(UserError, match=r"no CSV \(readme.txt\)"):
        fer2013.read_csv(none, progress=False)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(several.read_bytes()[:30])
    with pytest.raises(UserError, match="truncated or damaged"):
        fer2013.read_csv(cut, progress=False)


def test_interrupt_while_removing_the_old_folder(preparation, tmp_path, small_csv, monkeypatch, capsys):
    """Ctrl-C after the new folder is in place: the old copy is still removed and the message says what happened."""
    path, faces, _ = small_csv
    out = tmp_path / "ds"
    preparation.main(preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"]))
    (out / "Train data" / "anger" / "stale.jpg").write_bytes(b"x")
    real = preparation.remove_tree

    def interrupted(folder, *a, **k):
        os.remove(next(Path(folder).rglob("*.jpg")))  # part of the way through
        raise KeyboardInterrupt

    monkeypatch.setattr(preparation, "remove_tree", interrupted)
    with pytest.raises(SystemExit) as e:
        errors.run_main(
            preparation.main, preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"])
        )
    assert e.value.code == 130
    assert "already complete with the new images; the previous copy was removed" in capsys.readouterr().err
    assert len(list(out.rglob("*.jpg"))) == len(faces) and not (out / "Train data" / "anger" / "stale.jpg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(preparation, "remove_tree", real)


def test_leftovers_of_a_killed_run_are_removed(preparation, tmp_path, small_csv, capsys):
    """A run killed outright (no Ctrl-C handling) leaves hidden folders; the next run removes them and says so."""
    out = tmp_path / "ds"
    for name in (".ds.new-abc", ".ds.old-def"):
        (tmp_path / name / "Train data").mkdir(parents=True)
        (tmp_path / name / "Train data" / "x.jpg").write_bytes(b"x")
    preparation.main(preparation.parse_args(["--csv", str(small_csv[0]), "--out", str(out), "--no-progress"]))
    assert "removed the temporary folders" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_run_keeps_previous_output(preparation, tmp_path, small_csv, monkeypatch):
    path, _, _ = small_csv
    out = tmp_path / "ds"
    preparation.main(preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"]))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(preparation, "plot_distribution", boom)
    with pytest.raises(KeyboardInterrupt, match=f"{out} was left as it was"):
        preparation.main(preparation.parse_args(["--csv", str(path), "--out", str(out), "--no-progress"]))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_skip_bad_writes_rejects(preparation, tmp_path, small_csv):
    path, faces, _ = small_csv
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    res = preparation.main(
        preparation.parse_args(["--csv", str(path), "--out", str(out), "--skip-bad", "--no-progress"])
    )
    assert res["bad"] == [(4, "has no label")]
    assert (out / "rejects.csv").read_text().splitlines()[1] == "4,has no label"


def test_cli_errors_are_one_line(preparation, tmp_path, small_csv):
    bad = tmp_path / "bad.csv"
    bad.write_text("input,target\n1 2,3\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for k, (args, needle) in enumerate([
        (["--csv", str(tmp_path / "missing.csv")], "not found"),
        (["--csv", str(bad)], "line 2"),
        (["--csv", str(small_csv[0]), "--out", str(blocker)], "is a file"),
        (["--csv", str(small_csv[0]), "--out", str(blocker / "sub")], "cannot write"),
    ]):  # fmt: skip
        if k == 0:  # as its own process once: the exit code and the one line a user sees
            r = subprocess.run(
                [sys.executable, str(ROOT / "preparation.py"), *args, "--no-progress"], capture_output=True, text=True
            )
        else:
            r = run_in_process(preparation, *args, "--no-progress")
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
