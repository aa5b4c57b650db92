"""What a new user meets first: --help of every script, OpenCV without Haar files, a Kaggle CSV scored
honestly, and Ctrl-C that leaves earlier outputs whole."""

import json
import subprocess
import sys

import cv2
import pytest
import torch
from conftest import ROOT, load_script, run_cli, run_in_process, synthetic_faces, write_csv
from test_testpy_inputs import SAMPLE, make_video

from ferlite import errors
from ferlite.errors import UserError
from ferlite.names import EMOTIONS


@pytest.mark.parametrize("script", ["preparation.py", "train.py", "test.py", "benchmark.py"])
def test_every_script_prints_its_help(script, capsys):
    """--help from a terminal; -h, argparse's other spelling of it, in this process: the same text."""
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "--" in r.stdout and not r.stderr, r.stderr
    module = load_script(script[:-3])
    with pytest.raises(SystemExit) as e:
        module.parse_args(["-h"])
    assert e.value.code == 0 and capsys.readouterr().out.split("options:")[1] == r.stdout.split("options:")[1]


def test_eval_of_a_kaggle_csv_scores_only_rows_not_marked_training(testpy, tiny_model, tmp_path, capsys):
    faces, labels = synthetic_faces(28)
    usage = ["Training"] * 14 + ["PublicTest"] * 7 + ["PrivateTest"] * 7
    path = write_csv(tmp_path / "fer2013.csv", faces, labels, layout="orig", usage=usage)
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    res = testpy.run_eval(rec, path, tmp_path, tmp_path / "s.json")
    assert res["n"] == 14 and json.loads((tmp_path / "s.json").read_text())["n"] == 14
    assert "rows by Usage: PrivateTest 7, PublicTest 7; 14 other rows left out" in capsys.readouterr().out
    probs = rec.classify(faces[14:])
    expected = (probs.argmax(1) == [rec.classes.index(EMOTIONS[y]) for y in labels[14:]]).mean()
    assert res["accuracy"] == pytest.approx(float(expected))


def test_opencv_without_haar_files(testpy, tiny_model, tmp_path, monkeypatch):
    """OpenCV 5 (on some GPU machines) has no CascadeClassifier: --eval of a CSV and the default detector need
    none; --detector haar gets one line."""
    monkeypatch.delattr(cv2, "CascadeClassifier")
    faces, labels = synthetic_faces(14)
    haar = testpy.Recognizer(tiny_model, torch.device("cpu"), detector="haar")
    assert testpy.run_eval(haar, write_csv(tmp_path / "v.csv", faces, labels), tmp_path, None)["n"] == 14
    with pytest.raises(UserError, match=r"has no Haar cascades .*pip install 'opencv-python<5'"):
        testpy.run_photos(haar, [SAMPLE], tmp_path)
    records, failed = testpy.run_photos(testpy.Recognizer(tiny_model, torch.device("cpu")), [SAMPLE], tmp_path)
    assert not failed and records[0]["box"] is not None


def interrupt_on(rec, call):
    real, seen = rec.faces_in, []

    def faces_in(bgr, *args, **kwargs):
        seen.append(1)
        if len(seen) == call:
            raise KeyboardInterrupt
        return real(bgr, *args, **kwargs)

    rec.faces_in = faces_in


def test_interrupted_video_leaves_the_earlier_one_whole(testpy, tiny_model, tmp_path, capsys):
    video, out = make_video(tmp_path / "clip.mp4"), tmp_path / "out"
    out.mkdir()
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    testpy.run_video(rec, video, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_on(rec, 5)
    with pytest.raises(SystemExit) as e:
        errors.run_main(lambda a: testpy.run_video(rec, video, out), None)
    assert (
        e.value.code == 130
        and "clip_emotions.mp4 and its frame table were left as they were" in capsys.readouterr().err
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file either


def test_interrupted_photos_say_how_many_were_annotated(testpy, tiny_model, tmp_path, capsys):
    photos = [SAMPLE, SAMPLE, SAMPLE]
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    interrupt_on(rec, 2)
    with pytest.raises(SystemExit):
        errors.run_main(lambda a: testpy.run_photos(rec, photos, tmp_path), None)
    assert f"1 of 3 photos were annotated into {tmp_path}, each file whole" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grace_hopper_emotions.jpg", testpy.PROGRESS_FILE]


def small_photos(folder, n):
    """`n` copies of the sample photo, shrunk (detection takes less), named p00.jpg, p01.jpg, ..."""
    folder.mkdir()
    small = cv2.resize(cv2.imread(str(SAMPLE)), (160, 240), interpolation=cv2.INTER_AREA)
    return [p for i in range(n) if cv2.imwrite(str(p := folder / f"p{i:02d}.jpg"), small)]


def test_many_photos_get_a_progress_bar_and_an_interrupted_run_finishes_with_skip_done(testpy, tiny_model, tmp_path):
    photos = small_photos(tmp_path / "in", testpy.PHOTO_LINES + 5)
    out, js = tmp_path / "out", tmp_path / "all.json"
    r = run_cli(tmp_path / "in", "--model", tiny_model, "--out", out, "--json", js)
    assert r.returncode == 0, r.stderr
    assert f"{len(photos)}/{len(photos)}" in r.stderr and ": face 1 at" not in r.stdout  # one bar, no line a face
    whole = json.loads(js.read_text())
    assert len(whole) == len(photos) and len((out / testpy.PROGRESS_FILE).read_text().splitlines()) == len(photos)
    # Killed at the 10th photo, two at a time: those done are annotated and recorded (the 9 before it, and those
    # the other worker finished or had in hand); --skip-done does only the rest, in the photos' order.
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"), threads=1, detect_threads=1)
    interrupt_on(rec, 10)
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(KeyboardInterrupt, match=r"(\d+) of \d+ photos .*the same command with --skip-done") as e:
        testpy.run_photos(rec, photos, again, workers=2)
    done = int(str(e.value).split()[0])
    recorded = [json.loads(line)["photo"] for line in (again / testpy.PROGRESS_FILE).read_text().splitlines()]
    assert 9 <= done <= 9 + 3 and len(recorded) == done and set(recorded) < {str(p) for p in photos}
    with open(again / testpy.PROGRESS_FILE, "a") as f:
        f.write('{"photo": "cut short by the kil')  # a line a kill cut in half is not a photo done
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    seen = []
    real = rec.faces_in
    rec.faces_in = lambda bgr: seen.append(1) or real(bgr)
    records, failed = testpy.run_photos(rec, photos, again, skip_done=True, workers=2)
    assert failed == 0 and len(seen) == len(photos) - done
    key = lambda rs: [(r["file"], r["box"], r["emotion"]) for r in rs]  # noqa: E731
    assert key(records) == key(whole) and len(records) >= len(photos)
    assert sorted(p.name for p in again.glob("*.jpg")) == sorted(p.name for p in out.glob("*.jpg"))


def test_photos_on_two_workers_give_what_one_gives(testpy, tiny_model, tmp_path, capsys):
    """The pool changes the speed only: the same records in the photos' order, the same annotated copies, the
    same line per face, and an unreadable photo among them still named and counted."""
    photos = small_photos(tmp_path / "in", 5)
    (bad := tmp_path / "in" / "p02.jpg").write_bytes(b"not a jpeg")
    photos += [SAMPLE, SAMPLE]  # a photo named twice gets a numbered copy, in order
    runs = []
    for workers in (1, 2):
        (out := tmp_path / f"w{workers}").mkdir()
        rec = testpy.Recognizer(tiny_model, torch.device("cpu"), threads=1, detect_threads=1)
        records, failed = testpy.run_photos(rec, photos, out, workers=workers)
        said = capsys.readouterr()
        names = sorted(p.name for p in out.glob("*.jpg"))
        runs.append((records, failed, said.out, said.err, names))
    assert runs[0] == runs[1] and runs[0][1] == 1 and f"error: {bad}" in runs[0][3]
    assert runs[0][4][:2] == ["grace_hopper_emotions.jpg", "grace_hopper_emotions_2.jpg"] and len(runs[0][4]) == 6


def test_photos_share_a_detector_between_workers_only_where_it_can_be(testpy, tiny_model, tmp_path, monkeypatch):
    """RetinaFace's session serves several threads; OpenCV's cascade may not be shared, so Haar gets one worker."""
    workers, real = [], testpy.run_photos
    monkeypatch.setattr(testpy, "run_photos", lambda *a: workers.append(a[4]) or real(*a))
    for detector in ("retinaface", "haar"):
        out = tmp_path / detector
        r = run_in_process(testpy, SAMPLE, SAMPLE, "--model", tiny_model, "--out", out, "--detector", detector)
        assert r.returncode == 0, r.stderr
    assert workers == [min(2, testpy.PHOTO_WORKERS), 1]
