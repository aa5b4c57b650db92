"""Reading photos and face files: any format, any mode, EXIF rotation applied; folders of emotion folders."""

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from ferlite.errors import ImageReadError, UserError
from ferlite.names import EMOTIONS, IMAGE_SIZE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying which way up the camera was held; 1: as stored


def read_image(path):
    """A photo as 8-bit BGR, EXIF rotation applied; any mode (gray, RGBA, 16-bit, palette) converted.

    The common case (an upright RGB photo) skips PIL's copies and converts with OpenCV: a 12-megapixel photo
    is read in 87 ms instead of 170, of which decoding is 42 (RESULTS.md, "Speed").
    """
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
            if im.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright photo
                im = ImageOps.exif_transpose(im)
            if im.mode == "RGB":  # most photos: no copies but the one NumPy and the one OpenCV make
                return cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR)
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
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)


def read_face_file(path):
    """An image file as one uint8 gray IMAGE_SIZE x IMAGE_SIZE face, resized where it is another size."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{type(e).__name__}: {str(e)[:60]}") from None


def folder_samples(root):
    """(samples, classes) of a tree of class folders as torchvision's ImageFolder lists them, without importing it:
    classes are the sorted folder names, samples (path, class index) each class's image files by a sorted walk that
    follows links (tests/test_common.py keeps the two equal)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for k, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, f), k) for f in sorted(files) if is_image_file(f)]
    return samples, classes


def load_image_folder(root, progress=True, read_face=read_face_file, flag="--data"):
    """The images of an ImageFolder tree (one folder per emotion, searched recursively) as uint8 faces.

    Returns (faces (N, 48, 48), labels, classes, skipped, paths): labels index `classes` (the tree's folders,
    alphabetical: ImageFolder's order), skipped lists (path, reason) of the files `read_face` raised
    ImageReadError for, paths are the faces' files. `flag` names the folder in errors.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root} not found: run preparation.py first, or pass a folder of emotion folders")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = next((d for d in subdirs if d not in EMOTIONS), None)
    if not subdirs or unknown:
        found = f"class folder {unknown!r} is not one of the seven emotions" if unknown else "it has no class folders"
        raise UserError(f"{flag} {root}: expected one folder per emotion ({', '.join(EMOTIONS)}); {found}")
    try:
        samples, classes = folder_samples(root)
    except OSError as e:
        raise UserError(f"{flag} {root}: {e}") from None
    counts = np.bincount([t for _, t in samples], minlength=len(classes))
    empty = next((c for c, n in zip(classes, counts) if n == 0), None)
    if empty is not None:
        raise UserError(f"{flag} {root}: class folder {empty!r} has no images; add images or remove the folder")
    faces, labels, skipped, paths = [], [], [], []
    for path, target in tqdm(samples, desc=f"loading {root.name}", unit=" img", disable=not progress, mininterval=0.5):
        try:
            faces.append(read_face(path))
        except ImageReadError as e:
            skipped.append((path, str(e)))
            continue
        labels.append(target)
        paths.append(path)
    if not faces:
        raise UserError(f"{flag} {root} has no readable images ({len(skipped)} unreadable)")
    return np.stack(faces), np.array(labels, dtype=np.int64), list(classes), skipped, paths


def is_image_file(path):
    """True for a file name with one of IMAGE_EXTENSIONS (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_gray(bgr):
    """8-bit gray copy of a BGR image."""
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
