"""Turn FER2013's CSV into JPG face images, one folder per emotion.

    python preparation.py                                  # data/train.csv -> face_datasets/
    python preparation.py --csv data/fer2013.zip --skip-bad  # Kaggle's download as it comes
    python preparation.py --csv data/fer2013.csv --ferplus data/fer2013new.csv  # FER+'s ten votes a face

Reads the `input`/`target` layout (2304 gray values of a 48x48 face; 0 anger .. 6 neutral) and
FER2013's original `emotion`/`pixels`/`Usage` layout, plain, gzipped or inside a .zip/.tar.gz.
Writes `<out>/Train data/<emotion>/<row>.jpg`; with a Usage column, PublicTest rows go to
`<out>/Test data/` (train.py's validation) and PrivateTest rows to `<out>/Final test data/`, which
train.py never reads. The folder is built beside the old one and swapped in at the end, so a
failed or interrupted run leaves the old one as it was.

With --ferplus (Microsoft's fer2013new.csv, the same rows in the same order), each face is filed by the
emotion most of its ten people voted for instead of FER2013's label; faces whose votes go mostly to
not-a-face, unknown or contempt are left out; and `<out>/ferplus_votes.csv` keeps every written face's
FER2013 label and votes, keyed by its image path, for train.py to learn the vote shares from.
"""

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from tqdm import tqdm

from ferlite.errors import Interrupted, UserError, run_main
from ferlite.fer2013 import (
    FERPLUS_COLUMNS,
    FERPLUS_VOTES_FILE,
    FINAL_TEST,
    TRAINING,
    VALIDATION,
    check_ferplus_rows,
    describe_bad,
    ferplus_plurality,
    read_csv,
    read_ferplus,
    write_votes,
)
from ferlite.files import REPO_ROOT
from ferlite.names import EMOTIONS

matplotlib.use("Agg")  # before pyplot: plots are files, and a machine without a display must draw them too
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_CSV = REPO_ROOT / "data" / "train.csv"
DATA_SUFFIXES = (".csv", ".csv.gz", ".zip", ".tar", ".tar.gz", ".tgz")
JPEG_QUALITY = 95  # high enough that decoding gives back the gray values within a level or two
# Where each Usage goes: train.py learns from Train data, picks its best epoch on Test data and never
# reads Final test data, which is left for one honest score at the end (test.py --eval).
SPLIT_FOLDERS = {TRAINING: "Train data", VALIDATION: "Test data", FINAL_TEST: "Final test data"}


def split_of(usage):
    """The folder for a row's Usage: Train data without a Usage column; any other value goes with PublicTest."""
    if usage is None:
        return SPLIT_FOLDERS[TRAINING]
    return next((f for u, f in SPLIT_FOLDERS.items() if u.lower() == usage.strip().lower()), SPLIT_FOLDERS[VALIDATION])


def split_order(folder):
    """Train data, Test data, Final test data, in that order."""
    order = list(SPLIT_FOLDERS.values())
    return order.index(folder) if folder in order else len(order)


def write_images(faces, labels, usage, root, progress=True):
    """Write each face as <root>/<split>/<emotion>/<row>.jpg, but those labelled -1 (left out).

    Returns ({split: per-class counts}, {row: image path relative to root}).
    """

    width = max(5, len(str(len(faces) - 1)))
    counts, written = {}, {}
    made = set()
    for i in tqdm(range(len(faces)), desc="writing images", unit=" img", disable=not progress, mininterval=0.5):
        if labels[i] < 0:
            continue
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
        written[i] = f"{split}/{emotion}/{Path(name).name}"
    return counts, written


def ferplus_labels(args, ferplus, labels, usage, bad, rows):
    """(votes of each face read, FER+'s folder label per face or -1, a summary line) from --ferplus, whose
    read_ferplus (votes, usage) is `ferplus`.

    `rows`: each face's data row in the CSV (read_csv's with_rows), so rows --skip-bad left out leave FER+'s too.
    """
    votes, fp_usage = ferplus
    check_ferplus_rows(args.ferplus, args.csv, fp_usage, usage, len(labels) + len(bad), rows)
    votes = votes[rows]
    folder = ferplus_plurality(votes, labels)
    out = folder < 0
    top = [FERPLUS_COLUMNS[j] for j in votes[out].argmax(1)]
    why = ", ".join(f"{k} {top.count(k)}" for k in ("NF", "unknown", "contempt") if top.count(k))
    agree = float((folder[~out] == labels[~out]).mean()) if (~out).any() else 0.0
    line = (
        f"FER+: faces filed by their people's most-voted emotion (FER2013's label agrees on {agree:.0%}); "
        f"{int(out.sum())} left out, their votes mostly for another answer ({why or 'none'})"
    )
    return votes, folder, line


def plot_distribution(counts, path):
    """A bar chart of images per emotion for each split."""
    fig, ax = plt.subplots(figsize=(8, 4))
    n = len(counts)
    for k, (split, c) in enumerate(sorted(counts.items(), key=lambda kv: split_order(kv[0]))):
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
    splits = sorted(counts, key=split_order)
    w = max(map(len, splits)) + 2
    lines = [f"{'emotion':<10}" + "".join(f"{s:>{w}}" for s in splits)]
    for i, e in enumerate(EMOTIONS):
        lines.append(f"{e:<10}" + "".join(f"{counts[s][i]:>{w}}" for s in splits))
    lines.append(f"{'total':<10}" + "".join(f"{sum(counts[s]):>{w}}" for s in splits))
    return "\n".join(lines)


def remove_tree(path, progress=True, what="removing"):
    """Remove a folder file by file under a progress bar: a previous face_datasets/ holds ~36,000 images."""
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    for f in tqdm(files, desc=what, unit=" files", disable=not progress or len(files) < 1000, mininterval=0.5):
        os.remove(f)
    shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(out, progress=True):
    """Folders a run killed outright (not by Ctrl-C, which cleans up) left beside `out`; returns how many."""
    stale = sorted(out.parent.glob(f".{out.name}.new-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))
    for folder in stale:
        remove_tree(folder, progress, f"removing {folder.name}, left by an earlier run")
    return len(stale)


def swap_in(new, out, progress=True):
    """Replace folder `out` by `new` with two renames, then remove the old one.

    Once the renames are done the new folder is complete; a Ctrl-C while the old one is being removed
    finishes the removal first (it was asked to go) and then says so, so nothing is left half-removed.
    """
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(new, out)
    if old is not None:
        try:
            remove_tree(old, progress, f"removing the previous {out.name}")
        except KeyboardInterrupt:
            shutil.rmtree(old, ignore_errors=True)
            raise Interrupted(
                f"{out} was already complete with the new images; the previous copy was removed"
            ) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Turn FER2013's CSV into JPG images, one folder per emotion.")
    p.add_argument(
        "--csv",
        type=Path,
        default=DEFAULT_CSV,
        help="FER2013 CSV: .csv, .csv.gz, or Kaggle's .zip/.tar.gz as downloaded (default: data/train.csv)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "face_datasets",
        help="output folder, replaced as a whole at the end (default: face_datasets/)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad rows out and list them in <out>/rejects.csv (default: stop at the first)",
    )
    p.add_argument(
        "--ferplus",
        type=Path,
        default=None,
        help="Microsoft's FER+ votes for the same rows (fer2013new.csv): file faces by what most of ten people "
        f"saw and keep the votes in <out>/{FERPLUS_VOTES_FILE} (default: none, FER2013's labels)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    return p.parse_args(argv)


def main(args):
    start = time.perf_counter()
    progress = not args.no_progress
    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    if not args.csv.exists() and args.csv == DEFAULT_CSV:
        found = sorted(p.name for p in DEFAULT_CSV.parent.glob("*") if p.name.endswith(DATA_SUFFIXES))
        if found:
            raise UserError(
                f"{DEFAULT_CSV} not found, but data/ holds {', '.join(found)}: "
                f"python preparation.py --csv data/{found[0]}"
            )
    ferplus = read_ferplus(args.ferplus) if args.ferplus is not None else None  # the smaller file: its errors first
    faces, labels, usage, bad, rows = read_csv(args.csv, skip_bad=args.skip_bad, progress=progress, with_rows=True)
    votes, folder_labels, ferplus_line = None, labels, None
    if ferplus is not None:
        votes, folder_labels, ferplus_line = ferplus_labels(args, ferplus, labels, usage, bad, rows)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if remove_leftovers(out, progress):
            print(f"removed the temporary folders an earlier, killed run left beside {out}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write to {out.parent} ({e.strerror}): choose another --out") from None
    written = False
    try:
        counts, images = write_images(faces, folder_labels, usage, tmp, progress=progress)
        if votes is not None:
            write_votes(tmp / FERPLUS_VOTES_FILE, images, labels, votes)
        if bad:
            with open(tmp / "rejects.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["line", "problem"])
                w.writerows(bad)
        plot_distribution(counts, tmp / "class_distribution.png")
        written = True
    except OSError as e:
        raise UserError(f"cannot write under {out.parent} ({e.strerror}): free space or choose another --out") from None
    except KeyboardInterrupt:
        raise Interrupted(f"{out} was left as it was" if out.exists() else "nothing was written") from None
    finally:
        if not written:
            shutil.rmtree(tmp, ignore_errors=True)
    swap_in(tmp, out, progress)

    print(format_table(counts))
    if bad:
        print(f"skipped {describe_bad(bad)}; see {out / 'rejects.csv'}")
    if ferplus_line:
        print(f"{ferplus_line}; votes: {out / FERPLUS_VOTES_FILE}")
    print(
        f"wrote {len(images)} images to {out} in {time.perf_counter() - start:.1f}s; "
        f"class chart: {out / 'class_distribution.png'}"
    )
    if FINAL_TEST in set(usage or ()):
        print(
            f"train.py validates on '{SPLIT_FOLDERS[VALIDATION]}' ({VALIDATION}) and never reads "
            f"'{SPLIT_FOLDERS[FINAL_TEST]}' ({FINAL_TEST}): score it once at the end with "
            f'python test.py --eval "{out / SPLIT_FOLDERS[FINAL_TEST]}"'
        )
    return {"out": out, "counts": counts, "bad": bad, "written": len(images)}


if __name__ == "__main__":
    run_main(main, parse_args())
