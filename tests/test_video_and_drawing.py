"""test.py's video loop (faces followed and their answers smoothed) and its drawing (readable, never covering)."""

import csv
import importlib.util
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED, run_cli
from test_testpy_inputs import SAMPLE, make_video

from ferlite import drawing
from ferlite.names import EMOTIONS
from ferlite.tracking import SMOOTH_FRAMES, FaceTracker, clock, track_summaries

STILL = SHARED / "faces_dev" / "2008_002079.jpg"  # six small faces whose answers are close calls


def face(box, probs):
    p = dict(zip(EMOTIONS, probs))
    k = max(p, key=p.get)
    return {"box": list(box), "emotion": k, "confidence": p[k], "probabilities": p}


def test_tracker_keeps_ids_and_averages_answers():
    tracker = FaceTracker(list(EMOTIONS), window=3, margin=0.0)
    happy, sad = [0, 0, 0, 0.9, 0.1, 0, 0], [0, 0, 0, 0.2, 0.8, 0, 0]
    first = tracker.update([face((10, 10, 50, 50), happy), face((200, 10, 50, 50), happy)])
    assert [f["id"] for f in first] == [1, 2]
    # Next frame: both moved a little, listed the other way round, and a third face appeared.
    second = tracker.update(
        [face((203, 12, 50, 50), sad), face((12, 11, 50, 50), happy), face((400, 300, 40, 40), sad)]
    )
    assert [f["id"] for f in second] == [2, 1, 3]
    assert second[0]["raw_emotion"] == "sad" and second[0]["emotion"] == "happy"  # (0.9 + 0.2) / 2 > (0.1 + 0.8) / 2
    assert second[0]["probabilities"]["happy"] == pytest.approx(0.55)
    third = tracker.update([face((203, 12, 50, 50), sad)])
    assert third[0]["id"] == 2 and third[0]["emotion"] == "sad"  # (0.9 + 0.2 + 0.2) / 3 < (0.1 + 0.8 + 0.8) / 3


def test_a_near_tie_keeps_the_label():
    tracker = FaceTracker(list(EMOTIONS), window=1, margin=0.05)
    tracker.update([face((10, 10, 50, 50), [0, 0, 0, 0.50, 0.48, 0, 0])])
    held = tracker.update([face((10, 10, 50, 50), [0, 0, 0, 0.48, 0.50, 0, 0])])
    assert held[0]["emotion"] == "happy" and held[0]["raw_emotion"] == "sad"
    switched = tracker.update([face((10, 10, 50, 50), [0, 0, 0, 0.30, 0.68, 0, 0])])
    assert switched[0]["emotion"] == "sad"


def test_a_new_shot_starts_every_face_afresh():
    """A face where the last shot's face was is another face after a cut: a new id, an answer of its own. A pan
    of a few pixels a frame, or a slow change of light, is no cut."""
    photo = cv2.resize(cv2.imread(str(SAMPLE)), (320, 240))
    tracker = FaceTracker(list(EMOTIONS), window=5, margin=0.0)
    happy, sad, box = [0, 0, 0, 0.9, 0.1, 0, 0], [0, 0, 0, 0.1, 0.9, 0, 0], (100, 60, 80, 80)
    for i in range(6):  # panning 4 px a frame and brightening: one shot
        frame = cv2.convertScaleAbs(np.roll(photo, 4 * i, axis=1), beta=3 * i)
        assert tracker.update([face(box, happy)], frame)[0]["id"] == 1
    other = cv2.cvtColor(cv2.flip(photo, 1), cv2.COLOR_BGR2HSV)  # another shot: other colours, the face mirrored
    cut = tracker.update([face(box, sad)], other)[0]
    assert cut["id"] == 2 and cut["emotion"] == "sad" and cut["probabilities"]["sad"] == pytest.approx(0.9)
    assert tracker.update([face(box, sad)], other)[0]["id"] == 2
    gray = cv2.cvtColor(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)  # black and white: value alone
    assert tracker.update([face(box, sad)], gray)[0]["id"] == 3  # (a colour cut)
    assert tracker.update([face(box, sad)], cv2.flip(gray, 1))[0]["id"] == 4  # value changes by 44 (of 255)


def test_video_table_has_face_ids_raw_and_smoothed_answers(tiny_model, tmp_path):
    video = make_video(tmp_path / "clip.mp4")
    r = run_cli("--video", video, "--model", tiny_model, "--out", tmp_path / "out", "--csv", tmp_path / "f.csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert rows and {"frame", "id", "emotion", "raw_emotion", "raw_confidence"} <= set(rows[0])
    assert {row["id"] for row in rows} == {"1"}  # one face, followed through every frame


@pytest.mark.skipif(
    not STILL.exists(), reason="../shared/data/faces_dev is absent (present in CI, not on a user's machine)"
)
def test_a_still_face_keeps_its_label():
    """At most one label change per 100 face-frames with smoothing, on a clip where frame-by-frame answers flicker."""
    spec = importlib.util.spec_from_file_location("still_faces", ROOT / "tools" / "still_faces.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rec = tool.testpy.Recognizer(
        ROOT / "models" / "Facial_Emotion_Recognizer.pt", torch.device("cpu"), detect_size=tool.testpy.VIDEO_DETECT_SIZE
    )
    out = tool.measure(rec, STILL)
    raw, smoothed = out[1], out[SMOOTH_FRAMES]
    assert raw[2] == smoothed[2] == 6, "six faces, each followed under one id"
    assert raw[0] / raw[1] > 0.05, raw  # the clip is a hard one: raw answers flicker
    assert smoothed[0] / smoothed[1] <= 0.01, smoothed


def rect_overlap(a, b):
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def test_labels_cover_no_other_face_nor_each_other():
    # A row of touching faces and one under them: the hard case for labels above and below boxes.
    boxes = [(100 + 60 * i, 100, 55, 55) for i in range(5)] + [(160, 160, 55, 55)]
    faces = [face(b, [0, 0, 0, 0.9, 0.1, 0, 0]) for b in boxes]
    layout = drawing.label_layout(faces, (400, 600, 3))
    rects = [lab["rect"] for lab in layout]
    for i, r in enumerate(rects):
        assert all(rect_overlap(r, (x, y, x + w, y + h)) == 0 for j, (x, y, w, h) in enumerate(boxes) if j != i)
        assert all(rect_overlap(r, s) == 0 for s in rects[i + 1 :])
        assert 0 <= r[0] < r[2] <= 600 and 0 <= r[1] < r[3] <= 400


def test_a_label_on_a_tight_crop_leaves_the_face_visible():
    # The face fills the photo, so there is no room above or under its box: the label must shrink to fit over
    # the forehead, not cover the eyes and mouth.
    # The last: a large face at the top edge of a larger photo, whose label goes beside or under it instead.
    for size, box in (
        (200, (0, 0, 200, 200)),
        (120, (4, 0, 110, 120)),
        (900, (30, 0, 840, 900)),
        (1000, (300, 0, 300, 300)),
    ):
        lab = drawing.label_layout([face(box, [0, 0, 0, 0, 0, 1, 0])], (size, size, 3))[0]
        core = drawing.face_core(box)
        assert rect_overlap(lab["rect"], core) == 0, (size, lab["rect"])
        x, y, w, h = box
        assert core[1] - y >= 0.2 * h and core[3] - y >= 0.9 * h  # the core reaches from above the eyes to the chin


def test_text_and_lines_grow_with_the_image():
    small = drawing.label_layout([face((10, 10, 40, 40), [1, 0, 0, 0, 0, 0, 0])], (300, 400, 3))[0]
    large = drawing.label_layout([face((10, 10, 40, 40), [1, 0, 0, 0, 0, 0, 0])], (3000, 4000, 3))[0]
    assert large["scale"] >= 4000 / 1600 - 1e-9 > small["scale"]  # a small face's label stays legible on a big photo
    img = drawing.annotate(np.full((300, 400, 3), 255, np.uint8), [face((100, 100, 80, 80), [0] * 6 + [1])])
    assert (img[100, 120] == 0).all() or (img[99, 120] == 0).all()  # neutral's light box has a dark outline


def test_track_summaries_count_each_faces_frames():
    records = [{"id": 2, "time": t / 10, "emotion": "happy" if t < 3 else "sad"} for t in range(4)]
    records += [{"id": 1, "time": 95.0, "emotion": "neutral"}]
    longest, short = track_summaries(records, list(EMOTIONS))
    assert (longest["id"], longest["frames"], longest["first"], longest["last"]) == (2, 4, 0.0, 0.3)
    assert longest["shares"] == {"happy": 0.75, "sad": 0.25} and list(longest["shares"]) == ["happy", "sad"]
    assert longest["line"] == "face 2, 0:00-0:00, 4 frames: happy 75%, sad 25%"
    assert short["line"] == "face 1, 1:35-1:35, 1 frame: neutral 100%"
    assert clock(3723) == "1:02:03" and clock(59.9) == "0:59"


def test_timeline_has_a_panel_per_face_seen_longest(tmp_path):
    records = [
        {"id": i, "time": t / 10, "emotion": "happy", "probabilities": dict.fromkeys(EMOTIONS, 1 / 7)}
        for i in range(1, 7)
        for t in range(i)
    ]
    summaries = track_summaries(records, list(EMOTIONS))
    heights = []
    for n in (1, drawing.TIMELINE_FACES, 6):
        drawing.plot_timeline(records, summaries[:n], list(EMOTIONS), tmp_path / f"{n}.png", "t")
        heights.append(cv2.imread(str(tmp_path / f"{n}.png")).shape[0])
    assert heights[0] < heights[1] == heights[2]  # one panel, then TIMELINE_FACES at the most


def test_the_readme_timeline_is_of_a_clip_with_one_face_in_every_frame(testpy):
    """tools/sample_timeline.py's clip: 640x480 frames, the sample photo's one face in each, moved and lit
    differently along the clip; the README's picture it made is there, one panel wide."""
    spec = importlib.util.spec_from_file_location("sample_timeline", ROOT / "tools" / "sample_timeline.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    photo = cv2.imread(str(tool.SAMPLE))
    rec = testpy.Recognizer(ROOT / "models" / "Facial_Emotion_Recognizer.pt", torch.device("cpu"))
    frames = [tool.frame_at(photo, t) for t in (0.0, 0.25, 0.5, 0.75, 0.95)]
    assert all(f.shape == (480, 640, 3) for f in frames)
    assert [len(rec.boxes(f)) for f in frames] == [1] * len(frames)
    assert len({round(float(f.mean())) for f in frames}) >= 3  # the light changes
    picture = cv2.imread(str(tool.PICTURE))
    assert picture is not None and picture.shape[1] > 2 * picture.shape[0]  # one face: one wide panel
    assert tool.PICTURE.name in (ROOT / "README.md").read_text()
    before = tool.PICTURE.read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "sample_timeline.py"), "--help"], capture_output=True)
    assert r.returncode == 0 and r.stdout.startswith(b"usage:") and b"samples/grace_hopper_timeline.png" in r.stdout
    assert tool.PICTURE.read_bytes() == before
