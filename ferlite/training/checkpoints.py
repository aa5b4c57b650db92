"""Checkpoints (plain types, read with weights_only=True), devices and seeds."""

import random
from pathlib import Path

import numpy as np
import torch

from ferlite.errors import UserError
from ferlite.files import atomic_write

CHECKPOINT_FORMAT = 1


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
