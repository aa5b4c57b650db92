"""Label changes per 100 face-frames on still-face clips, each face's raw answer against the smoothed one.

    python tools/still_faces.py ../shared/data/faces_dev/2008_002079.jpg samples/grace_hopper.jpg

Each photo becomes a 150-frame 640x480 clip (25 fps, mp4v) in which nothing moves but sensor noise
(Gaussian, 6 gray levels) and a jitter of a pixel; test.py's video loop then runs on it twice,
with --smooth 1 (each frame's own answer) and with the default smoothing.
"""

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ferlite.detection import VIDEO_DETECT_SIZE, letterbox  # noqa: E402
from ferlite.tracking import SMOOTH_FRAMES  # noqa: E402

spec = importlib.util.spec_from_file_location("fer_test", ROOT / "test.py")  # `import test` is Python's own package
testpy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(testpy)


def still_clip(photo, path, frames=150, noise=6.0, seed=0):
    """A clip of `photo` letterboxed into 640x480 where only noise and a pixel of jitter change."""
    img = cv2.imread(str(photo))
    if img is None:
        raise SystemExit(f"error: {photo} cannot be read as an image")
    canvas = letterbox(img, 640, 480)
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    for _ in range(frames):
        dx, dy = rng.integers(-1, 2, 2)
        frame = np.roll(np.roll(canvas, dx, 1), dy, 0).astype(np.float32) + rng.normal(0, noise, canvas.shape)
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    return path


def label_changes(records):
    """(label changes, face-frames, faces) over the records of one clip, per tracked face."""
    by_face = {}
    for r in records:
        by_face.setdefault(r["id"], []).append(r["emotion"])
    changes = sum(sum(a != b for a, b in zip(v, v[1:])) for v in by_face.values())
    return changes, sum(map(len, by_face.values())), len(by_face)


def measure(rec, photo, smooth_values=(1, SMOOTH_FRAMES)):
    """{smooth: (changes, face-frames, faces)} for a still clip of `photo`."""
    with tempfile.TemporaryDirectory() as tmp:
        clip = still_clip(photo, Path(tmp) / "still.mp4")
        out = {}
        for smooth in smooth_values:
            records, _, _ = testpy.run_stream(rec, cv2.VideoCapture(str(clip)), str(clip), smooth=smooth)
            out[smooth] = label_changes(records)
    return out


def main():
    p = argparse.ArgumentParser(description="Label changes per 100 face-frames on still-face clips.")
    p.add_argument("photos", nargs="+", type=Path, help="photos to turn into still clips")
    p.add_argument("--model", type=Path, default=testpy.DEFAULT_MODEL, help="model file (default: the shipped one)")
    args = p.parse_args()
    rec = testpy.Recognizer(args.model, "cpu", detect_size=VIDEO_DETECT_SIZE)
    for photo in args.photos:
        for smooth, (changes, n, faces) in measure(rec, photo).items():
            print(
                f"{photo.name}: --smooth {smooth}: {changes} changes in {n} face-frames of {faces} faces, "
                f"{100 * changes / max(n, 1):.2f} per 100"
            )


if __name__ == "__main__":
    main()
