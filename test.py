"""Find every face in photos, videos or a webcam and name each face's emotion; or score the model.

    python test.py samples/grace_hopper.jpg               # annotated copy in outputs/
    python test.py photos/ more.png --json faces.json --csv faces.csv
    python test.py --video clip.mp4                       # annotated video + per-frame table in outputs/
    python test.py --camera 0                             # live window; q quits
    python test.py --no-detect crops/                     # each image is already one face
    python test.py --eval ../shared/data/fer2013/val.csv.gz --json val_scores.json

Faces are found with OpenCV's frontal-face Haar cascade; all faces of a photo or frame are
classified in one batch, each resampled a quarter pixel off as training's warps resample every
face (common.TEST_SHIFT), with the mirror image averaged in (as train.py validates).
"""
import argparse
import contextlib
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import (
    EMOTIONS,
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    REPO_ROOT,
    Interrupted,
    UserError,
    choose_device,
    held_out_rows,
    load_checkpoint,
    metrics_from_confusion,
    plot_confusion,
    read_csv,
    run_main,
)
from detection import crop_face, detect_faces, load_face_detector
from network import model_from_checkpoint, predict_proba

DEFAULT_MODEL = REPO_ROOT / "models" / "Facial_Emotion_Recognizer.pt"
SAMPLE_PHOTO = REPO_ROOT / "samples" / "grace_hopper.jpg"
# The detector searches a copy whose longest side is at most this; it finds faces down to about 20 px
# there, so 1/64 of a photo's longest side, 1/16 of a video frame's (which keeps 640x480 video above 30 fps).
PHOTO_DETECT_SIZE, VIDEO_DETECT_SIZE = 1280, 320
# One BGR colour per emotion, so the same emotion always has the same box colour.
COLORS = {"anger": (40, 40, 220), "disgust": (40, 140, 40), "fear": (160, 60, 160), "happy": (0, 200, 255),
          "sad": (200, 120, 40), "surprise": (0, 140, 255), "neutral": (190, 190, 190)}


class ImageReadError(Exception):
    """A photo that cannot be read as an image."""


def read_image(path):
    """A photo as 8-bit BGR, EXIF rotation applied; any mode (gray, RGBA, 16-bit, palette) converted."""
    from PIL import Image, ImageOps, UnidentifiedImageError

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
    import cv2

    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def annotate(bgr, faces, note=None):
    """Draw a box and 'emotion confidence' on each face (and `note` top left); returns the drawn copy."""
    import cv2

    img = bgr.copy()
    thick = max(1, round(max(img.shape[:2]) / 500))
    for f in faces:
        x, y, w, h = f["box"]
        color = COLORS.get(f["emotion"], (0, 255, 0))
        cv2.rectangle(img, (x, y), (x + w, y + h), color, thick)
        label = f"{f['emotion']} {f['confidence']:.0%}"
        scale = max(0.4, min(2.0, w / 160))
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y - 4 if y - th - base - 4 >= 0 else y + h + th + 4
        cv2.rectangle(img, (x, ty - th - base), (x + tw + 4, ty + base), color, -1)
        cv2.putText(img, label, (x + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    if note:
        cv2.putText(img, note, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2, cv2.LINE_AA)
    return img


class Recognizer:
    """The model and the face detector, loaded once, with the detector's settings."""

    def __init__(self, model_path, device, detect=True, scale_factor=1.1, min_neighbors=3, min_weight=0.0, min_face=0.0,
                 detect_size=PHOTO_DETECT_SIZE):
        self.path = Path(model_path)
        ckpt = load_checkpoint(self.path)
        self.device = device
        self.model = model_from_checkpoint(ckpt, device, self.path)
        self.classes = list(ckpt["class_names"])
        self.mean, self.std = ckpt.get("mean", 0.5), ckpt.get("std", 0.25)
        self.size = ckpt.get("input_size", IMAGE_SIZE)
        self.detect = detect
        self.detector_args = {"scale_factor": scale_factor, "min_neighbors": min_neighbors, "min_weight": min_weight,
                              "min_size_frac": min_face, "max_side": detect_size}
        self._cascade = None

    @property
    def cascade(self):
        """The face detector, loaded at first use: scoring a CSV of face crops needs none."""
        if self._cascade is None:
            self._cascade = load_face_detector()
        return self._cascade

    def classify(self, faces):
        """Probabilities (N, C) for uint8 face crops (N, 48, 48)."""
        return predict_proba(self.model, np.asarray(faces, dtype=np.uint8).reshape(-1, self.size, self.size),
                             self.device, self.mean, self.std).numpy()

    def boxes(self, gray):
        """Face boxes in a gray image; the whole image as one box with --no-detect."""
        if not self.detect:
            return [(0, 0, gray.shape[1], gray.shape[0])]
        return detect_faces(self.cascade, gray, **self.detector_args)

    def faces_in(self, bgr):
        """Every face in a BGR image: [{'box', 'emotion', 'confidence', 'probabilities'}], one batch."""
        gray = to_gray(bgr)
        boxes = self.boxes(gray)
        if not boxes:
            return []
        probs = self.classify(np.stack([crop_face(gray, b, self.size) for b in boxes]))
        return [self.record(b, p) for b, p in zip(boxes, probs)]

    def record(self, box, p):
        k = int(p.argmax())
        return {"box": [int(v) for v in box], "emotion": self.classes[k], "confidence": float(p[k]),
                "probabilities": {c: float(v) for c, v in zip(self.classes, p)}}


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


def check_writable(path, flag):
    """Fail early, before any work, if `flag`'s file cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist; create it or pass another path")


def write_records(records, json_path, csv_path, classes):
    """One record per face (a photo with no face: one record with box None) as JSON and/or CSV."""
    if json_path:
        with written_whole(json_path) as tmp:
            tmp.write_text(json.dumps(records, indent=1) + "\n")
    if csv_path:
        extra = [k for k in ("frame", "time") if any(k in r for r in records)]
        cols = ["file", *extra, "x", "y", "w", "h", "emotion", "confidence", *classes]
        with written_whole(csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                box = r.get("box") or ["", "", "", ""]
                probs = r.get("probabilities") or {}
                w.writerow([r["file"], *(r.get(k, "") for k in extra), *box, r.get("emotion") or "",
                            f"{r['confidence']:.4f}" if r.get("confidence") is not None else "",
                            *(f"{probs[c]:.4f}" if c in probs else "" for c in classes)])


def run_photos(rec, photos, out):
    """Annotate each photo into `out`; returns (records, number of unreadable photos)."""
    import cv2

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
            raise Interrupted(f"{done} of {len(photos)} photos were annotated into {out}, each file whole; "
                              "--json and --csv were not written") from None
        done += 1
        if not faces:
            print(f"{photo}: no face found")
            records.append({"file": str(photo), "box": None, "emotion": None, "confidence": None, "probabilities": None})
        for i, f in enumerate(faces, 1):
            x, y, w, h = f["box"]
            print(f"{photo}: face {i} at ({x}, {y}, {w}x{h}): {f['emotion']} {f['confidence']:.0%}")
            records.append({"file": str(photo), **f})
    return records, failed


def run_stream(rec, capture, name, writer=None, show=None, max_frames=0):
    """Annotate every frame of an opened cv2.VideoCapture; returns (records, frames, seconds).

    `writer(frame)` receives each annotated frame, `show(frame)` too and returns False to stop:
    a video file and a live camera go through this same loop.
    """
    fps_in = capture.get(5) or 30.0  # CAP_PROP_FPS; 0 for some cameras
    records, n, t0, fps = [], 0, time.perf_counter(), 0.0
    while True:
        ok, frame = capture.read()
        if not ok or (max_frames and n >= max_frames):
            break
        t = time.perf_counter()
        faces = rec.faces_in(frame)
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


def run_video(rec, video, out):
    """Annotate a video file into <out>/<stem>_emotions.mp4 and a per-frame table <stem>_frames.csv."""
    import cv2

    if not video.is_file():
        raise UserError(f"--video {video} not found")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise UserError(f"--video {video} cannot be opened as a video (is it MP4, AVI, MOV ...?)")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    dest = out / f"{video.stem}_emotions.mp4"
    try:
        with written_whole(dest) as tmp:  # an interrupted run leaves an earlier video whole
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), cap.get(cv2.CAP_PROP_FPS) or 30.0, (w, h))
            if not writer.isOpened():
                raise UserError(f"cannot write video {dest}: check --out")
            try:
                records, frames, seconds = run_stream(rec, cap, str(video), writer=writer.write)
            finally:
                writer.release()
            if frames == 0:
                raise UserError(f"--video {video} has no frames that can be decoded")
    except KeyboardInterrupt:
        raise Interrupted(f"{dest} and its frame table were left as they were") from None
    finally:
        cap.release()
    write_records(records, None, out / f"{video.stem}_frames.csv", rec.classes)
    print(f"{video}: {frames} frames, {len(records)} faces, {frames / seconds:.1f} frames/s -> {dest}, "
          f"{out / (video.stem + '_frames.csv')}")
    return records


def run_camera(rec, index):
    """A live window on camera `index` with boxes, labels and frames per second; q quits."""
    import cv2

    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        raise UserError(f"--camera {index}: no camera found at that index (try 0, or check it is connected)")

    def show(frame):
        cv2.imshow("emotions (q quits)", frame)
        return (cv2.waitKey(1) & 0xFF) != ord("q")

    try:
        run_stream(rec, cap, f"camera {index}", show=show)
    except cv2.error:
        raise UserError("--camera needs a display and OpenCV with GUI support: install opencv-python "
                        "instead of opencv-python-headless, or record a video and use --video") from None
    finally:
        cap.release()
        try:
            cv2.destroyAllWindows()
        except cv2.error:
            pass
    return []


# ---------------------------------------------------------------------------------------------
# Evaluation


def load_eval_data(path, rec):
    """Faces (N, 48, 48), model-order labels and a note from a FER2013 CSV or an ImageFolder-like folder.

    Folder images of 48x48 or smaller are face crops; larger ones are photos: their largest face is
    classified, or the whole image where none is found (counted in the note). --no-detect: all whole.
    """
    path = Path(path)
    index = {c: i for i, c in enumerate(rec.classes)}
    if path.is_file():
        faces, ids, usage, _ = read_csv(path, progress=False)
        rows, note = held_out_rows(path, usage)  # a CSV with Usage: never the rows the model learned
        if rows is not None:
            faces, ids = faces[rows], ids[rows]
        names = [EMOTIONS[i] for i in ids]
    elif path.is_dir():
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [d.name for d in subdirs if d.name not in index]
        if not subdirs or unknown:
            raise UserError(f"--eval {path}: expected one folder per emotion the model knows ({', '.join(rec.classes)})"
                            + (f", found {unknown[0]!r}" if unknown else ""))
        faces, names, fallback, bad = [], [], 0, 0
        for d in subdirs:
            for f in sorted(d.rglob("*")):
                if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    gray = to_gray(read_image(f))
                except ImageReadError as e:
                    print(f"warning: {f} {e}; skipped", file=sys.stderr)
                    bad += 1
                    continue
                box = (0, 0, gray.shape[1], gray.shape[0])
                if rec.detect and max(gray.shape) > rec.size:
                    boxes = rec.boxes(gray)
                    if boxes:
                        box = max(boxes, key=lambda b: b[2] * b[3])
                    else:
                        fallback += 1
                faces.append(crop_face(gray, box, rec.size))
                names.append(d.name)
        if not faces:
            raise UserError(f"--eval {path} has no readable images in its emotion folders")
        faces = np.stack(faces)
        note = f"{fallback} photos with no face found were classified whole; {bad} unreadable files skipped"
    else:
        raise UserError(f"--eval {path} not found: pass a FER2013 CSV or a folder with one subfolder per emotion")
    missing = sorted(set(names) - set(index))
    if missing:
        raise UserError(f"--eval {path} has emotion {missing[0]!r} that the model {rec.path.name} does not know")
    return faces, np.array([index[n] for n in names]), note


def run_eval(rec, path, out, json_path):
    """Score the model on labelled data; print a report, save a confusion-matrix PNG, optionally JSON."""
    faces, labels, note = load_eval_data(path, rec)
    t0 = time.perf_counter()
    pred = rec.classify(faces).argmax(1)
    seconds = time.perf_counter() - t0
    k = len(rec.classes)
    m = metrics_from_confusion(np.bincount(labels * k + pred, minlength=k * k).reshape(k, k))
    acc, macro, pc = m["accuracy"], m["macro_f1"], m["per_class"]
    print(f"{'':>10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}")
    for i, c in enumerate(rec.classes):
        print(f"{c:>10} {pc['precision'][i]:9.4f} {pc['recall'][i]:9.4f} {pc['f1'][i]:9.4f} {pc['support'][i]:9d}")
    print(f"{Path(path).name}: accuracy {acc:.4f}, macro-F1 {macro:.4f} on {len(labels)} faces "
          f"({len(labels) / seconds:.0f} faces/s){'; ' + note if note else ''}")
    cm_path = out / f"confusion_{Path(path).name.split('.')[0]}.png"
    plot_confusion(m["confusion"], rec.classes, cm_path, True,
                   f"{rec.path.name} on {Path(path).name}: recall per class, accuracy {acc:.1%}")
    print(f"confusion matrix: {cm_path}")
    result = {"accuracy": acc, "macro_f1": macro, "n": int(len(labels)), "data": str(path), "model": str(rec.path),
              "note": note, "confusion": m["confusion"],
              "per_class": {c: {"precision": pc["precision"][i], "recall": pc["recall"][i], "f1-score": pc["f1"][i],
                                "support": pc["support"][i]} for i, c in enumerate(rec.classes)}}
    if json_path:
        with written_whole(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Find faces and name each face's emotion, or score the model.")
    p.add_argument("inputs", nargs="*", type=Path, help="photos and folders of photos (searched recursively)")
    p.add_argument("--video", type=Path, default=None, metavar="FILE", help="annotate a video file (default: none)")
    p.add_argument("--camera", type=int, default=None, metavar="N", help="live window on camera N; q quits (default: none)")
    p.add_argument("--eval", type=Path, default=None, metavar="PATH",
                   help="score the model on a FER2013 CSV or a folder of emotion subfolders (default: off)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "outputs",
                   help="folder for annotated images, videos, frame tables and plots (default: outputs/)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write one record per face (or --eval scores) as JSON (default: none)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE", help="write one row per face as CSV (default: none)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: models/Facial_Emotion_Recognizer.pt)")
    p.add_argument("--no-detect", dest="detect", action="store_false", help="treat each image as one face crop (default: detect faces)")
    p.add_argument("--scale-factor", type=float, default=1.1, help="Haar cascade's scale step (default: 1.1)")
    p.add_argument("--min-neighbors", type=int, default=3, help="Haar cascade's overlapping detections per face (default: 3)")
    p.add_argument("--min-weight", type=float, default=0.0, help="drop detections whose cascade weight is below this (default: 0.0)")
    p.add_argument("--detect-size", type=int, default=None,
                   help=f"longest side of the copy searched for faces; smaller is faster but misses small faces "
                        f"(default: {PHOTO_DETECT_SIZE} for photos, {VIDEO_DETECT_SIZE} for --video and --camera)")
    p.add_argument("--min-face", type=float, default=0.0,
                   help="smallest face as a fraction of the photo's shorter side; 20 px at least (default: 0.0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="device (default: cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    args = p.parse_args(argv)
    modes = sum([bool(args.inputs), args.video is not None, args.camera is not None, args.eval is not None])
    if modes == 0:
        p.exit(2, f"{p.prog}: error: name a photo or folder, e.g. python test.py "
                  f"{SAMPLE_PHOTO.relative_to(REPO_ROOT)} (or --video, --camera, --eval; --help for all)\n")
    if modes > 1:
        p.error("give photos, --video, --camera or --eval, one at a time")
    if args.scale_factor <= 1.0:
        p.error("--scale-factor must be above 1.0, e.g. 1.1")
    if args.min_neighbors < 0:
        p.error("--min-neighbors must be 0 or more")
    if args.detect_size is None:
        args.detect_size = VIDEO_DETECT_SIZE if (args.video is not None or args.camera is not None) else PHOTO_DETECT_SIZE
    if args.detect_size < 24:
        p.error("--detect-size must be at least 24 (pixels)")
    if args.camera is not None and (args.json or args.csv):
        p.error("--json and --csv go with photos or --video, not --camera")
    if args.eval is not None and args.csv:
        p.error("--csv goes with photos or --video; --eval writes --json")
    return args


def main(args):
    check_writable(args.json, "--json")
    check_writable(args.csv, "--csv")
    if args.camera is None:
        prepare_out_dir(args.out)
    device = choose_device(args.device)
    rec = Recognizer(args.model, device, args.detect, args.scale_factor, args.min_neighbors, args.min_weight, args.min_face,
                     args.detect_size)
    if args.eval is not None:
        return run_eval(rec, args.eval, args.out, args.json)
    if args.camera is not None:
        return run_camera(rec, args.camera)
    if args.video is not None:
        records, failed, total = run_video(rec, args.video, args.out), 0, 1
    else:
        photos, skipped = expand_inputs(args.inputs)
        if skipped:
            print(f"skipped {skipped} files that are not images ({', '.join(IMAGE_EXTENSIONS)})")
        if not photos:
            raise UserError(f"no images found in {', '.join(map(str, args.inputs))}")
        records, failed = run_photos(rec, photos, args.out)
        total = len(photos)
        n_faces = sum(r["box"] is not None for r in records)
        print(f"{total - failed} photos, {n_faces} faces; annotated copies in {args.out}")
    write_records(records, args.json, args.csv, rec.classes)
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    if failed:
        print(f"error: {failed} of {total} photos could not be read", file=sys.stderr)
        sys.exit(1)
    return records


if __name__ == "__main__":
    run_main(main, parse_args())
