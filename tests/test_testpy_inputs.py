"""test.py as an everyday tool: folders, structured output, video, camera, --detector none, detection quality."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED, run_cli, run_in_process

from ferlite import detection, images
from ferlite.names import EMOTIONS

SAMPLE = ROOT / "samples" / "grace_hopper.jpg"
FACES_DEV = SHARED / "faces_dev"


def test_folders_json_and_csv(tiny_model, tmp_path):
    photos = tmp_path / "photos" / "nested"
    photos.mkdir(parents=True)
    (photos / "hopper.jpg").write_bytes(SAMPLE.read_bytes())
    cv2.imwrite(str(tmp_path / "photos" / "blank.png"), np.zeros((60, 80), np.uint8))
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    r = run_cli(
        tmp_path / "photos",
        "--model",
        tiny_model,
        "--out",
        tmp_path / "out",
        "--json",
        tmp_path / "f.json",
        "--csv",
        tmp_path / "f.csv",
    )
    assert r.returncode == 0, r.stderr
    assert "skipped 1 files that are not images" in r.stdout and "2 photos, 1 faces" in r.stdout
    records = json.loads((tmp_path / "f.json").read_text())
    assert [Path_name(r["file"]) for r in records] == ["blank.png", "hopper.jpg"]
    blank, face = records
    assert blank["box"] is None
    assert len(face["box"]) == 4 and face["emotion"] in EMOTIONS and set(face["probabilities"]) == set(EMOTIONS)
    assert abs(sum(face["probabilities"].values()) - 1) < 1e-3 and face["confidence"] == max(
        face["probabilities"].values()
    )
    rows = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert len(rows) == 2 and rows[1]["emotion"] == face["emotion"] and set(EMOTIONS) <= set(rows[0])


def test_json_and_csv_inside_the_out_folder_it_creates(tiny_model, tmp_path):
    out = tmp_path / "new" / "out"
    r = run_cli(SAMPLE, "--model", tiny_model, "--out", out, "--json", out / "f.json", "--csv", out / "f.csv")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "f.json").read_text())[0]["emotion"] in EMOTIONS and (out / "f.csv").is_file()
    r = run_cli(SAMPLE, "--model", tiny_model, "--out", out, "--json", tmp_path / "elsewhere" / "f.json")
    assert r.returncode == 1 and "folder" in r.stderr and "does not exist" in r.stderr


@pytest.mark.parametrize("n", [1, 2])
def test_no_photo_readable_says_so(testpy, tiny_model, tmp_path, n):
    bad = []
    for i in range(n):
        bad.append(tmp_path / f"broken{i}.jpg")
        bad[-1].write_bytes(b"not a jpeg")
    r = run_in_process(testpy, *bad, "--model", tiny_model, "--out", tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert ("the photo could not be read" if n == 1 else f"none of the {n} photos could be read") in r.stderr
    assert "the others were annotated" not in r.stderr and "annotated copies" not in r.stdout


def Path_name(p):
    return p.replace("\\", "/").rsplit("/", 1)[-1]


def test_detector_none_treats_image_as_a_face(tiny_model, tmp_path):
    crop = tmp_path / "crop.png"
    cv2.imwrite(str(crop), np.full((48, 60), 90, np.uint8))
    out, js = tmp_path / "out", tmp_path / "c.json"
    r = run_cli(crop, "--detector", "none", "--model", tiny_model, "--out", out, "--json", js)
    assert r.returncode == 0, r.stderr
    assert [f["box"] for f in json.loads(js.read_text())] == [[0, 0, 60, 48]]


def make_video(path, frames=12, size=(320, 240)):
    """A short video of the sample photo, letterboxed into `size`, drifting a pixel a frame."""
    photo = cv2.imread(str(SAMPLE))
    scale = min(size[0] / photo.shape[1], size[1] / photo.shape[0])
    photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    canvas[: photo.shape[0], : photo.shape[1]] = photo
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for i in range(frames):
        w.write(np.roll(canvas, i, axis=1))
    w.release()
    return path


def test_video_writes_annotated_video_and_frame_table(tiny_model, tmp_path):
    video = make_video(tmp_path / "clip.mp4")
    r = run_cli("--video", video, "--model", tiny_model, "--out", tmp_path / "out", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip_emotions.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    rows = list(csv.DictReader(open(tmp_path / "out" / "clip_frames.csv")))
    saved = json.loads((tmp_path / "v.json").read_text())
    records = saved["frames"]
    assert len(rows) == len(records) >= 10  # the face is found in (nearly) every frame
    assert records[0]["frame"] == 0 and records[-1]["time"] == pytest.approx(records[-1]["frame"] / 10, abs=1e-3)
    # The summary, printed and in --json, counts what the frame table says, face by face.
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row["emotion"])
    assert [str(f["id"]) for f in saved["faces"]] == sorted(by_id, key=lambda i: -len(by_id[i]))
    for face in saved["faces"]:
        seen = by_id[str(face["id"])]
        assert face["frames"] == len(seen) and sum(face["shares"].values()) == pytest.approx(1)
        assert face["shares"] == {e: pytest.approx(seen.count(e) / len(seen)) for e in set(seen)}
        assert face["line"] in r.stdout and f"{len(seen):,} frames" in face["line"]
    timeline = cv2.imread(str(tmp_path / "out" / "clip_timeline.png"))
    assert timeline is not None and timeline.shape[1] > 800 and "timeline: " in r.stdout


def test_camera_path_runs_on_a_recorded_video(testpy, tiny_model, tmp_path):
    """--camera's loop (run_stream with a show callback) on a recorded video: no camera or display here."""
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    shown = []

    def show(frame):
        shown.append(frame)
        return len(shown) < 3  # the user pressing q after three frames

    cap = cv2.VideoCapture(str(make_video(tmp_path / "clip.mp4")))
    records, frames, _ = testpy.run_stream(rec, cap, "camera", show=show)
    assert len(shown) == 3 and shown[0].shape == (240, 320, 3) and records and all(r["frame"] < 3 for r in records)


def test_camera_missing_is_a_clear_error(testpy, tiny_model):
    r = run_in_process(testpy, "--camera", "7", "--model", tiny_model)
    assert r.returncode == 1 and "--camera 7" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--video", "missing.mp4"], "not found"),
        (["x.jpg", "--no-detect"], "--no-detect is gone: use --detector none"),
        (["x.jpg", "--video", "y.mp4"], "one at a time"),
        (["x.jpg", "--detect-size", "10"], "--detect-size must be at least 24"),
    ],
)
def test_flag_errors(testpy, tiny_model, tmp_path, args, needle):
    r = run_in_process(testpy, *args, "--model", tiny_model, "--out", tmp_path)
    assert r.returncode in (1, 2) and needle in r.stderr and "Traceback" not in r.stderr


def test_damaged_video_is_named_as_the_input(testpy, tiny_model, tmp_path):
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(b"x")  # no image or video: OpenCV opens it, with frames of size 0
    r = run_in_process(testpy, "--video", damaged, "--model", tiny_model, "--out", tmp_path / "out")
    assert r.returncode == 1 and f"--video {damaged} cannot be opened as a video" in r.stderr
    assert "Traceback" not in r.stderr


def test_huge_photo_is_searched_downscaled(testpy, tiny_model, tmp_path):
    big = np.full((8000, 8000, 3), 200, np.uint8)
    hopper = cv2.imread(str(SAMPLE))
    big[3000 : 3000 + hopper.shape[0] * 4, 3000 : 3000 + hopper.shape[1] * 4] = cv2.resize(hopper, None, fx=4, fy=4)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), big)
    rec = testpy.Recognizer(tiny_model, torch.device("cpu"))
    faces = rec.faces_in(images.read_image(path))
    assert len(faces) == 1 and faces[0]["box"][0] > 3000 and faces[0]["box"][2] > 500


def iou(a, b):
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def detection_scores(testpy, name, **settings):
    """(faces found, faces, false boxes, duplicate boxes) on faces_dev's hand-drawn boxes, a hit being IoU >= 0.3."""
    boxes = {}
    for r in csv.DictReader(open(FACES_DEV / "boxes.csv")):
        boxes.setdefault(r["image"], []).append([int(r[k]) for k in ("left", "top", "width", "height")])
    detector = detection.load_detector(name, **settings)
    found = false = duplicate = 0
    for image, truth in boxes.items():
        matched = set()
        for d in detector.detect(images.read_image(FACES_DEV / image)):
            j = max(range(len(truth)), key=lambda k: iou(d, truth[k]))
            if iou(d, truth[j]) < 0.3:
                false += 1
            elif j in matched:
                duplicate += 1
            else:
                matched.add(j)
                found += 1
    return found, sum(map(len, boxes.values())), false, duplicate


@pytest.mark.skipif(
    not (FACES_DEV / "boxes.csv").exists(),
    reason="../shared/data/faces_dev with hand-drawn boxes is absent (present in CI, not on a user's machine)",
)
def test_detection_quality_holds(testpy):
    """RetinaFace finds all 18 hand-boxed faces, nothing else, one box each; Haar (merged) 17 and nothing else."""
    assert detection_scores(testpy, "retinaface") == (18, 18, 0, 0)
    assert detection_scores(testpy, "haar") == (17, 18, 0, 0)


@pytest.mark.skipif(
    not (FACES_DEV / "bald_guys.jpg").exists(), reason="../shared/data/faces_dev is absent (present in CI)"
)
def test_collage_has_one_box_per_face(testpy):
    """bald_guys.jpg: 24 faces by a person's count; before merging, Haar drew two boxes on some of them."""
    boxes = detection.load_detector("retinaface").detect(images.read_image(FACES_DEV / "bald_guys.jpg"))
    assert len(boxes) == 24
    assert all(iou(a, b) < 0.3 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


WILD_DEV = SHARED / "wild_dev"


@pytest.mark.skipif(
    not WILD_DEV.exists(), reason="../shared/data/wild_dev is absent (present in CI, not on a user's machine)"
)
def test_eval_of_photos_counts_faces_and_finds_one_in_nearly_every_photo(testpy, tmp_path):
    """wild_dev: exactly one face in at least 95% of the photos over 48 px; --eval reports the counts."""
    rec = testpy.Recognizer(ROOT / "models" / "Facial_Emotion_Recognizer.pt", torch.device("cpu"))
    res = testpy.run_eval(rec, WILD_DEV, tmp_path, tmp_path / "w.json")
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["photos"] == 456 and saved["crops"] == 9 and saved["n"] == 465
    exactly_one = saved["photos"] - saved["no_face"] - saved["several_faces"]
    assert exactly_one / saved["photos"] >= 0.95, saved
    assert res["accuracy"] >= 0.52, res["accuracy"]  # the figure in RESULTS.md, less a few photos of slack


@pytest.mark.parametrize("flag", ["--min-neighbors", "--scale-factor=1.2", "--min-weight", "--min-face"])
def test_the_haar_tuning_flags_are_gone_with_a_word(testpy, capsys, flag):
    with pytest.raises(SystemExit):
        testpy.parse_args(["x.jpg", "--detector", "haar", flag] + ([] if "=" in flag else ["5"]))
    assert f"{flag.split('=')[0]} is gone: --detector haar searches with the same settings" in capsys.readouterr().err


def test_detect_size_defaults_by_mode(testpy):
    assert testpy.parse_args(["x.jpg"]).detect_size == testpy.PHOTO_DETECT_SIZE
    assert testpy.parse_args(["--video", "v.mp4"]).detect_size == testpy.VIDEO_DETECT_SIZE
    assert testpy.parse_args(["--camera", "0"]).detect_size == testpy.VIDEO_DETECT_SIZE
    assert testpy.parse_args(["--video", "v.mp4", "--detect-size", "640"]).detect_size == 640
