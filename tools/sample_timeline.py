"""Draw the README's timeline picture: test.py --video on a clip made from the sample photo.

    python tools/sample_timeline.py          # writes samples/grace_hopper_timeline.png

The clip (20 s at 15 frames/s, 640x480) moves a camera over samples/grace_hopper.jpg (public domain): it
zooms in on the face, pans off it and back, and dims and brightens the light, so the answers move as a
real clip's do. The clip and the rest of test.py's outputs stay in a temporary folder.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "grace_hopper.jpg"
PICTURE = ROOT / "samples" / "grace_hopper_timeline.png"
SECONDS, FPS, SIZE = 20, 15, (640, 480)


def frame_at(photo, t):
    """The clip's frame at `t` in [0, 1): a crop of the photo, moved and zoomed, in changing light."""
    h, w = photo.shape[:2]
    zoom = 1.0 - 0.45 * np.sin(np.pi * min(t / 0.5, 1.0)) ** 2  # in on the face and out again
    cw, ch = int(w * zoom), int(w * zoom * SIZE[1] / SIZE[0])
    ch = min(ch, h)
    pan = 0.5 + 0.35 * np.sin(2 * np.pi * t) * (t > 0.5)  # the second half pans off the face and back
    x0 = int(np.clip(pan * w - cw / 2, 0, w - cw))
    y0 = int(np.clip(0.35 * h - ch / 2, 0, h - ch))
    frame = cv2.resize(photo[y0 : y0 + ch, x0 : x0 + cw], SIZE, interpolation=cv2.INTER_AREA)
    light = 1.0 + 0.35 * np.sin(6 * np.pi * t)
    return np.clip(frame.astype(np.float32) * light, 0, 255).astype(np.uint8)


def main():
    photo = cv2.imread(str(SAMPLE))
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "grace_hopper.mp4"
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
        for i in range(SECONDS * FPS):
            writer.write(frame_at(photo, i / (SECONDS * FPS)))
        writer.release()
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, str(ROOT / "test.py"), "--video", str(clip), "--out", str(out)], check=True)
        shutil.copyfile(out / "grace_hopper_timeline.png", PICTURE)
    print(f"wrote {PICTURE}")


if __name__ == "__main__":
    formatter = argparse.RawDescriptionHelpFormatter
    argparse.ArgumentParser(description=__doc__, formatter_class=formatter).parse_args()  # --help: what it writes
    main()
