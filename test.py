"""Find every face in photos, videos or a webcam and name each face's emotion; or score the model.

    python test.py samples/grace_hopper.jpg               # annotated copy in outputs/
    python test.py photos/ more.png --json faces.json --csv faces.csv
    python test.py --video clip.mp4                       # annotated video + per-frame table in outputs/
    python test.py --camera 0                             # live window; q quits
    python test.py --no-detect crops/                     # each image is already one face
    python test.py --eval data/fer2013.csv --ferplus data/fer2013new.csv --json scores.json

Faces are found with RetinaFace (or OpenCV's Haar cascade, --detector haar) and cut out framed as
FER2013 frames its faces; all faces of a photo or frame are classified in one batch, each resampled
a quarter pixel off as training's warps resample every face (network.TEST_SHIFT), with the mirror
image averaged in (as train.py validates). In a video each face is followed from frame to frame and
its answer averaged over the last --smooth frames, so a still face keeps its label.
"""

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common import (
    EMOTIONS,
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    REPO_ROOT,
    Interrupted,
    UserError,
    check_ferplus_rows,
    choose_device,
    ferplus_majority,
    ferplus_shares,
    held_out_rows,
    load_checkpoint,
    metrics_from_confusion,
    plot_confusion,
    read_csv,
    read_ferplus,
    run_main,
)
from detection import DETECTORS, FRAMING, PHOTO_DETECT_SIZE, VIDEO_DETECT_SIZE, crop_face, iou, load_detector
from network import NORM_MEAN, NORM_STD, head_names, int8_path, load_int8, model_from_checkpoint, predict_proba

HAAR_FLAGS = ("scale_factor", "min_neighbors", "min_weight", "min_face")
DEFAULT_MODEL = REPO_ROOT / "models" / "Facial_Emotion_Recognizer.pt"
SAMPLE_PHOTO = REPO_ROOT / "samples" / "grace_hopper.jpg"
# One saturated BGR colour per emotion, so the same emotion always has the same box colour; each box is
# drawn over a dark outline, so it shows on light and dark backgrounds alike.
COLORS = {
    "anger": (40, 40, 230),
    "disgust": (30, 160, 30),
    "fear": (200, 60, 200),
    "happy": (0, 210, 255),
    "sad": (230, 130, 30),
    "surprise": (0, 130, 255),
    "neutral": (240, 240, 240),
}
LABEL_MAX_HEIGHT = 0.09  # a label's share of the photo's height at most, unless that is below legible
LABEL_HEIGHT_PER_SCALE = 44  # label height in px per unit of Hershey font scale, text and padding
# Photos, video and camera classify a few faces a call: too little work to share between threads, and a
# second thread stalls whenever another program holds a core (RESULTS.md, "Speed"). --eval's large
# batches use every core.
INFERENCE_THREADS = 1
# Photos, video and camera classify with the model's int8 copy where it was made from the model file loaded:
# one face ~6x faster on a CPU, the same answer for 99% of FER2013's val faces (RESULTS.md, "Speed").
# --eval keeps PyTorch, so the scores it reports are the model's own.
ENGINES = ("auto", "int8", "pytorch")
# The int8 copy runs on two threads that sleep when idle (network.Int8Model): 1.4x one thread's faces/s on an
# idle 2-core machine, and still ahead with another program holding a core (RESULTS.md, "Speed").
INT8_THREADS = 2
# A face in a video keeps its label unless its answer, averaged over this many frames, changes.
SMOOTH_FRAMES = 10
SWITCH_MARGIN = 0.05  # ...and keeps it while the averaged answer for it is within this of the best one
TRACK_IOU = 0.3  # a box in the next frame overlapping this much is the same face...
TRACK_MISSING = 5  # ...and a face unseen for more frames than this is gone


class ImageReadError(Exception):
    """A photo that cannot be read as an image."""


def read_image(path):
    """A photo as 8-bit BGR, EXIF rotation applied; any mode (gray, RGBA, 16-bit, palette) converted."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError("not found")
    if path.is_dir():
        raise ImageReadError("is a folder, not a photo")
    if path.stat().st_size == 0:
        raise ImageReadError("is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # raises on a truncated file
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                gray = (np.clip(arr, 0, top) / top * 255).round().astype(np.uint8)
                rgb = np.repeat(gray[..., None], 3, axis=2)
            else:
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im.convert("RGBA"))
                rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageReadError("is not an image PIL can read (JPEG, PNG, BMP, TIFF, WebP ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"is damaged or truncated ({str(e)[:60]})") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def to_gray(bgr):
    """8-bit gray copy of a BGR image."""
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def _overlap(a, b):
    """Area shared by two (x0, y0, x1, y1) rectangles."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def face_core(box):
    """The part of a face box that must stay visible under its own label: eyes, nose and mouth. The box's top
    quarter (hair, forehead) and its edges may be covered when there is no room outside the box."""
    x, y, w, h = box
    return (x + round(w * 0.1), y + round(h * 0.25), x + round(w * 0.9), y + round(h * 0.92))


def place_label(box, size, taken, image_shape):
    """Where a label of `size` (w, h) goes by `box`: the nearest spot above, under or inside the top of the box,
    shifted sideways or stacked away from it if need be, that covers no other face or label (`taken`) nor its
    own face's eyes and mouth (a box at the photo's top edge); where there is none, the spot that covers least."""
    x, y, w, h = box
    tw, th = size
    height, width = image_shape[:2]
    taken = [*taken, face_core(box)]
    spots = []
    for step in range(6):  # rows ever further from the box
        for ty, extra in ((y - th - step * th, 0), (y + h + step * th, 0.5), (y + step * th, 1)):
            for tx in (x, x + w - tw, x + (w - tw) // 2, x - tw, x + w, x - tw // 2, x + w - tw // 2):
                spots.append((step + extra + abs(tx - x) / max(tw, 1) * 0.25, tx, ty))
    best, best_cost = None, None
    for _, tx, ty in sorted(spots):
        tx, ty = min(max(tx, 0), max(width - tw, 0)), min(max(ty, 0), max(height - th, 0))
        rect = (tx, ty, tx + tw, ty + th)
        cost = sum(_overlap(rect, t) for t in taken)
        if cost == 0:
            return rect
        if best_cost is None or cost < best_cost:
            best, best_cost = rect, cost
    return best


def label_layout(faces, shape):
    """For each face, its label text, rectangle (x0, y0, x1, y1), font scale and stroke: sized by the face and
    the image, placed where it covers no other face and no other label where there is such a spot."""
    height, width = shape[:2]
    smallest = max(0.45, max(height, width) / 1600)  # the smallest text still legible at this image's size
    taken = [(x, y, x + w, y + h) for x, y, w, h in (f["box"] for f in faces)]  # labels must not cover faces...
    layout = []
    for f in faces:
        x, y, w, h = f["box"]
        text = f"{f['emotion']} {f['confidence']:.0%}"
        # Sized by the face, but never taller than LABEL_MAX_HEIGHT of the photo: on a tight crop the label
        # must fit over the forehead rather than cover the face.
        scale = max(smallest, min(2.0, w / 140, height * LABEL_MAX_HEIGHT / LABEL_HEIGHT_PER_SCALE))
        stroke = max(1, round(scale * 1.6))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)
        pad = max(2, round(th / 4))
        own = (x, y, x + w, y + h)
        rect = place_label((x, y, w, h), (tw + 2 * pad, th + base + 2 * pad), [t for t in taken if t != own], shape)
        taken.append(rect)  # ...nor other labels
        layout.append({"text": text, "rect": rect, "scale": scale, "stroke": stroke, "pad": pad, "base": base})
    return layout


def annotate(bgr, faces, note=None):
    """Draw a box and 'emotion confidence' on each face (and `note` top left); returns the drawn copy.

    Lines grow with the image and text with the face (label_layout), so they stay readable on a large
    photo; each box is drawn over a dark outline, so it shows on any background.
    """
    img = bgr.copy()
    line = max(2, round(max(img.shape[:2]) / 400))
    for f in faces:
        x, y, w, h = f["box"]
        cv2.rectangle(img, (x, y), (x + w, y + h), (0, 0, 0), line + 2)
        cv2.rectangle(img, (x, y), (x + w, y + h), COLORS.get(f["emotion"], (0, 255, 0)), line)
    for f, lab in zip(faces, label_layout(faces, img.shape)):
        rect = lab["rect"]
        cv2.rectangle(img, rect[:2], rect[2:], COLORS.get(f["emotion"], (0, 255, 0)), -1)
        cv2.rectangle(img, rect[:2], rect[2:], (0, 0, 0), 1)
        cv2.putText(
            img,
            lab["text"],
            (rect[0] + lab["pad"], rect[3] - lab["pad"] - lab["base"]),
            cv2.FONT_HERSHEY_SIMPLEX,
            lab["scale"],
            (0, 0, 0),
            lab["stroke"],
            cv2.LINE_AA,
        )
    if note:
        cv2.putText(img, note, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(img, note, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2, cv2.LINE_AA)
    return img


class Recognizer:
    """The model and the face detector, loaded once, with the detector's settings."""

    def __init__(
        self,
        model_path,
        device,
        *,
        detect=True,
        detector="retinaface",
        detect_size=PHOTO_DETECT_SIZE,
        haar=None,
        engine="auto",
        threads=None,
        head=None,
    ):
        self.path = Path(model_path)
        ckpt = load_checkpoint(self.path)
        self.device = device
        self.heads = head_names(ckpt)
        self.head = head or self.heads[0]  # the int8 copy answers with the model's own (first) head only
        self.model = model_from_checkpoint(ckpt, device, self.path, head=self.head)
        self.classes = list(ckpt["class_names"])
        self.mean, self.std = ckpt.get("mean", NORM_MEAN), ckpt.get("std", NORM_STD)
        self.int8 = self.load_engine(engine, threads or min(INT8_THREADS, os.cpu_count() or 1))
        self.size = ckpt.get("input_size", IMAGE_SIZE)
        self.detect, self.detector_name = detect, detector
        self.detector_settings = {"max_side": detect_size, **(haar or {})}
        self._detector = None

    def load_engine(self, engine, threads):
        """The model's int8 copy (see ENGINES) on `threads` threads, or None where PyTorch classifies."""
        if engine == "pytorch" or (engine == "auto" and self.device.type != "cpu"):
            return None
        if self.head != self.heads[0]:
            if engine == "int8":
                raise UserError(f"--engine int8: the int8 copy answers with the {self.heads[0]} head; drop --head")
            return None
        int8, why = load_int8(self.path, self.classes, threads=threads)
        if int8 is None and engine == "int8":
            raise UserError(f"--engine int8: {why}; write it with python tools/export_int8.py --model {self.path}")
        if int8 is None and int8_path(self.path).exists():  # a copy that is there but unusable: say so, once
            print(
                f"note: {why}, so PyTorch classifies (slower); rewrite it with "
                f"python tools/export_int8.py --model {self.path}",
                file=sys.stderr,
            )
        return int8

    @property
    def detector(self):
        """The face detector, loaded at first use: scoring a CSV of face crops needs none."""
        if self._detector is None:
            self._detector = load_detector(self.detector_name, **self.detector_settings)
        return self._detector

    def classify(self, faces):
        """Probabilities (N, C) for uint8 face crops (N, 48, 48)."""
        faces = np.asarray(faces, dtype=np.uint8).reshape(-1, self.size, self.size)
        if self.int8 is not None:
            return self.int8.predict_proba(faces)
        return predict_proba(self.model, faces, self.device, self.mean, self.std).numpy()

    def boxes(self, bgr):
        """Face boxes (x, y, w, h) in a BGR image, one per face; the whole image as one box with --no-detect."""
        if not self.detect:
            return [(0, 0, bgr.shape[1], bgr.shape[0])]
        return [b[:4] for b in self.detector.detect(bgr)]

    def crop(self, gray, box):
        """The face in a detector's box, framed as FER2013 frames its faces."""
        return crop_face(gray, box, self.size, FRAMING[self.detector_name] if self.detect else None)

    def faces_in(self, bgr):
        """Every face in a BGR image: [{'box', 'emotion', 'confidence', 'probabilities'}], one batch."""
        boxes = self.boxes(bgr)
        if not boxes:
            return []
        gray = to_gray(bgr)
        probs = self.classify(np.stack([self.crop(gray, b) for b in boxes]))
        return [self.record(b, p, bgr.shape) for b, p in zip(boxes, probs)]

    def record(self, box, p, shape):
        """One face's record; its box in whole pixels, inside the image."""
        height, width = shape[:2]
        x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
        x1, y1 = min(width, round(box[0] + box[2])), min(height, round(box[1] + box[3]))
        k = int(p.argmax())
        return {
            "box": [int(x0), int(y0), int(max(1, x1 - x0)), int(max(1, y1 - y0))],
            "emotion": self.classes[k],
            "confidence": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
        }


class FaceTracker:
    """Follows faces from frame to frame by box overlap and averages each face's answer over `window` frames.

    update() gives each face record an 'id', keeps the frame's own answer as 'raw_emotion' and
    'raw_confidence', and replaces 'emotion', 'confidence' and 'probabilities' by the average.
    """

    def __init__(self, classes, window=SMOOTH_FRAMES, margin=None):
        self.classes, self.window = classes, max(1, window)
        self.margin = (SWITCH_MARGIN if window > 1 else 0.0) if margin is None else margin
        self.tracks, self.next_id = {}, 1

    def update(self, faces):
        pairs = sorted(
            ((iou(f["box"], t["box"]), i, tid) for i, f in enumerate(faces) for tid, t in self.tracks.items()),
            reverse=True,
        )
        matched, used = {}, set()
        for overlap, i, tid in pairs:
            if overlap < TRACK_IOU:
                break
            if i not in matched and tid not in used:
                matched[i] = tid
                used.add(tid)
        for tid in list(self.tracks):
            if tid not in used:
                self.tracks[tid]["missing"] += 1
                if self.tracks[tid]["missing"] > TRACK_MISSING:
                    del self.tracks[tid]
        for i, f in enumerate(faces):
            tid = matched.get(i)
            if tid is None:
                tid, self.next_id = self.next_id, self.next_id + 1
                self.tracks[tid] = {"history": deque(maxlen=self.window)}
            track = self.tracks[tid]
            track.update(box=f["box"], missing=0)
            track["history"].append([f["probabilities"][c] for c in self.classes])
            mean = np.mean(track["history"], axis=0)
            k = int(mean.argmax())
            held = track.get("label")
            if held is not None and mean[held] + self.margin >= mean[k]:
                k = held  # a near tie keeps the label the face has: no flicker between two close answers
            track["label"] = k
            f.update(
                id=tid,
                raw_emotion=f["emotion"],
                raw_confidence=f["confidence"],
                emotion=self.classes[k],
                confidence=float(mean[k]),
                probabilities={c: float(v) for c, v in zip(self.classes, mean)},
            )
        return faces


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def expand_inputs(paths):
    """Photos named directly, plus the images found in named folders (recursively); (photos, skipped files)."""
    photos, skipped = [], 0
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        photos.append(f)
                    else:
                        skipped += 1
        else:
            photos.append(p)  # a missing or bad file is reported when it is read
    return photos, skipped


def output_path(out_dir, src, used, suffix="_emotions", ext=None):
    """<out>/<stem><suffix><ext>, numbered where two inputs share a name."""
    if ext is None:
        ext = src.suffix.lower() if src.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg"
    name, n = f"{src.stem}{suffix}{ext}", 2
    while name in used:
        name, n = f"{src.stem}{suffix}_{n}{ext}", n + 1
    used.add(name)
    return out_dir / name


@contextlib.contextmanager
def written_whole(dest):
    """A temporary path beside `dest` (same extension, so writers pick the format) renamed onto it on success.

    An interrupted or failed write leaves the earlier `dest` as it was and no partial file behind.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.stem}.partial{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_out_dir(out):
    """Create --out, or say why it cannot be."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created ({e.strerror}): pass another --out") from None


def check_writable(path, flag, out=None):
    """Fail early, before any work, if `flag`'s file cannot be written; inside `out` (--out, made later) it can."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file")
    if not path.parent.is_dir() and not (out is not None and path.parent.absolute() == out.absolute()):
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist; create it or pass another path")


def write_records(records, json_path, csv_path, classes):
    """One record per face (a photo with no face: one record with box None) as JSON and/or CSV."""
    if json_path:
        with written_whole(json_path) as tmp:
            tmp.write_text(json.dumps(records, indent=1) + "\n")
    if csv_path:
        extra = [k for k in ("frame", "time", "id") if any(k in r for r in records)]
        raw = [k for k in ("raw_emotion", "raw_confidence") if any(k in r for r in records)]
        cols = ["file", *extra, "x", "y", "w", "h", "emotion", "confidence", *raw, *classes]
        with written_whole(csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                box = r.get("box") or ["", "", "", ""]
                probs = r.get("probabilities") or {}
                w.writerow(
                    [
                        r["file"],
                        *(r.get(k, "") for k in extra),
                        *box,
                        r.get("emotion") or "",
                        f"{r['confidence']:.4f}" if r.get("confidence") is not None else "",
                        *(r.get("raw_emotion", "") if k == "raw_emotion" else f"{r.get(k, 0):.4f}" for k in raw),
                        *(f"{probs[c]:.4f}" if c in probs else "" for c in classes),
                    ]
                )


def run_photos(rec, photos, out):
    """Annotate each photo into `out`; returns (records, number of unreadable photos)."""
    records, failed, used, done = [], 0, set(), 0
    for photo in photos:
        photo = Path(photo)
        try:
            bgr = read_image(photo)
        except ImageReadError as e:
            print(f"error: {photo} {e}; skipped", file=sys.stderr)
            failed += 1
            continue
        dest = output_path(out, photo, used)
        try:
            faces = rec.faces_in(bgr)
            with written_whole(dest) as tmp:
                if not cv2.imwrite(str(tmp), annotate(bgr, faces)):
                    raise UserError(f"could not write {dest}: check --out and free disk space")
        except KeyboardInterrupt:
            raise Interrupted(
                f"{done} of {len(photos)} photos were annotated into {out}, each file whole; "
                "--json and --csv were not written"
            ) from None
        done += 1
        if not faces:
            print(f"{photo}: no face found")
            records.append(
                {"file": str(photo), "box": None, "emotion": None, "confidence": None, "probabilities": None}
            )
        for i, f in enumerate(faces, 1):
            x, y, w, h = f["box"]
            print(f"{photo}: face {i} at ({x}, {y}, {w}x{h}): {f['emotion']} {f['confidence']:.0%}")
            records.append({"file": str(photo), **f})
    return records, failed


def run_stream(rec, capture, name, writer=None, show=None, max_frames=0, smooth=SMOOTH_FRAMES):
    """Annotate every frame of an opened cv2.VideoCapture; returns (records, frames, seconds).

    Each face is followed from frame to frame and its answer averaged over `smooth` frames (FaceTracker).
    `writer(frame)` receives each annotated frame, `show(frame)` too and returns False to stop:
    a video file and a live camera go through this same loop.
    """
    fps_in = capture.get(cv2.CAP_PROP_FPS) or 30.0  # 0 for some cameras
    tracker = FaceTracker(rec.classes, smooth)
    records, n, t0, fps = [], 0, time.perf_counter(), 0.0
    while True:
        ok, frame = capture.read()
        if not ok or (max_frames and n >= max_frames):
            break
        t = time.perf_counter()
        faces = tracker.update(rec.faces_in(frame))
        fps = 0.9 * fps + 0.1 / max(time.perf_counter() - t, 1e-6) if n else 1 / max(time.perf_counter() - t, 1e-6)
        for f in faces:
            records.append({"file": name, "frame": n, "time": round(n / fps_in, 3), **f})
        drawn = annotate(frame, faces, note=f"{fps:.0f} fps" if show else None)
        if writer is not None:
            writer(drawn)
        if show is not None and show(drawn) is False:
            break
        n += 1
    return records, n, time.perf_counter() - t0


def run_video(rec, video, out, smooth=SMOOTH_FRAMES):
    """Annotate a video file into <out>/<stem>_emotions.mp4 and a per-frame table <stem>_frames.csv."""
    if not video.is_file():
        raise UserError(f"--video {video} not found")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise UserError(f"--video {video} cannot be opened as a video (is it MP4, AVI, MOV ...?)")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    dest = out / f"{video.stem}_emotions.mp4"
    try:
        with written_whole(dest) as tmp:  # an interrupted run leaves an earlier video whole
            writer = cv2.VideoWriter(
                str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), cap.get(cv2.CAP_PROP_FPS) or 30.0, (w, h)
            )
            if not writer.isOpened():
                raise UserError(f"cannot write video {dest}: check --out")
            try:
                records, frames, seconds = run_stream(rec, cap, str(video), writer=writer.write, smooth=smooth)
            finally:
                writer.release()
            if frames == 0:
                raise UserError(f"--video {video} has no frames that can be decoded")
    except KeyboardInterrupt:
        raise Interrupted(f"{dest} and its frame table were left as they were") from None
    finally:
        cap.release()
    write_records(records, None, out / f"{video.stem}_frames.csv", rec.classes)
    print(
        f"{video}: {frames} frames, {len(records)} faces, {frames / seconds:.1f} frames/s -> {dest}, "
        f"{out / (video.stem + '_frames.csv')}"
    )
    return records


def run_camera(rec, index, smooth=SMOOTH_FRAMES):
    """A live window on camera `index` with boxes, labels and frames per second; q quits."""
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        raise UserError(f"--camera {index}: no camera found at that index (try 0, or check it is connected)")

    def show(frame):
        cv2.imshow("emotions (q quits)", frame)
        return (cv2.waitKey(1) & 0xFF) != ord("q")

    try:
        run_stream(rec, cap, f"camera {index}", show=show, smooth=smooth)
    except cv2.error:
        raise UserError(
            "--camera needs a display and OpenCV with GUI support: install opencv-python "
            "instead of opencv-python-headless, or record a video and use --video"
        ) from None
    finally:
        cap.release()
        try:
            cv2.destroyAllWindows()
        except cv2.error:
            pass
    return []


# ---------------------------------------------------------------------------------------------
# Evaluation


def load_eval_data(path, rec, ferplus=None):
    """Faces (N, 48, 48), model-order labels, a note, photo counts and FER+'s votes from a FER2013 CSV or a folder tree.

    Folder images of 48x48 or smaller are face crops; larger ones are photos: their largest face is
    classified, or the whole image where none is found (counted in the note). --no-detect: all whole.
    `ferplus`: fer2013new.csv for the CSV's rows, whose votes (N, 10) come back for the faces scored; else None.
    """
    path = Path(path)
    index = {c: i for i, c in enumerate(rec.classes)}
    votes = None
    if ferplus is not None and path.is_dir():
        raise UserError(f"--ferplus goes with --eval of a FER2013 CSV (its votes are for the CSV's rows), not {path}")
    if path.is_file():
        faces, ids, usage, _ = read_csv(path, progress=False)
        if ferplus is not None:
            votes, ferplus_usage = read_ferplus(ferplus)
            check_ferplus_rows(ferplus, path, ferplus_usage, usage, len(faces))
        rows, note = held_out_rows(path, usage)  # a CSV with Usage: never the rows the model learned
        if rows is not None:
            faces, ids = faces[rows], ids[rows]
            votes = votes[rows] if votes is not None else None
        names = [EMOTIONS[i] for i in ids]
    elif path.is_dir():
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [d.name for d in subdirs if d.name not in index]
        if not subdirs or unknown:
            raise UserError(
                f"--eval {path}: expected one folder per emotion the model knows ({', '.join(rec.classes)})"
                + (f", found {unknown[0]!r}" if unknown else "")
            )
        faces, names, counts = [], [], {"photos": 0, "no_face": 0, "several_faces": 0, "crops": 0, "unreadable": 0}
        for d in subdirs:
            for f in sorted(d.rglob("*")):
                if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    bgr = read_image(f)
                except ImageReadError as e:
                    print(f"warning: {f} {e}; skipped", file=sys.stderr)
                    counts["unreadable"] += 1
                    continue
                gray = to_gray(bgr)
                if not rec.detect or max(gray.shape) <= rec.size:  # a face crop already
                    counts["crops"] += 1
                    faces.append(crop_face(gray, (0, 0, gray.shape[1], gray.shape[0]), rec.size))
                else:
                    counts["photos"] += 1
                    boxes = rec.boxes(bgr)
                    counts["no_face"] += not boxes
                    counts["several_faces"] += len(boxes) > 1
                    if boxes:  # the largest face is the photo's subject
                        faces.append(rec.crop(gray, max(boxes, key=lambda b: b[2] * b[3])))
                    else:
                        faces.append(crop_face(gray, (0, 0, gray.shape[1], gray.shape[0]), rec.size))
                names.append(d.name)
        if not faces:
            raise UserError(f"--eval {path} has no readable images in its emotion folders")
        faces = np.stack(faces)
        note = (
            f"{counts['photos']} photos: {counts['no_face']} with no face found (classified whole), "
            f"{counts['several_faces']} with more than one (the largest classified); {counts['crops']} face crops; "
            f"{counts['unreadable']} unreadable files skipped"
        )
    else:
        raise UserError(f"--eval {path} not found: pass a FER2013 CSV or a folder with one subfolder per emotion")
    missing = sorted(set(names) - set(index))
    if missing:
        raise UserError(f"--eval {path} has emotion {missing[0]!r} that the model {rec.path.name} does not know")
    return faces, np.array([index[n] for n in names]), note, (counts if path.is_dir() else {}), votes


def scores(labels, pred, k):
    """metrics_from_confusion of `k`-class labels and predictions (model order)."""
    return metrics_from_confusion(np.bincount(labels * k + pred, minlength=k * k).reshape(k, k))


def ferplus_scores(probs, votes, classes):
    """The model's answers against FER+'s people: accuracy and macro-F1 on the faces more than half of them agree on
    (FER+'s majority faces), and how far the probabilities are from the vote shares (mean KL divergence, in nats, and
    the mean total variation, half the summed absolute difference), over faces with votes for one of our emotions."""
    order = [EMOTIONS.index(c) for c in classes]
    to_model = {e: i for i, e in enumerate(order)}
    majority = ferplus_majority(votes)
    agreed = majority >= 0
    labels = np.array([to_model[e] for e in majority[agreed]], dtype=np.int64)
    m = scores(labels, probs[agreed].argmax(1), len(classes))
    shares = ferplus_shares(votes)[:, order].astype(np.float64)
    voted = shares.sum(1) > 0
    p = np.clip(probs[voted].astype(np.float64), 1e-7, 1.0)
    t = shares[voted]
    kl = (t * (np.log(np.where(t > 0, t, 1.0)) - np.log(p))).sum(1)
    tv = 0.5 * np.abs(t - probs[voted]).sum(1)
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "faces": int(agreed.sum()),
        "kl_divergence": float(kl.mean()),
        "total_variation": float(tv.mean()),
        "vote_faces": int(voted.sum()),
        "confusion": m["confusion"],
        "recall": dict(zip(classes, m["per_class"]["recall"])),
    }


def run_eval(rec, path, out, json_path, ferplus=None):
    """Score the model on labelled data; print a report, save a confusion-matrix PNG, optionally JSON.

    With `ferplus` (fer2013new.csv for a FER2013 CSV) also against FER+'s ten votes a face (ferplus_scores).
    """
    faces, labels, note, counts, votes = load_eval_data(path, rec, ferplus)
    t0 = time.perf_counter()
    probs = rec.classify(faces)
    pred = probs.argmax(1)
    seconds = time.perf_counter() - t0
    m = scores(labels, pred, len(rec.classes))
    acc, macro, pc = m["accuracy"], m["macro_f1"], m["per_class"]
    print(f"{'':>10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}")
    for i, c in enumerate(rec.classes):
        print(f"{c:>10} {pc['precision'][i]:9.4f} {pc['recall'][i]:9.4f} {pc['f1'][i]:9.4f} {pc['support'][i]:9d}")
    print(
        f"{Path(path).name}: accuracy {acc:.4f}, macro-F1 {macro:.4f} on {len(labels)} faces "
        f"({len(labels) / seconds:.0f} faces/s){'; ' + note if note else ''}"
    )
    fp = ferplus_scores(probs, votes, rec.classes) if votes is not None else None
    if fp is not None:
        print(
            f"FER+ majority ({fp['faces']} faces more than half of ten people agree on): accuracy "
            f"{fp['accuracy']:.4f}, macro-F1 {fp['macro_f1']:.4f}; "
            f"against the vote shares of {fp['vote_faces']} faces: KL divergence {fp['kl_divergence']:.3f}, "
            f"total variation {fp['total_variation']:.3f}"
        )
    cm_path = out / f"confusion_{Path(path).name.split('.')[0]}.png"
    plot_confusion(
        m["confusion"],
        rec.classes,
        cm_path,
        True,
        f"{rec.path.name} on {Path(path).name}: recall per class, accuracy {acc:.1%}",
    )
    print(f"confusion matrix: {cm_path}")
    result = {
        "accuracy": acc,
        "macro_f1": macro,
        "n": int(len(labels)),
        "data": str(path),
        "model": str(rec.path),
        "head": rec.head,
        "note": note,
        **counts,
        "confusion": m["confusion"],
        "per_class": {
            c: {
                "precision": pc["precision"][i],
                "recall": pc["recall"][i],
                "f1-score": pc["f1"][i],
                "support": pc["support"][i],
            }
            for i, c in enumerate(rec.classes)
        },
    }
    if fp is not None:
        result["ferplus"] = fp
    if json_path:
        with written_whole(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Find faces and name each face's emotion, or score the model.")
    p.add_argument("inputs", nargs="*", type=Path, help="photos and folders of photos (searched recursively)")
    p.add_argument("--video", type=Path, default=None, metavar="FILE", help="annotate a video file (default: none)")
    p.add_argument(
        "--camera", type=int, default=None, metavar="N", help="live window on camera N; q quits (default: none)"
    )
    p.add_argument(
        "--eval",
        type=Path,
        default=None,
        metavar="PATH",
        help="score the model on a FER2013 CSV or a folder of emotion subfolders (default: off)",
    )
    p.add_argument(
        "--ferplus",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --eval of a FER2013 CSV: also score against FER+'s votes for its rows (fer2013new.csv) "
        "(default: none)",
    )
    p.add_argument(
        "--head",
        default=None,
        help="for a model trained on FER+'s votes, which head answers: ferplus (what most of ten people see) or "
        "fer2013 (as FER2013's one label a face); the int8 copy is of the first, so another classifies with PyTorch "
        "(default: the model's first, ferplus for the shipped model)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "outputs",
        help="folder for annotated images, videos, frame tables and plots (default: outputs/)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="write one record per face (or --eval scores) as JSON (default: none)",
    )
    p.add_argument(
        "--csv", type=Path, default=None, metavar="FILE", help="write one row per face as CSV (default: none)"
    )
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="model file (default: models/Facial_Emotion_Recognizer.pt)"
    )
    p.add_argument(
        "--no-detect",
        dest="detect",
        action="store_false",
        help="treat each image as one face crop (default: detect faces)",
    )
    p.add_argument(
        "--detector",
        choices=DETECTORS,
        default="retinaface",
        help="face detector: RetinaFace, or OpenCV's Haar cascade (default: retinaface)",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=SMOOTH_FRAMES,
        metavar="N",
        help=f"--video/--camera: average each face's answer over N frames; 1 = off (default: {SMOOTH_FRAMES})",
    )
    p.add_argument("--scale-factor", type=float, default=None, help="--detector haar: scale step (default: 1.1)")
    p.add_argument(
        "--min-neighbors",
        type=int,
        default=None,
        help="--detector haar: overlapping detections a face needs (default: 3)",
    )
    p.add_argument(
        "--min-weight",
        type=float,
        default=None,
        help="--detector haar: drop detections whose cascade weight is below this (default: 0.0)",
    )
    p.add_argument(
        "--detect-size",
        type=int,
        default=None,
        help=f"longest side of the copy searched for faces; smaller is faster but misses small faces "
        f"(default: {PHOTO_DETECT_SIZE} for photos, {VIDEO_DETECT_SIZE} for --video and --camera)",
    )
    p.add_argument(
        "--min-face",
        type=float,
        default=None,
        help="--detector haar: smallest face as a fraction of the shorter side, 20 px at least (default: 0.0)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU threads for classifying (default: {INT8_THREADS} for the int8 copy; PyTorch {INFERENCE_THREADS} for "
        "photos, --video and --camera, all cores for --eval, OMP_NUM_THREADS where set)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="int8: classify with the model's int8 copy (<model>.int8.onnx, written by train.py; ~6x faster a face, "
        "the same answer for 99%% of faces); pytorch: with the .pt itself; auto: int8 for photos, --video and --camera "
        "on a CPU where the copy was made from this model file, else pytorch, and pytorch for --eval (default: auto)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="device (default: cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    args = p.parse_args(argv)
    modes = sum([bool(args.inputs), args.video is not None, args.camera is not None, args.eval is not None])
    if modes == 0:
        p.exit(
            2,
            f"{p.prog}: error: name a photo or folder, e.g. python test.py "
            f"{SAMPLE_PHOTO.relative_to(REPO_ROOT)} (or --video, --camera, --eval; --help for all)\n",
        )
    if modes > 1:
        p.error("give photos, --video, --camera or --eval, one at a time")
    haar = {k: getattr(args, k) for k in HAAR_FLAGS if getattr(args, k) is not None}
    if haar and args.detector != "haar":
        p.error(f"--{next(iter(haar)).replace('_', '-')} is a Haar cascade setting: add --detector haar")
    if haar.get("scale_factor", 1.1) <= 1.0:
        p.error("--scale-factor must be above 1.0, e.g. 1.1")
    if haar.get("min_neighbors", 0) < 0:
        p.error("--min-neighbors must be 0 or more")
    if args.smooth < 1:
        p.error("--smooth must be 1 (off) or more frames")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be 1 or more")
    args.haar = haar
    if args.detect_size is None:
        args.detect_size = (
            VIDEO_DETECT_SIZE if (args.video is not None or args.camera is not None) else PHOTO_DETECT_SIZE
        )
    if args.detect_size < 24:
        p.error("--detect-size must be at least 24 (pixels)")
    if args.camera is not None and (args.json or args.csv):
        p.error("--json and --csv go with photos or --video, not --camera")
    if args.eval is not None and args.csv:
        p.error("--csv goes with photos or --video; --eval writes --json")
    if args.ferplus is not None and args.eval is None:
        p.error("--ferplus goes with --eval of a FER2013 CSV")
    return args


def main(args):
    out = args.out if args.camera is None else None  # --camera writes no --out folder
    check_writable(args.json, "--json", out)
    check_writable(args.csv, "--csv", out)
    if args.camera is None:
        prepare_out_dir(args.out)
    device = choose_device(args.device)
    threads = args.threads or (None if args.eval is not None or "OMP_NUM_THREADS" in os.environ else INFERENCE_THREADS)
    if threads:
        torch.set_num_threads(threads)
    rec = Recognizer(
        args.model,
        device,
        detect=args.detect,
        detector=args.detector,
        detect_size=args.detect_size,
        haar=args.haar,
        engine="pytorch" if args.eval is not None and args.engine == "auto" else args.engine,  # scores as reported
        threads=args.threads,
        head=args.head,
    )
    if args.eval is not None:
        return run_eval(rec, args.eval, args.out, args.json, args.ferplus)
    if args.camera is not None:
        return run_camera(rec, args.camera, args.smooth)
    if args.video is not None:
        records, failed, total = run_video(rec, args.video, args.out, args.smooth), 0, 1
    else:
        photos, skipped = expand_inputs(args.inputs)
        if skipped:
            print(f"skipped {skipped} files that are not images ({', '.join(IMAGE_EXTENSIONS)})")
        if not photos:
            raise UserError(f"no images found in {', '.join(map(str, args.inputs))}")
        records, failed = run_photos(rec, photos, args.out)
        total = len(photos)
        n_faces = sum(r["box"] is not None for r in records)
        if failed < total:
            print(f"{total - failed} photos, {n_faces} faces; annotated copies in {args.out}")
    write_records(records, args.json, args.csv, rec.classes)
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    if failed:
        if failed == total:
            none = "the photo could not" if total == 1 else f"none of the {total} photos could"
            raise UserError(f"{none} be read (named above)")
        raise UserError(f"{failed} of {total} photos could not be read (named above); the others were annotated")
    return records


if __name__ == "__main__":
    run_main(main, parse_args())
