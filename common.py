"""What preparation.py, train.py and test.py share: emotion names, the model, preprocessing,
face detection, device choice, seeding and checkpoint save/load.

Nothing here runs on import; every function takes what it needs as arguments.
"""
import os
import random
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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


def run_main(main, args):
    """Run a script's main(args): user errors and Ctrl-C become one line and a non-zero exit."""
    debug = getattr(args, "debug", False) or os.environ.get("FER_DEBUG")
    try:
        return main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: earlier outputs were left as they were", file=sys.stderr)
        sys.exit(130)


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
# Face detection


def load_face_detector():
    """OpenCV's frontal-face Haar cascade, the one that ships with opencv-python."""
    import cv2

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


def atomic_save(obj, path, backup=False):
    """torch.save to a temp file beside `path`, then rename over it; with `backup`, keep the old file as *.bak.pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a model file is for everyone who can read the folder
    try:
        torch.save(obj, tmp)
        if backup and path.exists():
            shutil.copy2(path, path.with_suffix(".bak.pt"))
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
