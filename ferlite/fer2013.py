"""FER2013's CSV (ours, Kaggle's, inside archives) and FER+'s ten votes a face; the labelled faces of --eval
and of training."""

import contextlib
import csv
import gzip
import io
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ferlite.errors import UserError
from ferlite.images import load_image_folder, read_face_file
from ferlite.names import EMOTIONS, IMAGE_SIZE, fer2013_ids, model_labels

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
