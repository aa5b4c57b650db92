"""What preparation.py, train.py and test.py share: emotion names and their order, FER2013's and FER+'s
readers, labelled faces from a CSV or a folder, scores and the confusion plot, device choice, seeding, atomic
writes and checkpoint load. The network is in network.py, face detection in detection.py.

Nothing here runs on import; every function takes what it needs as arguments.
"""

import contextlib
import csv
import gzip
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent

# FER2013's label ids, in id order (the CSV's `target` column indexes this tuple). A model's outputs are in
# another order, its class_names (ImageFolder's alphabetical folders): fer2013_ids() is the one translation.
EMOTIONS = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")
IMAGE_SIZE = 48
CHECKPOINT_FORMAT = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


class ImageReadError(Exception):
    """An image file that cannot be read; its message says why, after the file's name."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what the interrupted run left behind (when that is more than nothing)."""


def run_main(main, args):
    """Run a script's main(args): user errors and Ctrl-C become one line and a non-zero exit.

    Returns main's result; a main that must report failure raises UserError (exit 1) or
    returns and lets the script's caller decide; nothing here calls sys.exit but for those two.
    """
    debug = getattr(args, "debug", False) or os.environ.get("FER_DEBUG")
    try:
        return main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if debug:
            raise
        what = str(e) if isinstance(e, Interrupted) and str(e) else "earlier outputs were left as they were"
        print(f"interrupted: {what}", file=sys.stderr)
        sys.exit(130)


def fer2013_ids(classes):
    """The FER2013 id of each of a model's classes, in the model's output order.

    The one translation between the two orders: `a[:, fer2013_ids(classes)]` puts columns in FER2013's id
    order (FER+'s vote shares) in model order; model_labels() maps labels the other way.
    """
    return np.array([EMOTIONS.index(c) for c in classes], dtype=np.int64)


def model_labels(names, classes, where):
    """Emotion names (a folder's, or EMOTIONS[id] of a CSV's ids) as indices into `classes`.

    A name that `classes` lacks is a UserError: "{where} has emotion 'x' that ..." (`where` says both halves).
    """
    index = {c: i for i, c in enumerate(classes)}
    missing = next((n for n in names if n not in index), None)
    if missing is not None:
        raise UserError(where.replace("{emotion}", repr(missing)))
    return np.array([index[n] for n in names], dtype=np.int64)


def project_relative(path):
    """`path` as written into a checkpoint or JSON: relative to the project when inside it, else its name.

    A model file travels between machines; the build machine's absolute paths mean nothing elsewhere.
    """
    p = Path(path)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return p.name


# ---------------------------------------------------------------------------------------------
# Devices and precision

DEVICES = ("auto", "cpu", "cuda", "mps")  # --device's choices in train.py and test.py


def choose_device(name="auto"):
    """cuda -> mps -> cpu for 'auto'; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def set_seed(seed):
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# FER2013's CSV (preparation.py writes it out as images; train.py --val and test.py --eval score it)

N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
LAYOUTS = ({"input", "target"}, {"pixels", "emotion"})  # (ours, FER2013's original)
MAX_BAD_SHOWN = 5
# Inside an archive: FER2013's own name first, then Kaggle's all-splits file (its train.csv has no Usage).
ARCHIVE_CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")
# FER2013's Usage values: Training is learned from, PublicTest chooses the best epoch (validation),
# PrivateTest is kept apart for the final score.
TRAINING, VALIDATION, FINAL_TEST = "Training", "PublicTest", "PrivateTest"


class RowError(ValueError):
    """A data row that cannot become a face image."""


def parse_pixels(text):
    """The 2304 space-separated gray values of one row -> uint8 array (48, 48); RowError if they are not that."""
    # Fast path: NumPy's integer text parser (8x the split into floats below); anything unusual, which it
    # would read only in part (with a warning, made an error here), falls through to the checks that name it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with contextlib.suppress(ValueError, DeprecationWarning):
            arr = np.fromstring(text, dtype=np.int64, sep=" ")
            if arr.size == N_PIXELS and ((arr >= 0) & (arr <= 255)).all():
                return arr.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    values = text.split()
    if len(values) != N_PIXELS:
        raise RowError(f"has {len(values)} pixel values, expected {N_PIXELS}")
    try:
        arr = np.array(values, dtype=np.float64)
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise RowError(f"has a non-numeric pixel value {bad[:20]!r}") from None
    if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
        raise RowError("has a pixel value that is not a whole number")
    if arr.min() < 0 or arr.max() > 255:
        raise RowError(f"has a pixel value outside 0-255 ({int(arr.min()) if arr.min() < 0 else int(arr.max())})")
    return arr.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def parse_label(text):
    """The label field -> int 0..6; RowError if empty or out of range."""
    text = text.strip()
    if not text:
        raise RowError("has no label")
    try:
        value = float(text)
    except ValueError:
        raise RowError(f"has a label {text[:20]!r} that is not a number 0-6") from None
    if value != int(value) or not 0 <= value < len(EMOTIONS):
        raise RowError(f"has label {text[:20]}, expected 0-6 ({', '.join(f'{i} {e}' for i, e in enumerate(EMOTIONS))})")
    return int(value)


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _archive_member(path, names):
    """The CSV to read inside archive `path` (FER2013's name first, else the only CSV), or a UserError."""
    csvs = [
        n
        for n in names
        if n.lower().endswith((".csv", ".csv.gz")) and "__MACOSX" not in n and not Path(n).name.startswith(".")
    ]
    for want in ARCHIVE_CSV_NAMES:
        found = [n for n in csvs if Path(n).name.lower() in (want, want + ".gz")]
        if found:
            return found[0]
    if len(csvs) == 1:
        return csvs[0]
    inside = ", ".join(Path(n).name for n in (csvs or names)[:5]) or "nothing"
    raise UserError(
        f"{path} is an archive holding {'several CSVs' if csvs else 'no CSV'} ({inside}): extract "
        f"FER2013's CSV (e.g. unzip {path.name} or tar -xzf {path.name}) and pass it with --csv"
    )


def _is_tar(path):
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error):
        return False


@contextlib.contextmanager
def open_text(path):
    """A FER2013 CSV as text: plain, gzipped, or inside a .zip / .tar(.gz) (Kaggle's download); CRLF files work."""
    path = Path(path)
    with contextlib.ExitStack() as stack:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # by its first bytes, so a damaged zip is called damaged, not "not a CSV"
            archive = stack.enter_context(zipfile.ZipFile(path))
            member = _archive_member(path, archive.namelist())
            raw, gz = stack.enter_context(archive.open(member)), member.endswith(".gz")
        elif _is_tar(path):
            archive = stack.enter_context(tarfile.open(path, "r:*"))
            member = _archive_member(path, [m.name for m in archive.getmembers() if m.isfile()])
            raw, gz = stack.enter_context(archive.extractfile(member)), member.endswith(".gz")
        else:
            raw, gz = stack.enter_context(open(path, "rb")), head[:2] == b"\x1f\x8b"
        if gz:
            raw = stack.enter_context(gzip.open(raw, "rb"))
        yield stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""))


def read_csv(path, skip_bad=False, progress=True, with_rows=False):
    """Parse a FER2013 CSV into (faces uint8 (N,48,48), labels, usage list or None, bad rows).

    `bad` is a list of (line number, reason). Without `skip_bad` the first bad row raises UserError.
    Line numbers count from 1 at the header, as an editor shows them. `with_rows` adds, last, the number
    of each face's data row (from 0, bad rows counted, blank lines not), by which FER+'s file lines up.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: put FER2013's train.csv there (see README) or pass --csv")
    csv.field_size_limit(1 << 24)  # a pixels field is ~9 KB, over the csv module's 128 KB limit only if broken
    faces, labels, usage, bad, rows = [], [], [], [], []
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path} is empty: expected a header line 'input,target' or 'emotion,pixels,Usage'")
            cols = [c.strip().lower() for c in header]
            layout = next((lay for lay in LAYOUTS if lay <= set(cols)), None)
            if layout is None:
                raise UserError(
                    f"{path} line 1: header {','.join(header)[:60]!r} is not FER2013's: "
                    "expected columns 'input,target' or 'emotion,pixels[,Usage]'"
                )
            pix_col = cols.index("input" if "input" in layout else "pixels")
            lab_col = cols.index("target" if "target" in layout else "emotion")
            use_col = cols.index("usage") if "usage" in cols else None
            for row in tqdm(reader, desc=f"reading {path.name}", unit=" rows", disable=not progress, mininterval=0.5):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line, e.g. a trailing newline
                try:
                    if len(row) != len(cols):
                        raise RowError(f"has {len(row)} fields, expected {len(cols)} ({','.join(cols)})")
                    face = parse_pixels(row[pix_col])
                    label = parse_label(row[lab_col])
                except RowError as e:
                    bad.append((reader.line_num, str(e)))
                    continue
                rows.append(len(faces) + len(bad))  # this data row's number: the rows before it, good and bad
                faces.append(face)
                labels.append(label)
                if use_col is not None:
                    usage.append(row[use_col].strip())
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error, zipfile.BadZipFile, tarfile.TarError) as e:
        what = (
            "truncated or damaged"
            if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile, tarfile.TarError))
            else "unreadable"
        )
        raise UserError(f"{path} is {what} ({type(e).__name__}: {str(e)[:80]}): download it again") from None
    if bad and not skip_bad:
        raise UserError(
            f"{path} line {bad[0][0]}: row {bad[0][1]} ({describe_bad(bad)}); fix or remove "
            f"{'it' if len(bad) == 1 else 'them'}, or pass --skip-bad to leave bad rows out"
        )
    if not faces:
        extra = f" ({describe_bad(bad)})" if bad else ""
        raise UserError(f"{path} has no usable data rows{extra}: check that it is FER2013's CSV")
    read = np.stack(faces), np.array(labels, dtype=np.int64), (usage if use_col is not None else None), bad
    return (*read, np.array(rows, dtype=np.int64)) if with_rows else read


# ---------------------------------------------------------------------------------------------
# FER+ (Microsoft's fer2013new.csv): ten people's votes for each face of FER2013's CSV, row for row

# FER+'s vote columns in its file's order, and the emotion of ours each one is (None: not one of our seven).
FERPLUS_COLUMNS = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
FERPLUS_EMOTION = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                   "anger": "anger", "disgust": "disgust", "fear": "fear"}  # fmt: skip
# The EMOTIONS id of each FER+ column, -1 for the three that are not one of our emotions.
FERPLUS_IDS = np.array([EMOTIONS.index(FERPLUS_EMOTION[c]) if c in FERPLUS_EMOTION else -1 for c in FERPLUS_COLUMNS])
FERPLUS_VOTES_FILE = "ferplus_votes.csv"  # beside the split folders: preparation.py's write_votes, train.py's read
FERPLUS_HINT = "Microsoft's fer2013new.csv (github.com/microsoft/FERPlus), for the same rows as the FER2013 CSV"


def read_ferplus(path):
    """FER+'s votes (N, 10) int in FERPLUS_COLUMNS order and each row's Usage, from fer2013new.csv.

    Read as open_text reads a CSV (plain, gzipped, in a .zip/.tar.gz); line numbers count from 1 at the header.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ferplus {path} not found: pass {FERPLUS_HINT}")
    votes, usage = [], []
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            missing = [c for c in ("Usage",) + FERPLUS_COLUMNS if c not in header]
            if missing:
                raise UserError(
                    f"--ferplus {path} line 1: no column {missing[0]!r}; expected FER+'s header "
                    f"'Usage,Image name,{','.join(FERPLUS_COLUMNS)}': pass {FERPLUS_HINT}"
                )
            cols = [header.index(c) for c in FERPLUS_COLUMNS]
            use_col = header.index("Usage")
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                try:
                    v = [int(row[c]) for c in cols]
                except (ValueError, IndexError):
                    raise UserError(
                        f"--ferplus {path} line {reader.line_num}: the votes are not {len(cols)} whole numbers: "
                        "fix the row or download the file again"
                    ) from None
                if min(v) < 0 or sum(v) == 0:
                    raise UserError(
                        f"--ferplus {path} line {reader.line_num}: {'a negative vote' if min(v) < 0 else 'no votes'}: "
                        "fix the row or download the file again"
                    )
                votes.append(v)
                usage.append(row[use_col].strip())
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error, zipfile.BadZipFile, tarfile.TarError) as e:
        raise UserError(
            f"--ferplus {path} is unreadable ({type(e).__name__}: {str(e)[:80]}): download it again"
        ) from None
    if not votes:
        raise UserError(f"--ferplus {path} has no rows: pass {FERPLUS_HINT}")
    return np.array(votes, dtype=np.int64), usage


def check_ferplus_rows(ferplus_path, csv_path, ferplus_usage, csv_usage, n_csv, rows=None):
    """A UserError unless FER+'s file has the CSV's rows in the CSV's order (same count, same Usage row by row).

    `n_csv`: the CSV's data rows, bad ones included; `rows`: the data row of each entry of `csv_usage` (read_csv's
    with_rows; None: every row, in order). Rows are counted from 1 after the header, blank lines not counted.
    """
    if len(ferplus_usage) != n_csv:
        raise UserError(
            f"--ferplus {ferplus_path} has {len(ferplus_usage):,} rows but {csv_path} has {n_csv:,}: pass the "
            "fer2013new.csv made for this CSV (its rows match FER2013's row for row)"
        )
    if csv_usage is None:
        return
    rows = range(len(csv_usage)) if rows is None else rows
    for i, b in zip(rows, csv_usage):
        a = ferplus_usage[i]
        if a.lower() != b.strip().lower():
            raise UserError(
                f"--ferplus {ferplus_path} row {i + 1} is {a!r} but {csv_path}'s row {i + 1} is {b.strip()!r}: "
                "the two files are not in the same row order; pass the fer2013new.csv made for this CSV"
            )


def ferplus_shares(votes):
    """Each face's vote shares over EMOTIONS (float32, rows sum to 1; all zero where no vote is for one of them)."""
    votes = np.asarray(votes, dtype=np.float64)
    ours = np.zeros((len(votes), len(EMOTIONS)))
    mine = FERPLUS_IDS >= 0
    ours[:, FERPLUS_IDS[mine]] = votes[:, mine]
    total = ours.sum(1, keepdims=True)
    return (ours / np.maximum(total, 1)).astype(np.float32)


def ferplus_majority(votes):
    """Per face, the EMOTIONS id that more than half of all its votes went to, else -1 (FER+'s majority faces)."""
    votes = np.asarray(votes)
    strict = votes.max(1) * 2 > votes.sum(1)
    return np.where(strict, FERPLUS_IDS[votes.argmax(1)], -1)


def ferplus_plurality(votes, fallback):
    """Per face, the EMOTIONS id with the most votes (a tie goes to `fallback`, FER2013's label, when it is among the
    tied, else to FERPLUS_COLUMNS' order); -1 where not-a-face, unknown or contempt has more votes than any emotion."""
    votes = np.asarray(votes)
    ours = FERPLUS_IDS >= 0
    ids = FERPLUS_IDS[ours]
    mine = votes[:, ours]
    best = mine.max(1)
    other = votes[:, ~ours].max(1)
    tied = mine == best[:, None]
    first = ids[tied.argmax(1)]
    fb = np.asarray(fallback)
    fallback_tied = (tied & (ids[None, :] == fb[:, None])).any(1)
    label = np.where(fallback_tied, fb, first)
    return np.where((best > 0) & (best >= other), label, -1)


def write_votes(path, written, labels, votes):
    """<out>/ferplus_votes.csv: each written image's path, FER2013 label and FER+'s ten votes."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "fer2013", *FERPLUS_COLUMNS])
        for i, name in written.items():
            w.writerow([name, EMOTIONS[labels[i]], *votes[i].tolist()])


def read_votes(root, paths, classes):
    """FER+ vote shares (N, C) and FER2013 labels (N,), both in `classes` order, for the images at `paths`.

    From the ferplus_votes.csv preparation.py --ferplus wrote beside folder `root` (None where there is none).
    """
    path = Path(root).parent / FERPLUS_VOTES_FILE
    if not path.is_file():
        return None
    redo = "run preparation.py --ferplus again"
    try:
        with open(path, newline="") as f:
            table = {row["image"]: row for row in csv.DictReader(f)}
        keys = [Path(p).resolve().relative_to(path.parent.resolve()).as_posix() for p in paths]
        missing = next((k for k in keys if k not in table), None)
        if missing is not None:
            raise UserError(f"{path} has no votes for {missing}: {redo}")
        votes = np.array([[int(table[k][c]) for c in FERPLUS_COLUMNS] for k in keys], dtype=np.int64)
        names = [table[k]["fer2013"] for k in keys]
    except (OSError, KeyError, ValueError, csv.Error) as e:
        raise UserError(
            f"{path} is not preparation.py's votes file ({type(e).__name__}: {str(e)[:60]}): {redo}"
        ) from None
    where = f"{path}: a face labelled {{emotion}} by FER2013, which the training folders lack: {redo}"
    return ferplus_shares(votes)[:, fer2013_ids(classes)], model_labels(names, classes, where)


def describe_bad(bad):
    """'3 bad rows, at lines 4, 9, 12' with at most MAX_BAD_SHOWN line numbers."""
    lines = ", ".join(str(n) for n, _ in bad[:MAX_BAD_SHOWN]) + (", ..." if len(bad) > MAX_BAD_SHOWN else "")
    return f"{len(bad)} bad row{'s' if len(bad) > 1 else ''}, at line{'s' if len(bad) > 1 else ''} {lines}"


def held_out_rows(path, usage, only=None):
    """Indices of the rows a model may be scored on (None: all), and a line saying which; never Training rows.

    Without a Usage column every row counts (a file of test faces). With one, the rows not marked
    Training; `only` narrows them to one Usage value where the file has it (train.py validates on
    PublicTest and leaves PrivateTest for the final score).
    """
    if usage is None:
        return None, ""
    names = np.array([u.strip() for u in usage])
    keep = names != TRAINING
    if only is not None and (names == only).any():
        keep = names == only
    if not keep.any():
        raise UserError(
            f"{path}: every row is marked {TRAINING} in its Usage column, so the model may have "
            f"learned them: pass a CSV with {VALIDATION} or {FINAL_TEST} rows"
        )
    kinds = sorted(set(names[keep]))
    counts = ", ".join(f"{k} {int((names == k).sum()):,}" for k in kinds)
    left = int((~keep).sum())
    return np.flatnonzero(keep), (f"rows by Usage: {counts}" + (f"; {left:,} other rows left out" if left else ""))


# ---------------------------------------------------------------------------------------------
# Photos and face files


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
    import cv2  # here: preparation.py and train.py read no photos

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


# ---------------------------------------------------------------------------------------------
# Labelled faces: train.py's training and validation data and test.py --eval's, from a folder or a CSV


def load_image_folder(root, progress=True, read_face=read_face_file, flag="--data"):
    """The images of an ImageFolder tree (one folder per emotion, searched recursively) as uint8 faces.

    Returns (faces (N, 48, 48), labels, classes, skipped, paths): labels index `classes` (the tree's folders,
    alphabetical: ImageFolder's order), skipped lists (path, reason) of the files `read_face` raised
    ImageReadError for, paths are the faces' files. `flag` names the folder in errors.
    """
    # Imported here: torchvision is slow to import and only reading a folder needs it (test.py on photos does not).
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root} not found: run preparation.py first, or pass a folder of emotion folders")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = next((d for d in subdirs if d not in EMOTIONS), None)
    if not subdirs or unknown:
        found = f"class folder {unknown!r} is not one of the seven emotions" if unknown else "it has no class folders"
        raise UserError(f"{flag} {root}: expected one folder per emotion ({', '.join(EMOTIONS)}); {found}")
    try:
        ds = ImageFolder(str(root), loader=lambda p: p, allow_empty=True, is_valid_file=is_image_file)
    except OSError as e:
        raise UserError(f"{flag} {root}: {e}") from None
    counts = np.bincount([t for _, t in ds.samples], minlength=len(ds.classes))
    empty = next((c for c, n in zip(ds.classes, counts) if n == 0), None)
    if empty is not None:
        raise UserError(f"{flag} {root}: class folder {empty!r} has no images; add images or remove the folder")
    faces, labels, skipped, paths = [], [], [], []
    for path, target in tqdm(
        ds.samples, desc=f"loading {root.name}", unit=" img", disable=not progress, mininterval=0.5
    ):
        try:
            faces.append(read_face(path))
        except ImageReadError as e:
            skipped.append((path, str(e)))
            continue
        labels.append(target)
        paths.append(path)
    if not faces:
        raise UserError(f"{flag} {root} has no readable images ({len(skipped)} unreadable)")
    return np.stack(faces), np.array(labels, dtype=np.int64), list(ds.classes), skipped, paths


def is_image_file(path):
    """True for a file name with one of IMAGE_EXTENSIONS (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class Labelled:
    """Faces to score and their labels in a model's class order, from load_labelled()."""

    faces: np.ndarray  # uint8 (N, 48, 48)
    labels: np.ndarray  # indices into the model's classes
    note: str  # which rows of a CSV were taken ("" for a folder)
    votes: np.ndarray = None  # a CSV's FER+ votes (N, 10) for the rows taken, where fer2013new.csv was given
    paths: list = None  # a folder's image files, one a face
    skipped: list = ()  # a folder's unreadable files: (path, reason)


def load_labelled(path, classes, *, flag, lacks, only=None, ferplus=None, read_face=read_face_file, progress=True):
    """Labelled faces from a FER2013 CSV (its held-out rows: held_out_rows) or a folder of emotion folders.

    Labels come in `classes` order; an emotion `classes` lacks stops with "{flag} {path} has emotion 'x' that
    {lacks}". `ferplus` (fer2013new.csv, CSV only) adds FER+'s votes for the rows taken; `read_face` reads
    each folder image (load_image_folder).
    """
    path = Path(path)
    where = f"{flag} {path} has emotion {{emotion}} that {lacks}"
    if path.is_file():
        faces, ids, usage, _ = read_csv(path, progress=progress)
        votes = None
        if ferplus is not None:
            votes, ferplus_usage = read_ferplus(ferplus)
            check_ferplus_rows(ferplus, path, ferplus_usage, usage, len(faces))
        rows, note = held_out_rows(path, usage, only=only)  # never the rows a model learned
        if rows is not None:
            faces, ids = faces[rows], ids[rows]
            votes = votes[rows] if votes is not None else None
        return Labelled(faces, model_labels([EMOTIONS[i] for i in ids], classes, where), note, votes)
    if not path.exists():
        raise UserError(f"{flag} {path} not found: pass a FER2013 CSV or a folder with one folder per emotion")
    if ferplus is not None:
        raise UserError(f"--ferplus goes with {flag} of a FER2013 CSV (its votes are for the CSV's rows), not {path}")
    faces, labels, names, skipped, paths = load_image_folder(path, progress, read_face, flag)
    labels = model_labels([names[t] for t in labels], classes, where)
    return Labelled(faces, labels, "", paths=paths, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Scores (train.py's validation and test.py --eval report the same figures from one function)


def confusion_matrix(labels, predicted, k):
    """The k x k matrix of counts: row a face's label, column the class predicted for it."""
    return np.bincount(np.asarray(labels) * k + np.asarray(predicted), minlength=k * k).reshape(k, k)


def metrics_from_confusion(cm, classes):
    """Accuracy, macro-F1 and, for each of `classes`, precision, recall, F1 and support; 0 where undefined."""
    cm = np.asarray(cm, dtype=np.int64)
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        r = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f.mean()),
        "confusion": cm.tolist(),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def ferplus_scores(probs, votes, classes):
    """The model's answers against FER+'s people: accuracy and macro-F1 on the faces more than half of them agree on
    (FER+'s majority faces), and how far the probabilities are from the vote shares (mean KL divergence, in nats, and
    the mean total variation, half the summed absolute difference), over faces with votes for one of our emotions."""
    majority = ferplus_majority(votes)
    agreed = majority >= 0
    to_model = {e: i for i, e in enumerate(fer2013_ids(classes))}
    labels = np.array([to_model[e] for e in majority[agreed]], dtype=np.int64)
    m = metrics_from_confusion(confusion_matrix(labels, probs[agreed].argmax(1), len(classes)), classes)
    shares = ferplus_shares(votes)[:, fer2013_ids(classes)].astype(np.float64)
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
        "recall": {c: v["recall"] for c, v in m["per_class"].items()},
    }


def plot_confusion(confusion, classes, path, normalize, title):
    """The confusion matrix as an annotated heatmap, counts or row-normalised rates, saved as PNG."""
    # Imported here: matplotlib is slow to import, paid only by runs that draw. Drawn with matplotlib alone:
    # seaborn's heatmap drew the same picture and its import (scipy with it) cost each run more than a second.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    cm = np.array(confusion, dtype=float)
    if normalize:
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(cm.max(), 1e-9), aspect="auto")
    fig.colorbar(image, ax=ax)
    n = len(classes)
    ax.set_xticks(range(n), classes)
    ax.set_yticks(range(n), classes)
    for (i, j), v in np.ndenumerate(cm):  # dark cells get white figures, as seaborn's annot did
        dark = v > 0.6 * image.norm.vmax
        ax.text(j, i, f"{v:.2f}" if normalize else f"{v:.0f}", ha="center", va="center", color="w" if dark else "k")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def beside_model(model_path, suffix):
    """The file that goes with model file `X.pt`: `X` + `suffix` in the same folder (`X.last.pt`, `X.metrics.json`)."""
    p = Path(model_path)
    return p.with_name((p.name[:-3] if p.name.endswith(".pt") else p.name) + suffix)


@contextlib.contextmanager
def atomic_write(dest, backup=None):
    """A temporary path beside `dest` (the same extension, so writers pick the format), renamed onto it on success.

    An interrupted or failed write leaves the earlier `dest` as it was and no temporary file behind; with `backup`
    (a path) the earlier `dest` is also copied there before it is replaced. The file gets the usual permissions
    (umask), not mkstemp's owner-only ones: a model file is for everyone who can read the folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial{dest.suffix}", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        if backup is not None and dest.exists():
            shutil.copy2(dest, backup)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path, indent=2):
    """`obj` as JSON to `path` through atomic_write."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def atomic_save(obj, path, backup=None):
    """torch.save through atomic_write."""
    with atomic_write(path, backup) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, missing_hint="train one with train.py or pass --model"):
    """A checkpoint dict read with weights_only=True; one clear error for each way it can be wrong.

    `missing_hint` says what to do when there is no such file (the flag that named it differs by script).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found: {missing_hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(
            f"model file {path} is damaged or not a PyTorch checkpoint ({type(e).__name__}): "
            "restore it from git or retrain with train.py"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise UserError(
            f"model file {path} is not a checkpoint of this project (no state_dict/arch): retrain with train.py"
        )
    version = ckpt.get("format_version", 0)
    if version > CHECKPOINT_FORMAT:
        raise UserError(
            f"model file {path} has format {version}, newer than this code reads ({CHECKPOINT_FORMAT}): update the code"
        )
    return ckpt
