"""test.py: reading any photo, annotating faces, bad inputs, and --eval."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, run_in_process, synthetic_faces, write_csv
from PIL import Image

from ferlite import drawing, images
from ferlite.names import EMOTIONS

SAMPLE = ROOT / "samples" / "grace_hopper.jpg"


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_read_image_modes(testpy, tmp_path):
    rgb = Image.open(SAMPLE).convert("RGB").resize((64, 48))
    cases = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "tiny.png": Image.new("RGB", (1, 1), (10, 20, 30)),
    }
    for name, img in cases.items():
        out = images.read_image(save(img, tmp_path / name))
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
    deep = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    out = images.read_image(tmp_path / "deep.png")
    assert out.shape == (48, 64, 3) and out.max() > 200 and out[..., 0].min() == 0  # scaled, not clipped


def test_read_image_gives_blue_green_red_in_every_mode(testpy, tmp_path):
    """The fast path (upright RGB) and the others give OpenCV's channel order and the photo's own pixels."""
    red = Image.new("RGB", (8, 6), (250, 20, 5))
    modes = {"red.png": red, "red.jpg": red, "red_rgba.png": red.convert("RGBA"), "red_p.png": red.quantize()}
    for name, img in modes.items():
        out = images.read_image(save(img, tmp_path / name, **({"quality": 100} if name.endswith("jpg") else {})))
        assert out.flags["C_CONTIGUOUS"] and out.shape == (6, 8, 3), name
        assert np.abs(out[3, 4].astype(int) - (5, 20, 250)).max() <= 6, (name, out[3, 4])
    assert np.array_equal(images.read_image(SAMPLE), cv2.imread(str(SAMPLE)))


def test_read_image_applies_exif_rotation(testpy, tmp_path):
    img = Image.new("RGB", (60, 40), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = save(img, tmp_path / "phone.jpg", exif=exif.tobytes())
    assert images.read_image(path).shape == (60, 40, 3)


@pytest.mark.parametrize(
    "case, message",
    [("missing", "not found"), ("empty", "empty"), ("text", "not an image"), ("truncated", "truncated")],
)
def test_read_image_errors(testpy, tmp_path, case, message):
    path = tmp_path / "bad.jpg"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello")
    elif case == "truncated":
        data = SAMPLE.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(testpy.ImageReadError, match=message):
        images.read_image(path)


def test_photos_annotated_and_errors_reported(tiny_model, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((100, 120), 128, np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    r = run_cli(SAMPLE, blank, broken, "--model", tiny_model, "--out", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert "grace_hopper.jpg: face 1 at" in r.stdout and "blank.png: no face found" in r.stdout
    assert "broken.jpg is empty" in r.stderr and "Traceback" not in r.stderr
    annotated = cv2.imread(str(tmp_path / "out" / "grace_hopper_emotions.jpg"))
    assert annotated.shape == cv2.imread(str(SAMPLE)).shape
    assert (tmp_path / "out" / "blank_emotions.png").exists()


def test_no_face_exits_zero(tiny_model, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((50, 50, 3), np.uint8))
    r = run_cli(blank, "--model", tiny_model, "--out", tmp_path)
    assert r.returncode == 0 and "no face found" in r.stdout


def test_usage_and_bad_flags(testpy, tiny_model, tmp_path):
    r = run_cli()  # as its own process: the exit code and the one line a user sees
    assert r.returncode == 2 and "samples/grace_hopper.jpg" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_in_process(testpy, SAMPLE, "--model", tiny_model, "--out", blocker)
    assert r.returncode == 1 and "--out" in r.stderr and "is a file" in r.stderr and "Traceback" not in r.stderr
    for model, needle in [(tmp_path / "none.pt", "not found"), (blocker, "damaged")]:
        r = run_in_process(testpy, SAMPLE, "--model", model)
        assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_csv_and_folder(testpy, tiny_model, tmp_path, preparation):
    faces, labels = synthetic_faces(21)
    csv = write_csv(tmp_path / "v.csv", faces, labels)
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    res = testpy.run_eval(rec, csv, tmp_path, tmp_path / "s.json")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["n"] == 21 and 0 <= saved["accuracy"] <= 1 and set(saved["per_class"]) == set(EMOTIONS)
    assert saved["accuracy"] == res["accuracy"]
    # the same faces as a folder of crops score the same, within JPEG's rounding
    preparation.main(preparation.parse_args(["--csv", str(csv), "--out", str(tmp_path / "ds"), "--no-progress"]))
    res2 = testpy.run_eval(rec, tmp_path / "ds" / "Train data", tmp_path, None)
    assert res2["n"] == 21
    probs = rec.classify(faces)
    assert (
        abs(res["accuracy"] - float((probs.argmax(1) == [rec.classes.index(EMOTIONS[y]) for y in labels]).mean()))
        < 1e-9
    )


def test_eval_writes_the_mistakes_sheet_it_reports_for_a_csv_and_a_folder(testpy, tiny_model, tmp_path, preparation):
    """The sheet shows, per true emotion, the most confident wrong answers; --json lists what it shows."""
    faces, labels = synthetic_faces(70, seed=4)
    csv = write_csv(tmp_path / "v.csv", faces, labels)
    preparation.main(preparation.parse_args(["--csv", str(csv), "--out", str(tmp_path / "ds"), "--no-progress"]))
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    for source in (csv, tmp_path / "ds" / "Train data"):
        out = tmp_path / source.stem
        out.mkdir()
        res = testpy.run_eval(rec, source, out, out / "s.json")
        saved = json.loads((out / "s.json").read_text())
        assert saved["mistakes"] == res["mistakes"] and Path(saved["mistakes"]["sheet"]).parent == out
        sheet = cv2.imread(saved["mistakes"]["sheet"])
        assert sheet.shape[0] > 7 * drawing.SHEET_CELL and sheet.shape[1] > drawing.SHEET_PER_CLASS * 96
        shown = saved["mistakes"]["shown"]
        assert shown and all(s["true"] != s["predicted"] for s in shown)
        for emotion, v in res[
            "per_class"
        ].items():  # per row: its mistakes, at most SHEET_PER_CLASS, most confident first
            row = [s["confidence"] for s in shown if s["true"] == emotion]
            wrong = round(v["support"] * (1 - v["recall"]))
            assert len(row) == min(wrong, drawing.SHEET_PER_CLASS) and row == sorted(row, reverse=True), emotion
        if source.is_dir():
            assert all(Path(s["file"]).parent.name == s["true"] for s in shown)
        else:  # the faces it names are the CSV's, answered as the model answers them
            probs = rec.classify(faces[[s["index"] for s in shown]])
            assert [rec.classes[k] for k in probs.argmax(1)] == [s["predicted"] for s in shown]
            assert [EMOTIONS[labels[s["index"]]] for s in shown] == [s["true"] for s in shown]
