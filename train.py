"""Train the facial emotion CNN on the images preparation.py wrote.

    python preparation.py --csv data/fer2013.csv --ferplus data/fer2013new.csv && python train.py   # the shipped model
    python train.py --data "face_datasets/Train data" --val data/fer2013.csv    # validate on a CSV's PublicTest rows
    python train.py --resume runs/<date-time>/Facial_Emotion_Recognizer.last.pt   # continue an interrupted run

With FER+'s votes beside the folders (face_datasets/ferplus_votes.csv, from preparation.py --ferplus) the
network gets two heads: the answering one learns each face's vote shares, the other FER2013's labels
(test.py --head); without them, one head learns the folders' labels.
Images are read once through torchvision's ImageFolder into memory; augmentation then runs on
whole batches as tensor operations, so two CPU cores spend their time in the convolutions.
Writes the best model (by validation accuracy) to --out, the last epoch beside it as *.last.pt
for --resume, and confusion matrices, training curves and a metrics JSON beside it.
"""

import argparse
import csv
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from common import (
    CHECKPOINT_FORMAT,
    EMOTIONS,
    FERPLUS_COLUMNS,
    FERPLUS_VOTES_FILE,
    IMAGE_SIZE,
    REPO_ROOT,
    VALIDATION,
    Interrupted,
    UserError,
    atomic_save,
    beside_model,
    choose_device,
    ferplus_shares,
    held_out_rows,
    load_checkpoint,
    metrics_from_confusion,
    plot_confusion,
    project_relative,
    read_csv,
    run_main,
    set_seed,
)
from network import (
    NORM_MEAN,
    NORM_STD,
    PREDICT_BATCH,
    TEST_SHIFT,
    answering_with,
    autocast_for,
    build_model,
    count_parameters,
    cpu_has_bf16,
    fuse_for_inference,
    predict_both,
    to_input,
    write_int8,
)

MODEL_NAME = "Facial_Emotion_Recognizer.pt"
RUNS_DIR = REPO_ROOT / "runs"  # each run's own folder unless --out names a file: a trial run never replaces a model
VAL_HELP = "pass a FER2013 CSV (.csv or .csv.gz) or a folder with one folder per emotion"
VAL_FRACTION = 0.1  # held out, stratified, when no validation set is given
GPU_PREDICT_BATCH = 4096  # images a validation call on a GPU (a CPU's are network.PREDICT_BATCH)

# ---------------------------------------------------------------------------------------------
# The recipe. train.py's defaults reproduce the shipped model (tests compare them with its metrics JSON);
# what each choice gave is in RESULTS.md. The checkpoint and the metrics JSON record all of it.
DEFAULT_ARCH = "EmotionNet"
# A 32-channel stem at 48x48, then one residual block at each of 24, 12, 6 and 3 pixels: narrow enough
# that 100 epochs fit in two hours on two CPU cores, where more epochs paid more than more width.
DEFAULT_ARCH_ARGS = {"widths": [32, 48, 96, 192, 384], "blocks": [0, 1, 1, 1, 1], "dropout": 0.3}
EPOCHS = 100  # validation accuracy still creeps up at the end; the two-hour budget is what stops it
BATCH_SIZE = 128
PEAK_LR = 0.1  # the one-cycle schedule's peak, for SGD with Nesterov momentum
MOMENTUM = 0.9
WARMUP_SHARE = 0.15  # share of the steps in which the one-cycle rate rises to its peak
WEIGHT_DECAY = 5e-4  # on conv and linear weights only: biases and BatchNorm are left free
LABEL_SMOOTHING = 0.1  # FER2013's labels are noisy (people agree with them about 65% of the time)
EMA_DECAY = 0.999  # validated and shipped: an exponential average of the weights (ema_with_warmup)
CLASS_WEIGHT_POWER = 0.5  # loss weight (1 / class frequency) ** 0.5: lifts disgust without wrecking the rest
# With FER+'s votes (preparation.py --ferplus) the network has two heads on the same features: the answering
# one learns each face's vote shares (what ten people saw), the other FER2013's one label; the losses are added.
# The votes alone lost FER2013's benchmark and posed faces, FER2013's labels alone lost photos (RESULTS.md).
HEADS = ("ferplus", "fer2013")
# Tone: half the faces get another exposure and contrast, so that the model holds on faces lit, exposed and
# contrast-enhanced otherwise than FER2013's (photos; the JPEG release's enhanced copy of FER2013).
TONE_P = 0.5
TONE_GAMMA = 0.3  # gamma exp(U(-0.3, 0.3)): 0.74-1.35
TONE_CONTRAST = (0.7, 1.5)  # around each face's own mean; over 1 some pixels clip, as in the enhanced copy
TONE_BRIGHTNESS = 0.08  # +-8% of the gray range
MIXUP_ALPHA = 0.0  # mixup off: it did not help this net
PHOTO_AUG = False  # photo_look() and a wider scale jitter (the PHOTO_* constants below)
SEED = 0
# The schedule a run is started with; --resume takes it from the checkpoint (a changed schedule cannot resume).
SCHEDULE_DEFAULTS = {
    "epochs": EPOCHS,
    "batch_size": BATCH_SIZE,
    "lr": PEAK_LR,
    "mixup": MIXUP_ALPHA,
    "photo_aug": PHOTO_AUG,
    "seed": SEED,
    "max_batches": 0,
}
# What a checkpoint that does not record a schedule flag was trained with (it predates the flag).
SCHEDULE_UNRECORDED = {"photo_aug": False}
RECIPE = {
    "momentum": MOMENTUM,
    "warmup_share": WARMUP_SHARE,
    "weight_decay": WEIGHT_DECAY,
    "label_smoothing": LABEL_SMOOTHING,
    "ema_decay": EMA_DECAY,
    "class_weight_power": CLASS_WEIGHT_POWER,
    "tone": {"p": TONE_P, "gamma": TONE_GAMMA, "contrast": list(TONE_CONTRAST), "brightness": TONE_BRIGHTNESS},
}


# ---------------------------------------------------------------------------------------------
# Data


def load_image_folder(root, progress=True, with_paths=False):
    """All images of an ImageFolder tree as uint8 (N, 48, 48), labels and class names; bad files skipped.

    Returns (faces, labels, classes, skipped) where skipped lists (path, reason); `with_paths` adds the
    path of each face read, last.
    """

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} not found: run preparation.py first or pass --data")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise UserError(
            f"data folder {root} has no class folders: expected one folder per emotion "
            f"({', '.join(EMOTIONS)}); run preparation.py"
        )
    unknown = [d for d in subdirs if d not in EMOTIONS]
    if unknown:
        raise UserError(
            f"data folder {root}: class folder {unknown[0]!r} is not one of the seven emotions "
            f"({', '.join(EMOTIONS)}); rename or remove it"
        )
    try:
        ds = ImageFolder(str(root), loader=lambda p: p, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"data folder {root}: {e}") from None
    counts = np.bincount([t for _, t in ds.samples], minlength=len(ds.classes))
    empty = [c for c, n in zip(ds.classes, counts) if n == 0]
    if empty:
        raise UserError(f"data folder {root}: class folder {empty[0]!r} has no images; add images or remove the folder")
    faces, labels, skipped, paths = [], [], [], []
    for path, target in tqdm(
        ds.samples, desc=f"loading {root.name}", unit=" img", disable=not progress, mininterval=0.5
    ):
        try:
            with Image.open(path) as im:
                im = im.convert("L")
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                faces.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            skipped.append((path, f"{type(e).__name__}: {str(e)[:60]}"))
            continue
        labels.append(target)
        paths.append(path)
    if not faces:
        raise UserError(f"data folder {root} has no readable images ({len(skipped)} unreadable)")
    loaded = np.stack(faces), np.array(labels, dtype=np.int64), list(ds.classes), skipped
    return (*loaded, paths) if with_paths else loaded


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
    unknown = next((n for n in names if n not in classes), None)
    if unknown is not None:
        raise UserError(f"{path}: a face labelled {unknown!r} by FER2013, which the training folders lack: {redo}")
    shares = ferplus_shares(votes)[:, [EMOTIONS.index(c) for c in classes]]
    return shares, np.array([classes.index(n) for n in names], dtype=np.int64)


def val_source_problem(path):
    """Why `path` cannot be a --val source (missing, or a file that is not a CSV), or None."""
    if not path.exists():
        return f"--val {path} not found: {VAL_HELP}"
    if path.is_file() and not path.name.endswith((".csv", ".csv.gz")):
        return f"--val {path} is neither a .csv/.csv.gz file nor a folder: {VAL_HELP}"
    return None


def load_val_source(path, classes, progress=True, log=print, fer2013_too=False):
    """Validation faces and labels (in `classes` order) from a folder like Train data or a FER2013 CSV.

    With `fer2013_too`, also each face's FER2013 label in `classes` order: a CSV's own, or from the votes file
    beside a folder (read_votes); None for a folder without one.
    """
    path = Path(path)
    problem = val_source_problem(path)
    if problem:
        raise UserError(problem)
    if path.is_file():
        faces, ids, usage, _ = read_csv(path, progress=progress)
        rows, which = held_out_rows(path, usage, only=VALIDATION)  # never rows marked Training
        if rows is not None:
            faces, ids = faces[rows], ids[rows]
            log(f"--val {path.name}: {which}")
        names = [EMOTIONS[i] for i in ids]
        fer2013 = None
    else:
        faces, labels, val_classes, skipped, paths = load_image_folder(path, progress, with_paths=True)
        if skipped:
            log(f"skipped {len(skipped)} unreadable validation images, first {skipped[0][0]}")
        names = [val_classes[t] for t in labels]
        votes = read_votes(path, paths, classes) if fer2013_too else None
        fer2013 = votes[1] if votes is not None else None
    missing = sorted(set(names) - set(classes))
    if missing:
        raise UserError(f"--val {path} has emotion {missing[0]!r} that the training data lacks")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    if not fer2013_too:
        return faces, labels
    return faces, labels, (labels if path.is_file() else fer2013)


def stratified_split(labels, fraction, seed):
    """Train and validation indices, stratified by class (scikit-learn)."""
    from sklearn.model_selection import train_test_split  # here: scikit-learn takes a second to import, for this alone

    counts = np.bincount(labels)
    n_val = int(round(fraction * len(labels)))
    if counts[counts > 0].min() < 2 or n_val < len(counts[counts > 0]):
        raise UserError(
            f"too few images for a validation split ({len(labels)} images, smallest class "
            f"{counts[counts > 0].min()}): add images, or pass --val with a validation folder"
        )
    idx = np.arange(len(labels))
    return train_test_split(idx, test_size=n_val, stratify=labels, random_state=seed)


# --photo-aug: photos are lit, exposed, framed and sharp in other ways than FER2013's faces.
PHOTO_P = 0.5  # share of faces given a photo's look; the rest stay as FER2013 has them
PHOTO_GAMMA = 0.4  # gamma exp(U(-0.4, 0.4)): 0.67-1.49, under- and over-exposed faces
PHOTO_CONTRAST = (0.6, 1.4)  # around each face's own mean: flat and harsh light
PHOTO_BRIGHTNESS = 0.1  # +-10% of the gray range
PHOTO_LOW_RES_P = 0.3  # share of faces seen at a lower resolution (a small face in a photo, a blurred one)
PHOTO_LOW_RES = (20, 40)  # the side they are shrunk to before being scaled back to 48 px
PHOTO_NOISE = 0.03  # sensor noise, standard deviation up to 3% of the gray range
PHOTO_SCALE = (0.85, 1.15)  # wider than FER2013's own framing jitter: a detector frames faces less alike


def toned_pixels(x, r, gamma, contrast, brightness):
    """Normalised faces x (N, 1, H, W) as gray values with a random gamma exp(U(-gamma, gamma)), contrast U(contrast)
    around each face's mean and brightness U(-brightness, brightness) added, each drawn by r(n); not clamped."""
    n = x.shape[0]
    col = lambda v: v.view(n, 1, 1, 1)  # noqa: E731
    px = (x * NORM_STD + NORM_MEAN).clamp(0, 1)
    px = px.pow(col(torch.exp((r(n) * 2 - 1) * gamma)))
    lo, hi = contrast
    mean = px.mean((1, 2, 3), keepdim=True)
    return (px - mean) * col(lo + r(n) * (hi - lo)) + mean + col((r(n) * 2 - 1) * brightness)


def photo_look(x, gen):
    """For PHOTO_P of the faces: gamma, contrast and brightness, for some a lower resolution, and a little noise.

    x: normalised float (N, 1, H, W); returns the same, every change drawn from `gen`.
    """
    n, size = x.shape[0], x.shape[-1]
    r = lambda *s: torch.rand(*s, generator=gen).to(x.device)  # noqa: E731
    col = lambda v: v.view(n, 1, 1, 1)  # noqa: E731
    px = toned_pixels(x, r, PHOTO_GAMMA, PHOTO_CONTRAST, PHOTO_BRIGHTNESS)
    low = (r(n) < PHOTO_LOW_RES_P).nonzero().flatten()
    if len(low):
        side = int(PHOTO_LOW_RES[0] + r(1).item() * (PHOTO_LOW_RES[1] - PHOTO_LOW_RES[0]))
        small = F.interpolate(px[low], size=(side, side), mode="area")
        px = px.index_copy(0, low, F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False))
    noise = torch.randn(px.shape, generator=gen).to(x.device) * col(r(n) * PHOTO_NOISE)
    looked = ((px + noise).clamp(0, 1) - NORM_MEAN) / NORM_STD
    return torch.where(col(r(n) < PHOTO_P), looked, x)


def tone(x, gen, p=TONE_P):
    """For a share `p` of the faces: gamma, contrast around the face's mean and brightness (TONE_* constants).

    x: normalised float (N, 1, H, W); returns the same, every change drawn from `gen`.
    """
    n = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=gen).to(x.device)  # noqa: E731
    px = toned_pixels(x, r, TONE_GAMMA, TONE_CONTRAST, TONE_BRIGHTNESS)
    toned = (px.clamp(0, 1) - NORM_MEAN) / NORM_STD
    return torch.where((r(n) < p).view(n, 1, 1, 1), toned, x)


def augment(x, gen, max_rotate=10.0, max_shift=0.1, scale=(0.9, 1.1), erase_p=0.5, photo=False):
    """Random flip, rotation, scale and shift (one affine warp per batch), tone (tone()), then random erasing.

    With `photo`, a wider scale jitter and photo_look() before the erasing.
    x: normalised float (N, 1, H, W). All randomness comes from `gen`, so a seeded epoch is repeatable.
    """
    if photo:
        scale = PHOTO_SCALE
    n = x.shape[0]
    # Drawn on the CPU generator and moved: the same numbers on any device, so GPU runs augment identically.
    r = lambda *s: torch.rand(*s, generator=gen).to(x.device)  # noqa: E731
    angle = (r(n) * 2 - 1) * math.radians(max_rotate)
    s = scale[0] + r(n) * (scale[1] - scale[0])
    flip = torch.where(r(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, (r(n) * 2 - 1) * max_shift * 2], 1),
            torch.stack([sin * flip, cos, (r(n) * 2 - 1) * max_shift * 2], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = photo_look(x, gen) if photo else tone(x, gen)
    # Random erasing: one rectangle of 2-25% of the image per chosen face, filled with 0 (the mean).
    h, w = x.shape[2:]
    area = (0.02 + r(n) * 0.23) * h * w
    aspect = torch.exp((r(n) * 2 - 1) * math.log(3))
    eh = (area * aspect).sqrt().clamp(1, h)
    ew = (area / aspect).sqrt().clamp(1, w)
    y0 = r(n) * (h - eh)
    x0 = r(n) * (w - ew)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    mask = (
        (ys >= y0.view(n, 1, 1))
        & (ys < (y0 + eh).view(n, 1, 1))
        & (xs >= x0.view(n, 1, 1))
        & (xs < (x0 + ew).view(n, 1, 1))
        & (r(n) < erase_p).view(n, 1, 1)
    )
    return x.masked_fill(mask.unsqueeze(1), 0.0)


def mixup(x, gen, alpha):
    """Mixup (Zhang et al., 2018): each face blended with another face of the batch.

    Returns (mixed x, lam, partner): the loss is lam * loss(y) + (1 - lam) * loss(y[partner]).
    lam ~ Beta(alpha, alpha), one per batch; with alpha 0.2 most batches are nearly one face.
    Seeded by `gen`, like augment.
    """
    # torch's Beta sampler takes no generator; NumPy's, seeded from `gen`, keeps the epoch repeatable.
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    lam = float(rng.beta(alpha, alpha))
    partner = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return x.lerp(x[partner], 1.0 - lam), lam, partner


# ---------------------------------------------------------------------------------------------
# One process or many (torchrun)


class Dist:
    """Where this process stands: rank and world size under torchrun, (0, 1) under plain python."""

    def __init__(self, rank=0, world=1):
        self.rank, self.world = rank, world

    @property
    def main(self):
        return self.rank == 0

    def sum(self, values, device):
        """Element-wise sum of a list of numbers (or a NumPy array) over all processes."""
        if self.world == 1:
            return values
        t = torch.tensor(np.asarray(values, dtype=np.float64), device=device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_processes(device_name):
    """The device and a Dist; under torchrun (WORLD_SIZE > 1) also joins the process group.

    gloo on CPU, NCCL on CUDA (one GPU per process, by LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(device_name)
    if world <= 1:
        return device, Dist()
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started {world} processes but this machine has {torch.cuda.device_count()} "
                f"GPUs: lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"--device {device.type}: torchrun training runs on cpu or cuda only")
    dist.init_process_group(backend)
    return device, Dist(dist.get_rank(), dist.get_world_size())


def epoch_order(n, gen, epoch, args, procs):
    """This process's face indices for `epoch`: a seeded permutation, or its DistributedSampler share."""
    if procs.world == 1:
        return torch.randperm(n, generator=gen)

    sampler = DistributedSampler(
        range(n), num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def ema_with_warmup(decay):
    """EMA update whose decay grows as min(decay, (1 + n) / (10 + n)) with the number of updates n.

    A fixed 0.999 from the first step makes the average mostly random initial weights for the first
    few thousand steps (validation stayed near chance for epochs); the warm-up lets it track the model
    early and smooth it late.
    """

    def update(averaged, current, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # BatchNorm's step counter: take the model's
                a.copy_(c)

    return update


def train_one_epoch(run, faces, labels, *, epoch, progress=True):
    """One pass over the training faces in a seeded order; returns (mean loss, accuracy, images).

    Under torchrun run.train_model is the DistributedDataParallel wrapper and the figures are summed over processes.
    """
    args, procs, device = run.args, run.procs, run.device
    seed = (args.seed * 1000 + epoch) * procs.world + procs.rank  # one process: seed * 1000 + epoch
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    order = epoch_order(len(faces), gen, epoch, args, procs)
    n_batches = len(order) // args.batch_size or 1
    if args.max_batches:
        n_batches = min(n_batches, args.max_batches)
    model = run.train_model
    model.train()
    loss_args = {"weight": run.class_weights, "label_smoothing": LABEL_SMOOTHING}
    two_heads = run.shares is not None
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(
        range(n_batches),
        desc=f"epoch {epoch + 1}/{args.epochs}",
        unit=" batch",
        disable=not progress,
        leave=False,
        mininterval=1.0,
    )
    for b in bar:
        idx = order[b * args.batch_size : (b + 1) * args.batch_size]
        # Faces live on the training device (uint8), so on a GPU the augmentation runs there too.
        x = augment(to_input(faces[idx.to(faces.device)]), gen, photo=args.photo_aug)
        x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx.to(labels.device)]
        lam, partner = 1.0, None
        if args.mixup > 0:
            x, lam, partner = mixup(x, gen, args.mixup)
        with autocast_for(device, args.bf16):
            logits = model(x)
            if two_heads:  # the answering head learns the vote shares, the other FER2013's label
                logits, fer2013_logits = logits
                i = idx.to(labels.device)
                loss = F.cross_entropy(logits.float(), run.shares[i], weight=run.vote_weights)
                loss = loss + F.cross_entropy(fer2013_logits.float(), run.fer2013_labels[i], **loss_args)
            else:
                loss = F.cross_entropy(logits.float(), y, **loss_args)
            if partner is not None:  # each loss from its own float copy of the logits
                loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits.float(), y[partner], **loss_args)
                if lam < 0.5:  # training accuracy counts the face that dominates the blend
                    y = y[partner]
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is None:
            loss.backward()
            run.optimizer.step()
        else:  # float16 on GPUs without bfloat16
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        run.scheduler.step()
        run.ema.update_parameters(run.model)
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = procs.sum([total_loss, correct, seen], device)
    return float(total_loss / seen), float(correct / seen), int(seen)


def evaluate(model, faces, labels, device, bf16, n_classes=None, procs=Dist()):
    """(with, without test-time augmentation): accuracy, macro-F1, confusion matrix, per-class report.

    Both from one pass over the uint8 faces (the mirror-image average needs the plain pass anyway).
    Under torchrun each process scores every world-th face and the confusion matrices are summed.
    """
    k = n_classes or model.head.out_features
    mine = slice(procs.rank, None, procs.world)
    # Scored as test.py scores it: BatchNorm folded into the convolutions (fuse_for_inference).
    # A CPU answers fastest in small calls (the activations stay in its cache); a GPU wants large ones.
    batch = PREDICT_BATCH if device.type == "cpu" else GPU_PREDICT_BATCH
    plain, averaged = predict_both(fuse_for_inference(model), faces[mine], device, batch_size=batch, bf16=bf16)
    cms = np.stack(
        [
            np.bincount(np.asarray(labels[mine]) * k + p.argmax(1).numpy(), minlength=k * k).reshape(k, k)
            for p in (averaged, plain)
        ]
    )
    cms = np.rint(procs.sum(cms, device)).astype(np.int64)  # one all-reduce for both matrices
    return metrics_from_confusion(cms[0]), metrics_from_confusion(cms[1])


# ---------------------------------------------------------------------------------------------
# Outputs


def other_heads(entry):
    """{head name: validation accuracy} of a history entry's heads beside the answering one (run_epoch's keys)."""
    return {
        k[len("val_acc_") : -len("_head")]: v
        for k, v in entry.items()
        if k.startswith("val_acc_") and k.endswith("_head")
    }


def plot_curves(history, path):
    """Training loss and train/validation accuracy per epoch."""
    # Imported here: matplotlib takes about a second to import, paid once, at the end of a run.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history])
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a2.plot(ep, [h["train_acc"] for h in history], label="train (augmented)")
    other = sorted({name for h in history for name in other_heads(h)})
    a2.plot(ep, [h["val_acc"] for h in history], label="validation" + (" (answering head)" if other else ""))
    for name in other:  # a two-head model's second head, on the validation faces' FER2013 labels
        a2.plot(ep, [other_heads(h).get(name) for h in history], label=f"validation, {name} head on FER2013's labels")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json_atomic(obj, path):
    """JSON to a temp file, then renamed over `path`."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def output_paths(out, plots_dir):
    """Where the last checkpoint, metrics and plots of model file `out` go."""
    plots = Path(plots_dir) if plots_dir else out.parent
    stem = beside_model(out, "").name
    return {
        "last": beside_model(out, ".last.pt"),
        "metrics": beside_model(out, ".metrics.json"),
        "cm_counts": plots / f"{stem}.confusion_counts.png",
        "cm_rates": plots / f"{stem}.confusion_normalized.png",
        "curves": plots / f"{stem}.training_curves.png",
    }


@dataclass
class Data:
    """The faces a run trains and validates on (uint8, model-order labels).

    With FER+'s votes: each training face's vote shares and FER2013 label, and the validation faces' FER2013
    labels where known; else None.
    """

    faces: np.ndarray
    labels: np.ndarray
    classes: list
    val_faces: np.ndarray
    val_labels: np.ndarray
    val_name: str
    skipped: list
    shares: np.ndarray = None
    fer2013_labels: np.ndarray = None
    val_fer2013: np.ndarray = None


@dataclass
class Run:
    """What one training run holds from start to end: what train_one_epoch() steps and save_epoch() writes."""

    args: argparse.Namespace
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model itself, or its DistributedDataParallel wrapper under torchrun
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    class_weights: torch.Tensor
    classes: list
    arch_args: dict
    heads: list  # the answering head's name first (network.head_names)
    n_params: int
    started: float
    device: torch.device
    uses_bf16: bool
    procs: Dist
    skipped: list
    backup: Path = None
    shares: torch.Tensor = None  # with two heads: the vote shares, FER2013 labels and the vote loss's class weights
    fer2013_labels: torch.Tensor = None
    vote_weights: torch.Tensor = None


def cpu_copy(obj):
    """A copy of a nested state dict (dicts, lists, tuples) whose tensors are on the CPU and no longer change
    as training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        items = [cpu_copy(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


class BackgroundWriter:
    """Writes one epoch's files on a thread while the next epoch trains (on a GPU an epoch takes seconds, as
    long as writing two checkpoints). submit() first waits for the write before it; wait() before the run
    ends or reads its files. A write's error is raised by the next submit() or wait()."""

    def __init__(self):
        self._thread, self._error = None, None

    def _run(self, write):
        try:
            write()
        except BaseException as e:  # handed to the main thread by wait()
            self._error = e

    def submit(self, write):
        self.wait()
        # Not a daemon: a run stopped mid-write (Ctrl-C) still finishes the write before Python exits.
        self._thread = threading.Thread(target=self._run, args=(write,), name="write-epoch")
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def save_epoch(run, epoch, history, best, is_best, first_save):
    """This epoch's files: the model when it is the best so far, the *.last.pt checkpoint, the metrics JSON.

    Returns a function that writes them from copies taken now (cpu_copy), so it may run on a thread
    (BackgroundWriter) while training changes the weights.
    """
    args, model, ema, classes = run.args, run.model, run.ema, run.classes
    wall = time.time() - run.started  # one figure for the checkpoint and the metrics JSON
    paths = output_paths(args.out, args.plots)
    train_args = {k: (project_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    ckpt = {
        "format_version": CHECKPOINT_FORMAT,
        "arch": DEFAULT_ARCH,
        "arch_args": run.arch_args,
        "heads": list(run.heads),
        "class_names": list(classes),
        "input_size": IMAGE_SIZE,
        "mean": NORM_MEAN,
        "std": NORM_STD,
        "epoch": epoch + 1,
        "train_args": train_args,
        "recipe": RECIPE,
    }
    last = {
        **ckpt,
        "state_dict": cpu_copy(model.state_dict()),
        "ema": cpu_copy(ema.state_dict()),
        "optimizer": cpu_copy(run.optimizer.state_dict()),
        "scheduler": cpu_copy(run.scheduler.state_dict()),
        "history": cpu_copy(history),
        "best": cpu_copy(best),
        "wall_seconds": wall,
    }
    if run.scaler is not None:
        last["scaler"] = cpu_copy(run.scaler.state_dict())
    best_model = None
    if is_best:
        best_model = {**ckpt, "state_dict": cpu_copy(ema.module.state_dict()), "metrics": last["best"]["metrics"]}
    metrics_json = {
        "model": str(args.out.name),
        "arch": DEFAULT_ARCH,
        "arch_args": run.arch_args,
        "heads": list(run.heads),
        "parameters": run.n_params,
        "class_names": list(classes),
        "best_epoch": best["epoch"],
        "epochs_run": epoch + 1,
        "validation": last["best"]["metrics"],
        "train_wall_seconds": wall,
        "epoch_seconds": [h["seconds"] for h in last["history"]],
        "history": last["history"],
        "train_args": train_args,
        "recipe": RECIPE,
        "device": str(run.device),
        "bf16": run.uses_bf16,
        "threads": torch.get_num_threads(),
        "processes": run.procs.world,
        "skipped_images": [project_relative(p) for p, _ in run.skipped],
    }
    backup = run.backup if first_save else None  # the first save of a --replace run keeps the model it replaces

    def write():
        if best_model is not None:
            atomic_save(best_model, args.out, backup=backup)
        atomic_save(last, paths["last"])
        write_json_atomic(metrics_json, paths["metrics"])

    return write


def display_path(path):
    """A path as a user types it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_plots(best, history, classes, paths):
    """Confusion matrices of the best epoch (counts and recall per class) and the training curves."""
    m, name = best["metrics"], best["metrics"]["validation_set"]
    plot_confusion(
        m["confusion"], classes, paths["cm_counts"], False, f"validation ({name}), epoch {best['epoch']}: counts"
    )
    plot_confusion(
        m["confusion"],
        classes,
        paths["cm_rates"],
        True,
        f"validation ({name}), epoch {best['epoch']}: recall per class",
    )
    plot_curves(history, paths["curves"])


def write_int8_copy(out, faces, log):
    """The finished model's int8 copy for test.py, calibrated on the training faces (network.write_int8).

    A run whose copy cannot be written still succeeds: test.py then classifies with PyTorch.
    """
    try:
        path = write_int8(out, faces)
    except Exception as e:  # onnx missing, a full disk, an exporter's error: the model itself is saved
        print(
            f"warning: the int8 copy of {out} was not written ({type(e).__name__}: {str(e)[:200]}); test.py will "
            f"classify with PyTorch; retry: python tools/export_int8.py --model {out}",
            file=sys.stderr,
        )
        return None
    log(f"int8 copy for test.py: {path}")
    return path


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the facial emotion CNN on an ImageFolder tree.")
    d = SCHEDULE_DEFAULTS
    p.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT / "face_datasets" / "Train data",
        help="folder with one subfolder per emotion (default: face_datasets/Train data)",
    )
    p.add_argument(
        "--val",
        type=Path,
        default=None,
        help="validation folder or FER2013 CSV, whose PublicTest rows are used where it has a Usage column "
        f"(default: face_datasets/Test data if present, else a stratified {VAL_FRACTION:.0%}% hold-out)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"model file to write; an existing one only with --replace (default: a new folder "
        f"runs/<date-time>/ holding {MODEL_NAME} and its plots; with --resume, the resumed run's file)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="let --out overwrite an existing model (kept as <name>.<date-time>.bak.pt) and its plots "
        "(default: refuse)",
    )
    p.add_argument("--plots", type=Path, default=None, help="folder for plots (default: beside --out)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default: {d['epochs']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {d['batch_size']})")
    p.add_argument(
        "--lr", type=float, default=None, help=f"peak SGD learning rate of the one-cycle schedule (default: {d['lr']})"
    )
    p.add_argument(
        "--mixup",
        type=float,
        default=None,
        metavar="ALPHA",
        help="mixup: blend each training batch with a shuffled copy of itself, weight ~ Beta(ALPHA, ALPHA) "
        "(default: 0 = off)",
    )
    p.add_argument(
        "--photo-aug",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train for photos too: lighting, exposure, resolution, noise and framing changes "
        f"(default: {'on' if d['photo_aug'] else 'off'})",
    )
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default: {d['seed']})")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="device (default: auto = cuda, then mps, then cpu)",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="stop each epoch after N batches, for a quick try (default: 0 = all)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue from a *.last.pt checkpoint with its own schedule (default: start fresh)",
    )
    p.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="train in float32 (default: bfloat16 autocast where the CPU or GPU supports it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batches is not None and args.max_batches < 0:
        p.error("--max-batches must be 0 (all) or more")
    if args.lr is not None and not 0 < args.lr < math.inf:
        p.error("--lr must be a positive number")
    if args.mixup is not None and not 0 <= args.mixup < math.inf:
        p.error("--mixup must be 0 (off) or a positive number")
    problem = args.val is not None and val_source_problem(args.val)
    if problem:  # before minutes of loading the training images
        p.error(problem)
    if args.resume is None:  # with --resume the checkpoint's schedule fills them in (resume_schedule)
        for k, v in SCHEDULE_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    return args


def resume_schedule(args):
    """The checkpoint `args.resume` (read once); its schedule fills the flags not given, and a different one stops.

    OneCycleLR's schedule is fixed by epochs, batches and rate when a run starts: another --epochs or
    --max-batches cannot continue it (PyTorch fails mid-epoch), so the clash is named before any work.
    """
    ck = load_checkpoint(args.resume, missing_hint="pass the *.last.pt file an earlier train.py run wrote")
    if "optimizer" not in ck:
        raise UserError(
            f"--resume {args.resume} has no optimiser state: pass the *.last.pt file written beside the model"
        )
    recorded = ck.get("train_args", {})
    clashes = []
    for k, default in SCHEDULE_DEFAULTS.items():
        was = recorded.get(k, SCHEDULE_UNRECORDED.get(k, default))
        if getattr(args, k) is None:
            setattr(args, k, was)
        elif getattr(args, k) != was:
            flag = k.replace("_", "-")
            if isinstance(was, bool):
                on, off = f"--{flag}", f"--no-{flag}"
                clashes.append(f"{on if was else off} (not {off if was else on})")
            else:
                clashes.append(f"--{flag} {was} (not {getattr(args, k)})")
    if clashes:
        raise UserError(
            f"--resume {args.resume}: that run was started with {', '.join(clashes)}; resume without "
            "those flags to finish it, or start a new run without --resume"
        )
    return ck


def previous_score(path):
    """' (70.1% on Test data)' from the metrics JSON beside an existing model file, or ''."""
    try:
        v = json.loads(beside_model(path, ".metrics.json").read_text())["validation"]
        return f" ({v['accuracy']:.1%} on {v['validation_set']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def choose_outputs(args):
    """Fill in --out and say where a replaced model is kept; refuse to overwrite a model without --replace.

    Returns the backup path for the model --out replaces (None when nothing is replaced).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.resume is not None:
        own = args.resume.with_name(args.resume.name.replace(".last.pt", ".pt"))
        if args.out is None:
            args.out = own
        if args.out.resolve() == own.resolve():
            return None  # the resumed run's own model
    elif args.out is None:
        folder = RUNS_DIR / stamp
        n = 2
        while folder.exists():
            folder, n = RUNS_DIR / f"{stamp}-{n}", n + 1
        args.out = folder / MODEL_NAME
        return None
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder: name the model file, e.g. {args.out / MODEL_NAME}")
    if not args.out.exists():
        return None
    if not args.replace:
        raise UserError(
            f"--out {args.out} exists{previous_score(args.out)}: pass --replace to overwrite it (the old "
            f"one is kept as a .bak.pt), or leave --out out and the run gets its own folder under runs/"
        )
    return beside_model(args.out, f".{stamp}.bak.pt")


def main(args):
    resumed = resume_schedule(args) if args.resume is not None else None
    backup = choose_outputs(args)
    device, procs = setup_processes(args.device)
    try:
        return train(args, device, procs, resumed=resumed, backup=backup)
    finally:
        if procs.world > 1:
            dist.destroy_process_group()


def interrupted_note(args, best, epochs_saved, backup):
    """What an interrupted run leaves behind, in one line, true in each case."""
    if not epochs_saved:
        kept = f"; {args.out} was left as it was" if args.out.exists() else ""
        return f"no epoch finished, so nothing was written{kept}"
    last = output_paths(args.out, args.plots)["last"]
    kept = f"; the model it replaced is kept as {backup}" if backup is not None and backup.exists() else ""
    return (
        f"{args.out} holds the best epoch so far ({best['epoch']}, {best['accuracy']:.1%}){kept}; "
        f"finish the run with python train.py --resume {last}"
    )


def train(args, device, procs, resumed=None, backup=None):
    """Load the faces, build the model and its optimiser, train epoch by epoch saving each, then plot."""
    started = time.time()  # the wall time recorded counts data loading, validation and saving too
    torch.set_float32_matmul_precision("high")
    log = print if procs.main else (lambda *a, **k: None)  # under torchrun, rank 0 speaks for all
    progress = not args.no_progress and procs.main
    set_seed(args.seed)
    data = load_data(args, progress, log)
    run = build_run(args, data, device, procs, started, backup, log)
    start_epoch, history, best = restore(run, resumed, log) if resumed is not None else (0, [], None)
    paths = output_paths(args.out, args.plots)
    saved_model, epochs_saved = False, 0
    writer = BackgroundWriter()
    # uint8 on the training device: tens of MB for FER2013, so a GPU augments and trains without a loader.
    faces, labels = torch.from_numpy(data.faces).to(device), torch.from_numpy(data.labels).to(device)
    try:
        for epoch in range(start_epoch, args.epochs):
            entry, metrics = run_epoch(run, data, faces, labels, epoch=epoch, progress=progress)
            history.append(entry)
            is_best = best is None or metrics["accuracy"] > best["accuracy"]
            log(
                f"epoch {epoch + 1:3d}/{args.epochs}  loss {entry['train_loss']:.4f}"
                f"  train acc {entry['train_acc']:.4f}"
                f"  val acc {entry['val_acc']:.4f}  macro-F1 {entry['val_macro_f1']:.4f}"
                + "".join(f"  {name} head {acc:.4f}" for name, acc in other_heads(entry).items())
                + f"  {entry['seconds']:.0f}s"
                f" ({entry['images_per_s']:.0f} img/s){'  *best' if is_best else ''}",
                flush=True,
            )
            if is_best:
                best = {"epoch": epoch + 1, "accuracy": metrics["accuracy"], "metrics": metrics}
            if procs.main:
                writer.submit(save_epoch(run, epoch, history, best, is_best, first_save=not saved_model))
                saved_model, epochs_saved = saved_model or is_best, epochs_saved + 1
            if procs.world > 1:
                # Under torchrun every process waits for rank 0's files, so a fault in any process leaves this
                # epoch saved (a fault elsewhere ends rank 0 too, maybe mid-write).
                writer.wait()
                procs.barrier()
        writer.wait()
    except BaseException as e:
        # An interrupted or failed run still finishes writing its last epoch and leaves its plots, but the first
        # error is the one reported.
        try:
            writer.wait()
        except BaseException as err:
            print(f"warning: the last epoch's files were not written: {type(err).__name__}: {err}", file=sys.stderr)
            epochs_saved = max(0, epochs_saved - 1)
        if procs.main and best is not None:
            try:
                write_plots(best, history, data.classes, paths)
            except Exception as err:
                print(f"warning: the plots were not drawn: {type(err).__name__}: {err}", file=sys.stderr)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
            raise Interrupted(interrupted_note(args, best, epochs_saved, backup)) from None
        raise
    if procs.main and best is not None:  # plots once, at the end, not every epoch
        write_plots(best, history, data.classes, paths)
        write_int8_copy(args.out, data.faces, log)
    procs.barrier()  # no process leaves before rank 0 has written the files
    log(
        f"best validation accuracy {best['accuracy']:.4f} at epoch {best['epoch']}; model: {args.out}; "
        f"plots: {paths['cm_counts'].parent}"
    )
    if procs.main and args.out.resolve() != (REPO_ROOT / "models" / MODEL_NAME).resolve():
        log(f"use it: python test.py --model {display_path(args.out)} photo.jpg")
    return {"model": args.out, "best": best, "history": history, "paths": paths}


def load_data(args, progress, log):
    """The training faces, and validation faces from --val, the Test data folder beside --data, or a hold-out."""
    faces, labels, classes, skipped, paths = load_image_folder(args.data, progress, with_paths=True)
    if skipped:
        log(f"skipped {len(skipped)} unreadable images in {args.data} (first: {skipped[0][0]}: {skipped[0][1]})")
    votes = read_votes(args.data, paths, classes)
    shares, fer2013 = votes if votes is not None else (None, None)
    if votes is not None and args.mixup > 0:
        raise UserError("--mixup trains one head on FER2013's labels: leave it out when training on FER+'s votes")
    val_src = args.val
    if val_src is None and (args.data.parent / "Test data").is_dir() and args.data.name != "Test data":
        val_src = args.data.parent / "Test data"
    val_fer2013 = None
    if val_src is not None:
        val_faces, val_labels, val_fer2013 = load_val_source(val_src, classes, progress, log, fer2013_too=True)
        val_name = Path(val_src).name
    else:
        tr, va = stratified_split(labels, VAL_FRACTION, args.seed)
        val_faces, val_labels = faces[va], labels[va]
        faces, labels = faces[tr], labels[tr]
        if votes is not None:
            val_fer2013, shares, fer2013 = fer2013[va], shares[tr], fer2013[tr]
        val_name = f"hold-out {VAL_FRACTION:.0%} of {args.data.name}"
    log(f"classes: {', '.join(classes)}; {len(faces)} training images, {len(val_faces)} validation ({val_name})")
    if votes is not None:
        log(f"labels: FER+'s votes ({FERPLUS_VOTES_FILE}) for the answering head, FER2013's for a second head")
    return Data(faces, labels, list(classes), val_faces, val_labels, val_name, skipped, shares, fer2013, val_fer2013)


def class_weights(freq):
    """Loss weights (1 / class frequency) ** CLASS_WEIGHT_POWER, scaled so that their mean over the faces is 1."""
    freq = np.asarray(freq, dtype=float)
    weights = (freq.sum() / np.maximum(freq, 1e-9) / len(freq)) ** CLASS_WEIGHT_POWER
    return torch.tensor(weights / (weights * freq / freq.sum()).sum(), dtype=torch.float32)


def build_run(args, data, device, procs, started, backup, log):
    """The model, its weight average, optimiser, one-cycle schedule and class weights, as the recipe says."""
    fp16 = device.type == "cuda" and args.bf16 and not torch.cuda.is_bf16_supported()
    uses_bf16 = args.bf16 and not fp16 and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))
    precision = "bfloat16 autocast" if uses_bf16 else "float16 autocast" if fp16 else "float32"
    workers = f", {procs.world} processes (torchrun)" if procs.world > 1 else ""
    log(f"device: {device}, {precision}, {torch.get_num_threads()} threads{workers}")
    two_heads = data.shares is not None
    arch_args = {**DEFAULT_ARCH_ARGS, "extra_heads": list(HEADS[1:])} if two_heads else dict(DEFAULT_ARCH_ARGS)
    model = build_model(DEFAULT_ARCH, arch_args, len(data.classes)).to(device)
    model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(EMA_DECAY), use_buffers=True)
    train_model = model
    if procs.world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay, no_decay = [], []
    for prm in model.parameters():
        (no_decay if prm.ndim <= 1 else decay).append(prm)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=MOMENTUM,
        nesterov=True,
    )
    steps_per_epoch = len(data.faces) // procs.world // args.batch_size or 1  # --batch-size is per process
    if args.max_batches:
        steps_per_epoch = min(steps_per_epoch, args.max_batches)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=WARMUP_SHARE
    )
    hard = data.fer2013_labels if two_heads else data.labels  # what the cross-entropy with one label learns
    weights = class_weights(np.bincount(hard, minlength=len(data.classes)))
    n_params = count_parameters(model)
    log(f"model: {DEFAULT_ARCH} {arch_args}, {n_params:,} parameters")
    on_device = lambda a: torch.from_numpy(a).to(device) if a is not None else None  # noqa: E731
    return Run(
        args=args,
        model=model,
        train_model=train_model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if fp16 else None,
        class_weights=weights.to(device),
        classes=data.classes,
        arch_args=arch_args,
        heads=list(HEADS) if two_heads else ["fer2013"],
        n_params=n_params,
        started=started,
        device=device,
        uses_bf16=uses_bf16,
        procs=procs,
        skipped=data.skipped,
        backup=backup,
        shares=on_device(data.shares),
        fer2013_labels=on_device(data.fer2013_labels),
        vote_weights=class_weights(data.shares.sum(0)).to(device) if two_heads else None,
    )


def restore(run, ck, log):
    """Load a *.last.pt checkpoint into the run; returns (first epoch to train, history, best so far)."""
    if ck["class_names"] != run.classes or ck["arch_args"] != run.arch_args:
        raise UserError(f"--resume {run.args.resume} was trained on other classes or another architecture: start fresh")
    run.model.load_state_dict(ck["state_dict"])
    run.ema.load_state_dict(ck["ema"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    if run.scaler is not None and "scaler" in ck:
        run.scaler.load_state_dict(ck["scaler"])
    run.started -= ck.get("wall_seconds", sum(h["seconds"] for h in ck["history"]))
    log(f"resuming from {run.args.resume} after epoch {ck['epoch']}")
    return ck["epoch"], ck["history"], ck.get("best")


def run_epoch(run, data, faces, labels, *, epoch, progress):
    """Train one epoch and validate the weight average; returns (history entry, validation metrics)."""
    t0 = time.time()
    loss, acc, seen = train_one_epoch(run, faces, labels, epoch=epoch, progress=progress)
    seconds = time.time() - t0

    def score(model, labels):
        return evaluate(
            model, data.val_faces, labels, run.device, run.args.bf16, n_classes=len(data.classes), procs=run.procs
        )

    with_tta, without = score(run.ema.module, data.val_labels)
    entry = {
        "epoch": epoch + 1,
        "train_loss": loss,
        "train_acc": acc,
        "val_acc": with_tta["accuracy"],
        "val_acc_no_tta": without["accuracy"],
        "val_macro_f1": with_tta["macro_f1"],
        "seconds": seconds,
        "images_per_s": seen / seconds,
    }
    other = {}  # the second head, on the validation faces' FER2013 labels
    if len(run.heads) > 1 and data.val_fer2013 is not None:
        head = run.heads[1]
        other, _ = score(answering_with(run.ema.module, head), data.val_fer2013)
        entry[f"val_acc_{head}_head"] = other["accuracy"]
    metrics = {
        "validation_set": data.val_name,
        "n": int(len(data.val_labels)),
        "accuracy": with_tta["accuracy"],
        "accuracy_no_tta": without["accuracy"],
        "macro_f1": with_tta["macro_f1"],
        "test_shift": TEST_SHIFT,
        "per_class": {c: {k: v[i] for k, v in with_tta["per_class"].items()} for i, c in enumerate(data.classes)},
        "confusion": with_tta["confusion"],
    }
    if other:
        metrics["labels"] = f"the {run.heads[0]} head on {data.val_name}'s labels"
        metrics["other_heads"] = {
            run.heads[1]: {"labels": "FER2013's", "accuracy": other["accuracy"], "macro_f1": other["macro_f1"]}
        }
    return entry, metrics


if __name__ == "__main__":
    run_main(main, parse_args())
