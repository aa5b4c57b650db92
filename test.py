"""Find every face in photos and name each face's emotion; or score the model on labelled data.

    python test.py samples/grace_hopper.jpg               # annotated copy in outputs/
    python test.py photo1.jpg photo2.png --out results --model models/Facial_Emotion_Recognizer.pt
    python test.py --eval ../shared/data/fer2013/val.csv.gz --json val_scores.json

Faces are found with OpenCV's frontal-face Haar cascade; all faces of a photo are classified in one
batch, with the mirror image averaged in (the same test-time augmentation train.py validates with).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import (EMOTIONS, IMAGE_EXTENSIONS, IMAGE_SIZE, REPO_ROOT, UserError, choose_device, crop_face,
                    detect_faces, load_checkpoint, load_face_detector, model_from_checkpoint, predict_proba, run_main)

DEFAULT_MODEL = REPO_ROOT / "models" / "Facial_Emotion_Recognizer.pt"
SAMPLE_PHOTO = REPO_ROOT / "samples" / "grace_hopper.jpg"
# One BGR colour per emotion name, so the same emotion always has the same box colour.
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
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                rgb = np.repeat((arr / top * 255).round().astype(np.uint8)[..., None], 3, axis=2)
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12) * 255
                rgb = np.repeat(arr.round().astype(np.uint8)[..., None], 3, axis=2)
            else:
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im.convert("RGBA"))
                rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageReadError("is not an image PIL can read (JPEG, PNG, BMP, TIFF, WebP ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"is damaged or truncated ({str(e)[:60]})") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def to_gray(bgr):
    """8-bit gray copy of a BGR image."""
    import cv2

    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def annotate(bgr, faces):
    """Draw a box and 'emotion confidence' on each face; returns the drawn copy."""
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
    return img


class Recognizer:
    """The model and the face detector, loaded once, with what is needed to classify faces."""

    def __init__(self, model_path, device):
        self.path = Path(model_path)
        ckpt = load_checkpoint(self.path)
        self.device = device
        self.model = model_from_checkpoint(ckpt, device, self.path)
        self.classes = list(ckpt["class_names"])
        self.mean, self.std = ckpt.get("mean", 0.5), ckpt.get("std", 0.25)
        self.size = ckpt.get("input_size", IMAGE_SIZE)
        self.metrics = ckpt.get("metrics", {})
        self.cascade = load_face_detector()

    def classify(self, faces):
        """Probabilities (N, C) for uint8 face crops (N, 48, 48)."""
        return predict_proba(self.model, np.asarray(faces, dtype=np.uint8).reshape(-1, self.size, self.size),
                             self.device, self.mean, self.std).numpy()

    def faces_in(self, bgr):
        """Every face found in a BGR photo: [{'box', 'emotion', 'confidence', 'probabilities'}]."""
        gray = to_gray(bgr)
        boxes = detect_faces(self.cascade, gray)
        if not boxes:
            return []
        probs = self.classify(np.stack([crop_face(gray, b, self.size) for b in boxes]))
        return [self._record(b, p) for b, p in zip(boxes, probs)]

    def _record(self, box, p):
        k = int(p.argmax())
        return {"box": [int(v) for v in box], "emotion": self.classes[k], "confidence": float(p[k]),
                "probabilities": {c: float(v) for c, v in zip(self.classes, p)}}


def output_path(out_dir, photo, used):
    """<out>/<stem>_emotions<ext>, numbered where two photos share a name."""
    ext = photo.suffix.lower() if photo.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg"
    name = f"{photo.stem}_emotions{ext}"
    n = 2
    while name in used:
        name = f"{photo.stem}_emotions_{n}{ext}"
        n += 1
    used.add(name)
    return out_dir / name


def prepare_out_dir(out):
    """Create --out, or say why it cannot be."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created ({e.strerror}): pass another --out") from None


def run_photos(rec, photos, out):
    """Annotate each photo into `out`; returns (records, number of unreadable photos)."""
    import cv2

    prepare_out_dir(out)
    records, failed, used = [], 0, set()
    for photo in photos:
        photo = Path(photo)
        try:
            bgr = read_image(photo)
        except ImageReadError as e:
            print(f"error: {photo} {e}; skipped", file=sys.stderr)
            failed += 1
            continue
        faces = rec.faces_in(bgr)
        dest = output_path(out, photo, used)
        if not cv2.imwrite(str(dest), annotate(bgr, faces)):
            raise UserError(f"could not write {dest}: check --out and free disk space")
        if not faces:
            print(f"{photo}: no face found (saved unchanged copy {dest})")
            records.append({"file": str(photo), "box": None})
        for i, f in enumerate(faces, 1):
            x, y, w, h = f["box"]
            print(f"{photo}: face {i} at x={x} y={y} w={w} h={h}: {f['emotion']} {f['confidence']:.0%}")
            records.append({"file": str(photo), **f})
        if faces:
            print(f"{photo}: {len(faces)} face{'s' if len(faces) > 1 else ''} -> {dest}")
    return records, failed


def load_eval_data(path, rec):
    """Faces (N, 48, 48), model-order labels and a note from a FER2013 CSV or an ImageFolder-like folder."""
    path = Path(path)
    index = {c: i for i, c in enumerate(rec.classes)}
    if path.is_file():
        from preparation import read_csv

        faces, ids, _, _ = read_csv(path, progress=False)
        names = [EMOTIONS[i] for i in ids]
        note = ""
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
                if max(gray.shape) > rec.size:  # a photo: classify its largest face, or all of it
                    boxes = detect_faces(rec.cascade, gray)
                    if boxes:
                        gray = crop_face(gray, max(boxes, key=lambda b: b[2] * b[3]), rec.size)
                    else:
                        fallback += 1
                faces.append(crop_face(gray, (0, 0, gray.shape[1], gray.shape[0]), rec.size))
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
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    from train import plot_confusion

    faces, labels, note = load_eval_data(path, rec)
    t0 = time.perf_counter()
    pred = rec.classify(faces).argmax(1)
    seconds = time.perf_counter() - t0
    k = len(rec.classes)
    acc = float((pred == labels).mean())
    macro = float(f1_score(labels, pred, labels=range(k), average="macro", zero_division=0))
    report = classification_report(labels, pred, labels=range(k), target_names=rec.classes, zero_division=0,
                                   output_dict=True, digits=4)
    print(classification_report(labels, pred, labels=range(k), target_names=rec.classes, zero_division=0, digits=4))
    print(f"{Path(path).name}: accuracy {acc:.4f}, macro-F1 {macro:.4f} on {len(labels)} faces "
          f"({len(labels) / seconds:.0f} faces/s){'; ' + note if note else ''}")
    prepare_out_dir(out)
    cm_path = out / f"confusion_{Path(path).name.split('.')[0]}.png"
    plot_confusion(confusion_matrix(labels, pred, labels=range(k)).tolist(), rec.classes, cm_path, True,
                   f"{rec.path.name} on {Path(path).name}: recall per class, accuracy {acc:.1%}")
    print(f"confusion matrix: {cm_path}")
    result = {"accuracy": acc, "macro_f1": macro, "n": int(len(labels)), "data": str(path), "model": str(rec.path),
              "per_class": {c: {m: report[c][m] for m in ("precision", "recall", "f1-score", "support")}
                            for c in rec.classes}}
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"--json {json_path} cannot be written ({e.strerror}): pass another path") from None
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Find faces in photos and name each face's emotion, or score the model.")
    p.add_argument("photos", nargs="*", type=Path, help="photos to annotate (JPEG, PNG, ...)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "outputs", help="folder for annotated copies and plots (default: outputs/)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: models/Facial_Emotion_Recognizer.pt)")
    p.add_argument("--eval", type=Path, default=None, metavar="PATH",
                   help="score the model on a FER2013 CSV or a folder of emotion subfolders instead (default: off)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="with --eval: write the scores as JSON (default: none)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="device (default: cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    args = p.parse_args(argv)
    if not args.photos and args.eval is None:
        p.exit(2, f"{p.prog}: error: name a photo, e.g. python test.py {SAMPLE_PHOTO.relative_to(REPO_ROOT)}, or use --eval PATH\n")
    if args.json and args.eval is None:
        p.error("--json goes with --eval")
    return args


def main(args):
    device = choose_device(args.device)
    rec = Recognizer(args.model, device)
    if args.eval is not None:
        return run_eval(rec, args.eval, args.out, args.json)
    records, failed = run_photos(rec, args.photos, args.out)
    if failed:
        print(f"error: {failed} of {len(args.photos)} photos could not be read", file=sys.stderr)
        sys.exit(1)
    return records


if __name__ == "__main__":
    run_main(main, parse_args())
