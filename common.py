"""What preparation.py, train.py and test.py share: emotion names, the model, preprocessing,
face detection, device choice, seeding and checkpoint save/load.

Nothing here runs on import; every function takes what it needs as arguments.
"""
import contextlib
import csv
import gzip
import io
import os
import random
import shutil
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent

# FER2013's label ids, in id order (the CSV's `target` column indexes this tuple).
EMOTIONS = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")
IMAGE_SIZE = 48
# Gray values are scaled to [0, 1], then standardised with these (FER2013's own statistics,
# rounded); the checkpoint carries them so a model always gets the input it was trained on.
NORM_MEAN = 0.508
NORM_STD = 0.255
CHECKPOINT_FORMAT = 1
# Every training face goes through train.py's bilinear warp at a random sub-pixel position, which
# blurs it a little (a kernel (1-a, a) on each axis, a anywhere in [0, 1)); a face fed as is is
# sharper than nearly all the net was trained on. predict_proba() therefore resamples each face at
# this fixed offset (pixels, right and down): a kernel (0.75, 0.25) on each axis, whose spread
# (a(1-a) = 3/16) is near a random warp's average (1/6). On val.csv.gz, with the mirror image, the
# 60-epoch model went from 67.76% to 68.82%, two other 60-epoch runs gained 0.5 points each (README,
# "Results").
TEST_SHIFT = 0.25
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


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
# Model


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut (a 1x1 conv where the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class EmotionNet(nn.Module):
    """A compact ResNet for 48x48 grayscale faces: a 3x3 stem, then stages that halve the size.

    A stage with 0 blocks adds nothing: blocks=(0, 1, 1, 1, 1) keeps only the stem at 48x48, and the
    first block halves it to 24x24 (train.py's default).
    """

    def __init__(self, num_classes=7, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), dropout=0.3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                # The first stage keeps the stem's size; each later one starts by halving it.
                layers.append(ResidualBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.features(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(self.dropout(x))


ARCHITECTURES = {"EmotionNet": EmotionNet}


def fuse_for_inference(model):
    """An eval-mode copy of `model` with each BatchNorm folded into the convolution before it.

    The same function as the model's in float32 (to rounding); under bfloat16 a few borderline
    faces can change class, so train.py scores with the fused copy too and its recorded accuracy
    is the one test.py --eval finds.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval()).to(memory_format=torch.channels_last).eval()


def build_model(arch, arch_args, num_classes):
    """The model named `arch`, built with its keyword arguments."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}: this version knows {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, **arch_args)


# ---------------------------------------------------------------------------------------------
# Devices and precision


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


def cpu_has_bf16():
    """True where oneDNN runs bfloat16 natively (AVX-512 BF16 or AMX), so autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device, enabled=True):
    """bfloat16 autocast where the device runs it fast, else a no-op context."""
    if not enabled:
        return nullcontext()
    if device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def set_seed(seed):
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def to_input(faces, mean=NORM_MEAN, std=NORM_STD):
    """uint8 faces (N, 48, 48) as a NumPy array or tensor -> normalised float tensor (N, 1, 48, 48)."""
    x = torch.as_tensor(np.asarray(faces) if not torch.is_tensor(faces) else faces)
    x = x.float().div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze(1).contiguous(memory_format=torch.channels_last)


def subpixel_shift(x, shift=TEST_SHIFT):
    """Normalised faces (N, 1, H, W) resampled bilinearly `shift` pixels right and down, the border repeated.

    The same numbers as grid_sample at that offset (padding_mode="border"), without building a grid.
    """
    if not shift:
        return x
    a = float(shift)
    p = F.pad(x, (0, 1, 0, 1), mode="replicate")
    rows = p[:, :, :-1] * (1 - a) + p[:, :, 1:] * a
    return (rows[..., :-1] * (1 - a) + rows[..., 1:] * a).contiguous(memory_format=torch.channels_last)


def crop_face(gray, box, size=IMAGE_SIZE):
    """The face in `box` (x, y, w, h) of a gray image, resized to size x size uint8."""
    import cv2

    x, y, w, h = (int(v) for v in box)
    crop = gray[max(y, 0):y + h, max(x, 0):x + w]
    interp = cv2.INTER_AREA if min(crop.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


@torch.no_grad()
def predict_proba(model, faces, device, mean=NORM_MEAN, std=NORM_STD, tta=True, batch_size=64, bf16=True, both=False,
                  shift=TEST_SHIFT):
    """Class probabilities (N, C) for uint8 faces (N, 48, 48); with `tta`, averaged with the mirror image.

    Each face is first resampled `shift` pixels off (see TEST_SHIFT), the mirror image after that.

    With `both`, returns (plain, averaged) from the same passes: what train.py records without and
    with test-time augmentation, for the cost of the averaged ones alone.
    `batch_size` counts the images of one forward call, mirror images included: calls of 64 ran 25%
    faster than 256 on a 2-core EPYC (the activations stay in cache). A face and its mirror image
    go through in the same call: one face took 4.7 instead of 6.2 ms (median of 3 x 40 calls), with
    the same answers to the bit on val.csv.gz.
    """
    model.eval()
    plain, averaged = [], []
    step = max(1, batch_size // 2) if (tta or both) else batch_size  # batch_size images a call, mirrors included
    for i in range(0, len(faces), step):
        x = subpixel_shift(to_input(faces[i:i + step], mean, std).to(device), shift)
        n = len(x)
        with autocast_for(device, bf16):
            if tta or both:
                pair = model(torch.cat([x, torch.flip(x, dims=[3])])).float().softmax(1)
                p = pair[:n]
                averaged.append(((p + pair[n:]) / 2).cpu())
            else:
                p = model(x).float().softmax(1)
        if both or not tta:  # test.py's path wants only the averaged answers: no copy of the plain ones
            plain.append(p.cpu())
    if not len(faces):
        empty = torch.zeros(0, model.head.out_features)
        return (empty, empty.clone()) if both else empty
    if both:
        return torch.cat(plain), torch.cat(averaged)
    return torch.cat(averaged) if tta else torch.cat(plain)


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
    csvs = [n for n in names if n.lower().endswith((".csv", ".csv.gz")) and "__MACOSX" not in n
            and not Path(n).name.startswith(".")]
    for want in ARCHIVE_CSV_NAMES:
        found = [n for n in csvs if Path(n).name.lower() in (want, want + ".gz")]
        if found:
            return found[0]
    if len(csvs) == 1:
        return csvs[0]
    inside = ", ".join(Path(n).name for n in (csvs or names)[:5]) or "nothing"
    raise UserError(f"{path} is an archive holding {'several CSVs' if csvs else 'no CSV'} ({inside}): extract "
                    f"FER2013's CSV (e.g. unzip {path.name} or tar -xzf {path.name}) and pass it with --csv")


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


def read_csv(path, skip_bad=False, progress=True):
    """Parse a FER2013 CSV into (faces uint8 (N,48,48), labels, usage list or None, bad rows).

    `bad` is a list of (line number, reason). Without `skip_bad` the first bad row raises UserError.
    Line numbers count from 1 at the header, as an editor shows them.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: put FER2013's train.csv there (see README) or pass --csv")
    csv.field_size_limit(1 << 24)  # a pixels field is ~9 KB, over the csv module's 128 KB limit only if broken
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
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error, zipfile.BadZipFile, tarfile.TarError) as e:
        what = "truncated or damaged" if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile,
                                                        tarfile.TarError)) else "unreadable"
        raise UserError(f"{path} is {what} ({type(e).__name__}: {str(e)[:80]}): download it again") from None
    if bad and not skip_bad:
        raise UserError(f"{path} line {bad[0][0]}: row {bad[0][1]} ({describe_bad(bad)}); fix or remove "
                        f"{'it' if len(bad) == 1 else 'them'}, or pass --skip-bad to leave bad rows out")
    if not faces:
        extra = f" ({describe_bad(bad)})" if bad else ""
        raise UserError(f"{path} has no usable data rows{extra}: check that it is FER2013's CSV")
    return np.stack(faces), np.array(labels, dtype=np.int64), (usage if use_col is not None else None), bad


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
        raise UserError(f"{path}: every row is marked {TRAINING} in its Usage column, so the model may have "
                        f"learned them: pass a CSV with {VALIDATION} or {FINAL_TEST} rows")
    kinds = sorted(set(names[keep]))
    counts = ", ".join(f"{k} {int((names == k).sum()):,}" for k in kinds)
    left = int((~keep).sum())
    return np.flatnonzero(keep), (f"rows by Usage: {counts}" + (f"; {left:,} other rows left out" if left else ""))


# ---------------------------------------------------------------------------------------------
# Scores (train.py's validation and test.py --eval report the same figures from one function)


def metrics_from_confusion(cm):
    """Accuracy, macro-F1 and per-class precision/recall/F1 (0 where undefined, as scikit-learn) of a confusion matrix."""
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
        "per_class": {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": support.tolist()},
    }


def plot_confusion(confusion, classes, path, normalize, title):
    """The confusion matrix as a seaborn heatmap, counts or row-normalised rates, saved as PNG."""
    # Imported here: matplotlib and seaborn take about a second to import, paid only by runs that draw.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import seaborn as sns

    cm = np.array(confusion, dtype=float)
    if normalize:
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    sns.heatmap(cm, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues", xticklabels=classes,
                yticklabels=classes, ax=ax, cbar=True)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Face detection


def load_face_detector():
    """OpenCV's frontal-face Haar cascade, the one that ships with opencv-python."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise UserError(f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them): "
                        "pip install 'opencv-python<5', or pass --no-detect with face crops")
    path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"could not load the Haar cascade {path}: reinstall 'opencv-python-headless<5'")
    return cascade


def detect_faces(cascade, gray, scale_factor=1.1, min_neighbors=3, min_weight=0.0, min_size_frac=0.0, max_side=1280):
    """Face boxes (x, y, w, h) in a gray uint8 image; large images are searched at a smaller size.

    A low `min_neighbors` finds more faces; `min_weight`, the cascade's confidence in its last stage
    (detectMultiScale3's level weight), then removes the weak detections that are mostly not faces.
    The search runs on a histogram-equalised copy (finds more faces in dim or flat light); where that
    finds none, on the plain image, since equalising a photo that is mostly flat background (a face on
    a white wall) washes the face out.
    """
    import cv2

    h, w = gray.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else gray
    min_side = max(20, int(min_size_frac * min(small.shape[:2])))
    if min(small.shape[:2]) < min_side:
        return []
    for image in (cv2.equalizeHist(small), small):
        boxes, _, weights = cascade.detectMultiScale3(image, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                                      minSize=(min_side, min_side), outputRejectLevels=True)
        found = [tuple(int(round(v / scale)) for v in b) for b, wt in zip(boxes, np.ravel(weights)) if wt >= min_weight]
        if found:
            return found
    return []


# ---------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path, backup=None):
    """torch.save to a temp file beside `path`, then rename over it; with `backup` (a path), keep the old file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a model file is for everyone who can read the folder
    try:
        torch.save(obj, tmp)
        if backup is not None and path.exists():
            shutil.copy2(path, backup)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """A checkpoint dict read with weights_only=True; one clear error for each way it can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found: train one with train.py or pass --model")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"model file {path} is damaged or not a PyTorch checkpoint ({type(e).__name__}): "
                        "restore it from git or retrain with train.py") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise UserError(f"model file {path} is not a checkpoint of this project (no state_dict/arch): retrain with train.py")
    version = ckpt.get("format_version", 0)
    if version > CHECKPOINT_FORMAT:
        raise UserError(f"model file {path} has format {version}, newer than this code reads ({CHECKPOINT_FORMAT}): update the code")
    return ckpt


def model_from_checkpoint(ckpt, device, path="model"):
    """Rebuild the model a checkpoint describes and load its weights, fused for inference (fuse_for_inference)."""
    try:
        model = build_model(ckpt["arch"], ckpt.get("arch_args", {}), len(ckpt["class_names"]))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, KeyError) as e:
        raise UserError(f"model file {path} does not match architecture {ckpt.get('arch')!r} of this code "
                        f"({str(e).splitlines()[0][:120]}): retrain with train.py") from None
    return fuse_for_inference(model.to(device))


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
