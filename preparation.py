"""Turn FER2013's CSV into JPG face images, one folder per emotion.

    python preparation.py                                  # data/train.csv -> face_datasets/
    python preparation.py --csv data/fer2013.csv.gz --out face_datasets --skip-bad

Reads the `input`/`target` layout (2304 gray values of a 48x48 face; 0 anger .. 6 neutral) and
FER2013's original `emotion`/`pixels`/`Usage` layout. Writes `<out>/Train data/<emotion>/<row>.jpg`;
with a Usage column, rows not marked Training go to `<out>/Test data/<emotion>/`. The folder is
built beside the old one and swapped in at the end, so a failed run leaves the old one as it was.
"""
import argparse
import csv
import gzip
import io
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from common import EMOTIONS, IMAGE_SIZE, REPO_ROOT, UserError, run_main

N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
LAYOUTS = ({"input", "target"}, {"pixels", "emotion"})  # (ours, FER2013's original)
JPEG_QUALITY = 95  # high enough that decoding gives back the gray values within a level or two
MAX_BAD_SHOWN = 5
csv.field_size_limit(1 << 24)  # a pixels field is ~9 KB, over the csv module's 128 KB limit only if broken


class RowError(ValueError):
    """A data row that cannot become a face image."""


def parse_pixels(text):
    """The 2304 space-separated gray values of one row -> uint8 array (48, 48); RowError if they are not that."""
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


def open_text(path):
    """Open a .csv or .csv.gz for reading as text (universal newlines, so CRLF files work)."""
    raw = gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read_csv(path, skip_bad=False, progress=True):
    """Parse a FER2013 CSV into (faces uint8 (N,48,48), labels, usage list or None, bad rows).

    `bad` is a list of (line number, reason). Without `skip_bad` the first bad row raises UserError.
    Line numbers count from 1 at the header, as an editor shows them.
    """
    from tqdm import tqdm

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: put FER2013's train.csv there (see README) or pass --csv")
    faces, labels, usage, bad = [], [], [], []
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path} is empty: expected a header line 'input,target' or 'emotion,pixels,Usage'")
            cols = [c.strip().lower() for c in header]
            layout = next((lay for lay in LAYOUTS if lay <= set(cols)), None)
            if layout is None:
                raise UserError(f"{path} line 1: header {','.join(header)[:60]!r} is not FER2013's: "
                                "expected columns 'input,target' or 'emotion,pixels[,Usage]'")
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
                faces.append(face)
                labels.append(label)
                if use_col is not None:
                    usage.append(row[use_col].strip())
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as e:
        what = "truncated or damaged" if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)) else "unreadable"
        raise UserError(f"{path} is {what} ({type(e).__name__}: {str(e)[:80]}): download it again") from None
    if bad and not skip_bad:
        raise UserError(f"{path} line {bad[0][0]}: row {bad[0][1]} ({describe_bad(bad)}); fix or remove "
                        f"{'it' if len(bad) == 1 else 'them'}, or pass --skip-bad to leave bad rows out")
    if not faces:
        extra = f" ({describe_bad(bad)})" if bad else ""
        raise UserError(f"{path} has no usable data rows{extra}: check that it is FER2013's CSV")
    faces = np.stack(faces)
    return faces, np.array(labels, dtype=np.int64), (usage if use_col is not None else None), bad


def describe_bad(bad):
    """'3 bad rows, at lines 4, 9, 12' with at most MAX_BAD_SHOWN line numbers."""
    lines = ", ".join(str(n) for n, _ in bad[:MAX_BAD_SHOWN]) + (", ..." if len(bad) > MAX_BAD_SHOWN else "")
    return f"{len(bad)} bad row{'s' if len(bad) > 1 else ''}, at line{'s' if len(bad) > 1 else ''} {lines}"


def split_of(usage):
    """'Train data' for Training rows (and files with no Usage column), else 'Test data'."""
    return "Train data" if usage is None or usage.lower() == "training" else "Test data"


def write_images(faces, labels, usage, root, progress=True):
    """Write each face as <root>/<split>/<emotion>/<row>.jpg; returns {split: per-class counts}."""
    import cv2
    from tqdm import tqdm

    width = max(5, len(str(len(faces) - 1)))
    counts = {}
    made = set()
    for i in tqdm(range(len(faces)), desc="writing images", unit=" img", disable=not progress, mininterval=0.5):
        split = split_of(usage[i] if usage is not None else None)
        emotion = EMOTIONS[labels[i]]
        folder = root / split / emotion
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        name = str(folder / f"{i:0{width}d}.jpg")
        if not cv2.imwrite(name, faces[i], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise UserError(f"could not write {name}: check free disk space and permissions")
        counts.setdefault(split, [0] * len(EMOTIONS))[labels[i]] += 1
    return counts


def plot_distribution(counts, path):
    """A bar chart of images per emotion for each split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    n = len(counts)
    for k, (split, c) in enumerate(sorted(counts.items(), key=lambda kv: kv[0] != "Train data")):
        x = np.arange(len(EMOTIONS)) + (k - (n - 1) / 2) * 0.8 / n
        bars = ax.bar(x, c, width=0.8 / n, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(np.arange(len(EMOTIONS)), EMOTIONS)
    ax.set_ylabel("images")
    ax.set_title("FER2013 class distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(counts):
    """Per-class counts for each split as a plain text table."""
    splits = sorted(counts, key=lambda s: s != "Train data")
    lines = [f"{'emotion':<10}" + "".join(f"{s:>12}" for s in splits)]
    for i, e in enumerate(EMOTIONS):
        lines.append(f"{e:<10}" + "".join(f"{counts[s][i]:>12}" for s in splits))
    lines.append(f"{'total':<10}" + "".join(f"{sum(counts[s]):>12}" for s in splits))
    return "\n".join(lines)


def swap_in(new, out):
    """Replace folder `out` by `new` with two renames, removing the old one only after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Turn FER2013's CSV into JPG images, one folder per emotion.")
    p.add_argument("--csv", type=Path, default=REPO_ROOT / "data" / "train.csv",
                   help="FER2013 CSV, .csv or .csv.gz (default: data/train.csv)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "face_datasets",
                   help="output folder, replaced as a whole at the end (default: face_datasets/)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave bad rows out and list them in <out>/rejects.csv (default: stop at the first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    return p.parse_args(argv)


def main(args):
    start = time.perf_counter()
    progress = not args.no_progress
    faces, labels, usage, bad = read_csv(args.csv, skip_bad=args.skip_bad, progress=progress)
    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write to {out.parent} ({e.strerror}): choose another --out") from None
    try:
        counts = write_images(faces, labels, usage, tmp, progress=progress)
        if bad:
            with open(tmp / "rejects.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["line", "problem"])
                w.writerows(bad)
        plot_distribution(counts, tmp / "class_distribution.png")
        swap_in(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write under {out.parent} ({e.strerror}): free space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap

    print(format_table(counts))
    if bad:
        print(f"skipped {describe_bad(bad)}; see {out / 'rejects.csv'}")
    print(f"wrote {len(faces)} images to {out} in {time.perf_counter() - start:.1f}s; "
          f"class chart: {out / 'class_distribution.png'}")
    return {"out": out, "counts": counts, "bad": bad}


if __name__ == "__main__":
    run_main(main, parse_args())
