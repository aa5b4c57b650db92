"""What a new user meets first: --help of every script, OpenCV without Haar files, a Kaggle CSV scored
honestly, and Ctrl-C that leaves earlier outputs whole."""

import json
import subprocess
import sys

import cv2
import pytest
import torch
from conftest import ROOT, load_script, synthetic_faces, write_csv
from test_testpy_inputs import SAMPLE, make_video

import common
from common import EMOTIONS, UserError


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

    def faces_in(bgr):
        seen.append(1)
        if len(seen) == call:
            raise KeyboardInterrupt
        return real(bgr)

    rec.faces_in = faces_in


def test_interrupted_video_leaves_the_earlier_one_whole(testpy, tiny_model, tmp_path, capsys):
    video, out = make_video(tmp_path / "clip.mp4"), tmp_path / "out"
    out.mkdir()
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    testpy.run_video(rec, video, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_on(rec, 5)
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda a: testpy.run_video(rec, video, out), None)
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
        common.run_main(lambda a: testpy.run_photos(rec, photos, tmp_path), None)
    assert f"1 of 3 photos were annotated into {tmp_path}, each file whole" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grace_hopper_emotions.jpg"]
