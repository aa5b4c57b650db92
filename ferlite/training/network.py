"""The network, what it is fed, and how it answers: the model file of this project in code.

Used by train.py (training and validation), test.py (--engine pytorch, --eval of a `.pt`), the ONNX export and
benchmark.py. PyTorch's side of the package: the runtime (ferlite's top level) answers from the ONNX copy instead.
"""

from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse

from ferlite.errors import UserError
from ferlite.names import IMAGE_SIZE
from ferlite.onnx_model import PREDICT_BATCH
from ferlite.training.checkpoints import load_checkpoint

# Gray values are scaled to [0, 1], then standardised with these (FER2013's own statistics,
# rounded); the checkpoint carries them so a model always gets the input it was trained on.
NORM_MEAN = 0.508
NORM_STD = 0.255
# Every training face goes through train.py's bilinear warp at a random sub-pixel position, which
# blurs it a little (a kernel (1-a, a) on each axis, a anywhere in [0, 1)); a face fed as is is
# sharper than nearly all the net was trained on. predict_proba() therefore resamples each face at
# this fixed offset (pixels, right and down): a kernel (0.75, 0.25) on each axis, whose spread
# (a(1-a) = 3/16) is near a random warp's average (1/6). What it gained: RESULTS.md.
TEST_SHIFT = 0.25


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

    def __init__(self, num_classes=7, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), dropout=0.3, extra_heads=()):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                # The first stage keeps the stem's size; each later one starts by halving it.
                layers.append(ResidualBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        # More answers from the same features (train.py: one head learns FER+'s votes, another FER2013's labels).
        self.extra_heads = nn.ModuleDict({name: nn.Linear(cin, num_classes) for name in extra_heads})

    def forward(self, x):
        """The answering head's logits; in training mode with extra heads, a tuple: that head's, then each extra's."""
        x = self.features(self.stem(x))
        x = self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.training and len(self.extra_heads):
            return (self.head(x), *(h(x) for h in self.extra_heads.values()))
        return self.head(x)


class Ensemble(nn.Module):
    """Networks of the same classes and heads answering as one (tools/ensemble.py writes such a model file): each
    member's probabilities, averaged, given back as their log, so that the softmax every caller applies gives the
    average itself. `members`: each member's {"arch", "arch_args"}. Answers only; it is not trained as one."""

    def __init__(self, num_classes=7, members=()):
        super().__init__()
        self.members = nn.ModuleList(build_model(m["arch"], m.get("arch_args", {}), num_classes) for m in members)

    @property
    def head(self):
        """The first member's answering head (its size is the classes')."""
        return self.members[0].head

    def forward(self, x):
        return torch.stack([m(x).float().softmax(-1) for m in self.members]).mean(0).log()


ARCHITECTURES = {"EmotionNet": EmotionNet, "Ensemble": Ensemble}


def fuse_for_inference(model):
    """An eval-mode copy of `model` with each BatchNorm folded into the convolution before it.

    The same function as the model's in float32 (to rounding); under bfloat16 a few borderline
    faces can change class, so train.py scores with the fused copy too and its recorded accuracy
    is the one test.py --eval finds.
    """
    return fuse(model.eval()).to(memory_format=torch.channels_last).eval()


def answering_with(model, head):
    """A copy of `model` that answers with extra head `head` (by name) in place of its own; `model` is unchanged."""
    if isinstance(model, Ensemble):
        copy = deepcopy(model)
        copy.members = nn.ModuleList(answering_with(m, head) for m in model.members)
        return copy
    copy = deepcopy(model)
    copy.head = copy.extra_heads[head]
    copy.extra_heads = nn.ModuleDict()
    return copy


def build_model(arch, arch_args, num_classes):
    """The model named `arch`, built with its keyword arguments."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}: this version knows {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, **arch_args)


def cpu_has_bf16():
    """True where the CPU runs bfloat16 natively (AVX-512 BF16 or AMX), so autocast pays off.

    Not oneDNN's own test (torch.ops.mkldnn._is_mkldnn_bf16_supported): that is also true on AVX-512
    CPUs without BF16, which emulate it more slowly than float32 trains (RESULTS.md). Where torch cannot
    tell (an older torch, not x86), float32.
    """
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in native if check is not None)
    except RuntimeError:
        return False


def autocast_dtype(device, enabled=True):
    """The precision rule: bfloat16 where the device runs it natively (a CPU with AVX-512 BF16 or AMX, a GPU
    with bfloat16), float16 on a GPU without it, None (float32) elsewhere or when not `enabled`."""
    if not enabled:
        return None
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast_for(device, enabled=True):
    """Autocast to autocast_dtype(device, enabled), or a no-op context where that is float32."""
    dtype = autocast_dtype(device, enabled)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


@torch.no_grad()
def predict_both(
    model,
    faces,
    device,
    mean=NORM_MEAN,
    std=NORM_STD,
    batch_size=PREDICT_BATCH,
    bf16=False,
    shift=TEST_SHIFT,
    mirror=True,
):
    """Class probabilities (plain, mirror-averaged) for uint8 faces (N, 48, 48), from the same forward passes.

    float32 unless `bf16` asks for bfloat16 autocast: bfloat16 kernels round differently on AMX, AVX-512 BF16
    and GPUs, so every figure (--eval, validation, the int8 check) is scored in float32 and one model gives one
    figure on every machine; only classifying photos and video with PyTorch passes bf16=True, for speed.

    Each face is first resampled `shift` pixels off (see TEST_SHIFT), the mirror image after that. Without
    `mirror` only the plain pass runs and both answers are the plain one. `batch_size` counts the images of
    one forward call, mirror images included.
    """
    model.eval()
    plain, averaged = [], []
    step = max(1, batch_size // 2) if mirror else batch_size
    for i in range(0, len(faces), step):
        x = subpixel_shift(to_input(faces[i : i + step], mean, std).to(device), shift)
        n = len(x)
        with autocast_for(device, bf16):
            if mirror:
                pair = model(torch.cat([x, torch.flip(x, dims=[3])])).float().softmax(1)
                p = pair[:n]
                averaged.append(((p + pair[n:]) / 2).cpu())
            else:
                p = model(x).float().softmax(1)
                averaged.append(p.cpu())
        plain.append(p.cpu())
    if not len(faces):
        empty = torch.zeros(0, model.head.out_features)
        return empty, empty.clone()
    return torch.cat(plain), torch.cat(averaged)


def predict_proba(
    model, faces, device, mean=NORM_MEAN, std=NORM_STD, tta=True, batch_size=PREDICT_BATCH, bf16=False, shift=TEST_SHIFT
):
    """Class probabilities (N, C) for uint8 faces (N, 48, 48); with `tta`, averaged with the mirror image; float32
    unless `bf16` (predict_both)."""
    plain, averaged = predict_both(model, faces, device, mean, std, batch_size, bf16, shift, mirror=tta)
    return averaged if tta else plain


def head_names(ckpt):
    """The names of a checkpoint's heads, the answering one first (a model saved before heads had names: fer2013)."""
    return list(ckpt.get("heads", ["fer2013"]))


def model_from_checkpoint(ckpt, device, path="model", head=None, fused=True):
    """Rebuild the model a checkpoint describes and load its weights, fused for inference (fuse_for_inference)
    unless not `fused` (then in eval mode, with all its heads).

    `head` names the head that answers (head_names); None: the checkpoint's own answering head.
    """
    names = head_names(ckpt)
    if head is not None and head not in names:
        raise UserError(f"--head {head}: model file {path} has {' and '.join(names)} only; pass one of those")
    try:
        model = build_model(ckpt["arch"], ckpt.get("arch_args", {}), len(ckpt["class_names"]))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, KeyError) as e:
        raise UserError(
            f"model file {path} does not match architecture {ckpt.get('arch')!r} of this code "
            f"({str(e).splitlines()[0][:120]}): retrain with train.py"
        ) from None
    if head is not None and head != names[0]:
        model = answering_with(model, head)
    return fuse_for_inference(model.to(device)) if fused else model.to(device).eval()


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TorchClassifier:
    """A model file's network as a Recognizer's classifier (ferlite.recognizer): PyTorch answers, with the head
    chosen here, in bfloat16 autocast where `bf16` and the device runs it natively (photos, video), else float32."""

    def __init__(self, path, device, head=None, bf16=True):
        ckpt = load_checkpoint(path)
        self.path, self.device, self.bf16 = Path(path), device, bf16
        self.heads = head_names(ckpt)
        self.head = head or self.heads[0]
        self.model = model_from_checkpoint(ckpt, device, path, head=self.head)
        self.classes = list(ckpt["class_names"])
        self.mean, self.std = ckpt.get("mean", NORM_MEAN), ckpt.get("std", NORM_STD)
        self.size = ckpt.get("input_size", IMAGE_SIZE)

    def predict_proba(self, faces, head=None):
        """Probabilities (N, C) for uint8 faces (N, 48, 48), as a NumPy array; `head` must be the one chosen."""
        if head not in (None, self.head):
            raise ValueError(f"this classifier answers with the {self.head} head, not {head}")
        return predict_proba(self.model, faces, self.device, self.mean, self.std, bf16=self.bf16).numpy()
