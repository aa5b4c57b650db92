"""Train the facial emotion CNN on the images preparation.py wrote.

    python preparation.py --csv data/fer2013.csv --ferplus data/fer2013new.csv && python train.py   # the shipped model
    python train.py --data "face_datasets/Train data" --val data/fer2013.csv    # validate on a CSV's PublicTest rows
    python train.py --resume runs/<date-time>/Facial_Emotion_Recognizer.last.pt   # continue an interrupted run

With FER+'s votes beside the folders (face_datasets/ferplus_votes.csv, from preparation.py --ferplus) the
network gets two heads: the answering one learns each face's vote shares, the other FER2013's labels
(test.py --head); without them, one head learns the folders' labels. The images are read once into memory
(torchvision's ImageFolder) and augmented a whole batch at a time as tensor operations, so the CPU cores
spend their time in the convolutions. Writes the best model (by validation accuracy) to --out, the last
epoch beside it as *.last.pt for --resume, and confusion matrices, training curves and a metrics JSON.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:  # the full install's (requirements-full.txt); in the light one, without PyTorch, one line says what to install
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel
    from torch.utils.data import DistributedSampler
except ImportError as e:
    if "torch" not in str(e):
        raise
    sys.exit("error: train.py trains with PyTorch, which this install lacks: pip install -r requirements-full.txt")

from ferlite.errors import Interrupted, UserError, run_main
from ferlite.fer2013 import FERPLUS_VOTES_FILE, VALIDATION, load_labelled, read_votes
from ferlite.files import REPO_ROOT, beside_model, project_relative, write_json
from ferlite.images import load_image_folder
from ferlite.names import DEVICES, IMAGE_SIZE
from ferlite.onnx_model import PREDICT_BATCH
from ferlite.scoring import confusion_matrix, metrics_from_confusion, plot_confusion
from ferlite.training.checkpoints import CHECKPOINT_FORMAT, atomic_save, choose_device, load_checkpoint, set_seed
from ferlite.training.export import write_int8
from ferlite.training.network import (
    NORM_MEAN,
    NORM_STD,
    TEST_SHIFT,
    answering_with,
    autocast_dtype,
    autocast_for,
    build_model,
    count_parameters,
    fuse_for_inference,
    head_names,
    model_from_checkpoint,
    predict_both,
    predict_proba,
    to_input,
)

MODEL_NAME = "Facial_Emotion_Recognizer.pt"
TRAIN_DIR = REPO_ROOT / "face_datasets" / "Train data"
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
LABEL_SMOOTHING = 0.1  # FER2013's labels are one guess a face, and FER+'s ten people often disagree with it
EMA_DECAY = 0.999  # an exponential average of the weights is what is validated and shipped (ema_with_warmup)
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
SEED = 0
# The schedule a run is started with; --resume takes it from the checkpoint (a changed schedule cannot resume).
SCHEDULE_DEFAULTS = {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": PEAK_LR, "seed": SEED, "max_batches": 0}
# Experiments measured and dropped (RESULTS.md names the commit that has them): a run that used one cannot resume.
DROPPED_FLAGS = ("mixup", "photo_aug")
RECIPE = {
    "momentum": MOMENTUM,
    "warmup_share": WARMUP_SHARE,
    "weight_decay": WEIGHT_DECAY,
    "label_smoothing": LABEL_SMOOTHING,
    "ema_decay": EMA_DECAY,
    "class_weight_power": CLASS_WEIGHT_POWER,
    "tone": {"p": TONE_P, "gamma": TONE_GAMMA, "contrast": list(TONE_CONTRAST), "brightness": TONE_BRIGHTNESS},
}
# Distillation (--teacher A.pt [B.pt ...]): each head's target is this share of the teachers' mean probabilities
# (each teacher's own head of that name, on the unaugmented face and its mirror image, computed once at the start),
# the rest today's target (the vote shares; FER2013's label). Several seeds' average beats each seed (RESULTS.md).
TEACHER_WEIGHT = 0.5


# ---------------------------------------------------------------------------------------------
# Data


def stratified_split(labels, fraction, seed):
    """Train and validation indices, stratified by class (scikit-learn)."""
    from sklearn.model_selection import train_test_split  # here: scikit-learn is slow to import, for this alone

    counts = np.bincount(labels)
    n_val = int(round(fraction * len(labels)))
    if counts[counts > 0].min() < 2 or n_val < len(counts[counts > 0]):
        few = f"{len(labels)} images, smallest class {counts[counts > 0].min()}"
        raise UserError(
            f"too few images for a validation split ({few}): add images, or pass --val with a validation folder"
        )
    return train_test_split(np.arange(len(labels)), test_size=n_val, stratify=labels, random_state=seed)


def tone(x, gen, p=TONE_P):
    """For a share `p` of the normalised (N, 1, H, W) faces `x`: a gamma, a contrast around the face's mean and a
    brightness (TONE_*), each drawn from `gen`."""
    n = x.shape[0]
    r = lambda: torch.rand(n, generator=gen).to(x.device).view(n, 1, 1, 1)  # noqa: E731
    px = (x * NORM_STD + NORM_MEAN).clamp(0, 1).pow(torch.exp((r() * 2 - 1) * TONE_GAMMA))
    lo, hi = TONE_CONTRAST
    mean = px.mean((1, 2, 3), keepdim=True)
    px = (px - mean) * (lo + r() * (hi - lo)) + mean + (r() * 2 - 1) * TONE_BRIGHTNESS
    return torch.where(r() < p, (px.clamp(0, 1) - NORM_MEAN) / NORM_STD, x)


def augment(x, gen, max_rotate=10.0, max_shift=0.1, scale=(0.9, 1.1), erase_p=0.5):
    """Random flip, rotation, scale and shift (one affine warp per batch), tone(), then random erasing of the
    normalised (N, 1, H, W) faces `x`; all drawn from `gen`, so a seeded epoch is repeatable."""
    n = x.shape[0]
    # Drawn on the CPU generator and moved: the same numbers on any device, so GPU runs augment identically.
    r = lambda *s: torch.rand(*s, generator=gen).to(x.device)  # noqa: E731
    angle = (r(n) * 2 - 1) * math.radians(max_rotate)
    s = scale[0] + r(n) * (scale[1] - scale[0])
    flip = torch.where(r(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    shift = lambda: (r(n) * 2 - 1) * max_shift * 2  # noqa: E731
    theta = torch.stack([cos * flip, -sin, shift(), sin * flip, cos, shift()], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = tone(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False), gen)
    # Random erasing: one rectangle of 2-25% of the image per chosen face, filled with 0 (the mean).
    h, w = x.shape[2:]
    area = (0.02 + r(n) * 0.23) * h * w
    aspect = torch.exp((r(n) * 2 - 1) * math.log(3))
    eh, ew = (area * aspect).sqrt().clamp(1, h), (area / aspect).sqrt().clamp(1, w)
    y0, x0 = r(n) * (h - eh), r(n) * (w - ew)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    col = lambda v: v.view(n, 1, 1)  # noqa: E731
    mask = (ys >= col(y0)) & (ys < col(y0 + eh)) & (xs >= col(x0)) & (xs < col(x0 + ew)) & col(r(n) < erase_p)
    return x.masked_fill(mask.unsqueeze(1), 0.0)


# ---------------------------------------------------------------------------------------------
# One process or many (torchrun)


class Dist:
    """Where this process stands: rank and world size under torchrun, (0, 1) under plain python."""

    def __init__(self, rank=0, world=1):
        self.rank, self.world = rank, world
        self.main = rank == 0

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
    """The device and a Dist; under torchrun (WORLD_SIZE > 1) also joins the process group: gloo on CPU, NCCL on
    CUDA (one GPU per process, by LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(device_name)
    if world <= 1:
        return device, Dist()
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            gpus = f"{torch.cuda.device_count()} GPUs: lower --nproc_per_node"
            raise UserError(f"torchrun started {world} processes but this machine has {gpus}")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"--device {device.type}: torchrun training runs on cpu or cuda only")
    dist.init_process_group(backend)
    return device, Dist(dist.get_rank(), dist.get_world_size())


def epoch_order(n, gen, epoch, seed, procs):
    """This process's face indices for `epoch`: a seeded permutation, or its DistributedSampler share."""
    if procs.world == 1:
        return torch.randperm(n, generator=gen)
    sampler = DistributedSampler(range(n), num_replicas=procs.world, rank=procs.rank, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class Data:
    """The uint8 faces a run trains and validates on, labels in `classes` order; with FER+'s votes also each
    training face's vote shares and FER2013 label, and the validation faces' FER2013 labels where known."""

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
    """What train_one_epoch() steps and save_epoch() writes: the model, its weight average, optimiser,
    schedule, gradient scaler and losses, and the architecture they were built with."""

    model: nn.Module
    train_model: nn.Module  # the model itself, or its DistributedDataParallel wrapper under torchrun
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler  # enabled for float16 autocast only (a GPU without bfloat16)
    loss: nn.CrossEntropyLoss  # with FER2013's label: class weights, label smoothing
    vote_loss: nn.CrossEntropyLoss  # with two heads, the answering one's, against the vote shares; else None
    arch_args: dict
    heads: list  # the answering head's name first (network.head_names)


def ema_with_warmup(decay):
    """EMA update whose decay grows as min(decay, (1 + n) / (10 + n)) with the number of updates n: a fixed
    decay from the first step averages in the random initial weights for thousands of steps."""

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


def train_one_epoch(run, tensors, args, procs, *, epoch, progress=True):
    """One pass over the training faces in a seeded order; returns (mean loss, accuracy, images), summed over the
    processes under torchrun. `tensors`: faces, labels, vote shares and FER2013 labels (None, None with one head)."""
    faces, labels, shares, fer2013, taught = tensors
    device = faces.device
    seed = (args.seed * 1000 + epoch) * procs.world + procs.rank  # one process: seed * 1000 + epoch
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    order = epoch_order(len(faces), gen, epoch, args.seed, procs).to(device)
    n_batches = min(len(order) // args.batch_size or 1, args.max_batches or math.inf)
    run.train_model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(
        range(n_batches), desc=f"epoch {epoch + 1}/{args.epochs}", unit=" batch", disable=not progress, leave=False
    )
    for b in bar:
        idx = order[b * args.batch_size : (b + 1) * args.batch_size]
        x = augment(to_input(faces[idx]), gen).contiguous(memory_format=torch.channels_last)
        with autocast_for(device, args.bf16):
            logits = run.train_model(x)
            if run.vote_loss is not None:  # the answering head learns the vote shares, the other FER2013's label
                logits, fer2013_logits = logits
                votes, label = (
                    blend(shares[idx], taught, run.heads[0], idx),
                    blend(fer2013[idx], taught, "fer2013", idx),
                )
                loss = run.vote_loss(logits.float(), votes) + run.loss(fer2013_logits.float(), label)
            else:
                loss = run.loss(logits.float(), blend(labels[idx], taught, run.heads[0], idx))
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.ema.update_parameters(run.model)
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = procs.sum([total_loss, correct, seen], device)
    return float(total_loss / seen), float(correct / seen), int(seen)


def blend(target, taught, head, idx):
    """`target` (vote shares, or class indices) as it is without teachers; with them, (1 - TEACHER_WEIGHT) of it and
    TEACHER_WEIGHT of the teachers' mean probabilities for these faces from `head` (teacher_probabilities)."""
    if taught is None:
        return target
    if target.ndim == 1:  # class indices: one-hot, so that the cross-entropy takes the blend as probabilities
        target = F.one_hot(target, taught[head].shape[1]).float()
    return (1 - TEACHER_WEIGHT) * target + TEACHER_WEIGHT * taught[head][idx]


def teacher_probabilities(paths, faces, classes, heads, device, bf16, log):
    """{head: (N, C) float32} the teachers' class probabilities for each training face, averaged over the teachers;
    each head's from the teacher's head of the same name, scored as test.py scores a face (its mirror averaged in)."""
    sums = {}
    for path in paths:
        ck = load_checkpoint(path, missing_hint="pass model files (.pt) that train.py wrote")
        if list(ck.get("class_names", [])) != list(classes):
            raise UserError(
                f"--teacher {path} was trained on other classes ({', '.join(ck.get('class_names', []))}): "
                f"pass models trained on {', '.join(classes)}"
            )
        if missing := [h for h in heads if h not in head_names(ck)]:
            raise UserError(
                f"--teacher {path} has no {missing[0]} head (it has {', '.join(head_names(ck))}): "
                "pass models trained with the same labels (preparation.py --ferplus for two heads)"
            )
        t0 = time.time()
        for h in heads:
            p = predict_proba(model_from_checkpoint(ck, device, path, head=h), faces, device, bf16=bf16)
            sums[h] = sums.get(h, 0) + p.float()
        log(f"teacher {display_path(path)}: {len(faces):,} faces, {', '.join(heads)} heads, {time.time() - t0:.0f}s")
    return {h: (s / len(paths)).to(device) for h, s in sums.items()}


def evaluate(model, data, labels, device, procs=Dist()):
    """(with, without test-time augmentation): metrics_from_confusion of `model` on data.val_faces with `labels`,
    from one pass scored as test.py --eval scores (BatchNorm folded, float32 whatever the training precision, so
    that the recorded figures and the best epoch are the same on every CPU); under torchrun each process scores
    every world-th."""
    faces, classes = data.val_faces, data.classes
    mine = slice(procs.rank, None, procs.world)
    # A CPU answers fastest in small calls (the activations stay in its cache); a GPU wants large ones.
    batch = PREDICT_BATCH if device.type == "cpu" else GPU_PREDICT_BATCH
    plain, averaged = predict_both(fuse_for_inference(model), faces[mine], device, batch_size=batch)
    cms = np.stack([confusion_matrix(labels[mine], p.argmax(1).numpy(), len(classes)) for p in (averaged, plain)])
    cms = np.rint(procs.sum(cms, device)).astype(np.int64)  # one all-reduce for both matrices
    return metrics_from_confusion(cms[0], classes), metrics_from_confusion(cms[1], classes)


# ---------------------------------------------------------------------------------------------
# Outputs


def other_heads(entry):
    """{head name: validation accuracy} of a history entry's heads beside the answering one (run_epoch's keys)."""
    return {k[8:-5]: v for k, v in entry.items() if k.startswith("val_acc_") and k.endswith("_head")}


def plot_curves(history, path):
    """Training loss and train/validation accuracy per epoch."""
    # Imported here: matplotlib is slow to import and only the end of a run needs it.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history])
    a1.set(xlabel="epoch", ylabel="training loss")
    a2.plot(ep, [h["train_acc"] for h in history], label="train (augmented)")
    other = sorted({name for h in history for name in other_heads(h)})
    a2.plot(ep, [h["val_acc"] for h in history], label="validation" + (" (answering head)" if other else ""))
    for name in other:  # a two-head model's second head, on the validation faces' FER2013 labels
        a2.plot(ep, [other_heads(h).get(name) for h in history], label=f"validation, {name} head on FER2013's labels")
    a2.set(xlabel="epoch", ylabel="accuracy")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def save_epoch(run, data, args, epoch, history, best, is_best, facts, started, backup=None):
    """This epoch's files, each written whole: the model when it is the best so far (keeping the model it replaces
    at `backup`), the *.last.pt checkpoint for --resume, the metrics JSON (with `facts`: device, bf16, processes)."""
    relative = lambda v: project_relative(v) if isinstance(v, Path) else v  # noqa: E731
    train_args = {k: ([relative(x) for x in v] if isinstance(v, list) else relative(v)) for k, v in vars(args).items()}
    wall = time.time() - started  # one figure for the checkpoint and the metrics JSON
    described = {"arch": DEFAULT_ARCH, "arch_args": run.arch_args, "heads": list(run.heads)}
    described.update(class_names=list(data.classes), train_args=train_args, recipe=RECIPE)
    ckpt = {"format_version": CHECKPOINT_FORMAT, **described, "input_size": IMAGE_SIZE, "epoch": epoch + 1}
    ckpt.update(mean=NORM_MEAN, std=NORM_STD)
    if is_best:
        atomic_save({**ckpt, "state_dict": run.ema.module.state_dict(), "metrics": best["metrics"]}, args.out, backup)
    last = {"state_dict": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict()}
    last.update(scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(), history=history, best=best)
    if args.teacher:  # where --resume finds them on this machine (train_args has only their names outside the project)
        last["teacher_paths"] = [str(Path(t).resolve()) for t in args.teacher]
    atomic_save({**ckpt, **last, "wall_seconds": wall}, output_paths(args.out, args.plots)["last"])
    metrics = {"model": str(args.out.name), **described, "parameters": count_parameters(run.model)}
    metrics.update(best_epoch=best["epoch"], epochs_run=epoch + 1, validation=best["metrics"], history=history)
    metrics.update(train_wall_seconds=wall, epoch_seconds=[h["seconds"] for h in history], **facts)
    metrics.update(threads=torch.get_num_threads(), skipped_images=[project_relative(p) for p, _ in data.skipped])
    write_json(metrics, output_paths(args.out, args.plots)["metrics"])


def display_path(path):
    """A path as a user types it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_plots(best, history, classes, paths):
    """Confusion matrices of the best epoch (counts and recall per class) and the training curves."""
    m = best["metrics"]
    title = f"validation ({m['validation_set']}), epoch {best['epoch']}"
    plot_confusion(m["confusion"], classes, paths["cm_counts"], False, f"{title}: counts")
    plot_confusion(m["confusion"], classes, paths["cm_rates"], True, f"{title}: recall per class")
    plot_curves(history, paths["curves"])


def write_int8_copy(out, faces, log):
    """The finished model's int8 copy for test.py, calibrated on the training faces (network.write_int8); a run whose
    copy cannot be written still succeeds (onnx missing, a full disk...): test.py then classifies with PyTorch."""
    try:
        path = write_int8(out, faces)
    except Exception as e:
        why = f"({type(e).__name__}: {str(e)[:200]}); test.py will classify with PyTorch"
        retry = f"python tools/export_int8.py --model {out}"
        print(f"warning: the int8 copy of {out} was not written {why}; retry: {retry}", file=sys.stderr)
        return None
    log(f"int8 copy for test.py: {path}")
    return path


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the facial emotion CNN on an ImageFolder tree.")
    d, add = SCHEDULE_DEFAULTS, p.add_argument
    val = "validation folder or FER2013 CSV, whose PublicTest rows are used where it has a Usage column (default: "
    val += f"face_datasets/Test data if present, else a stratified {VAL_FRACTION:.0%}% hold-out)"
    out = "model file to write; an existing one only with --replace (default: a new folder runs/<date-time>/ "
    out += f"holding {MODEL_NAME} and its plots; with --resume, the resumed run's file)"
    replace = "let --out overwrite a model (kept as <name>.<date-time>.bak.pt) and its plots (default: refuse)"
    add("--data", type=Path, default=TRAIN_DIR, help="one subfolder per emotion (default: face_datasets/Train data)")
    add("--val", type=Path, help=val)
    add("--out", type=Path, help=out)
    add("--replace", action="store_true", help=replace)
    add("--plots", type=Path, help="folder for plots (default: beside --out)")
    add("--epochs", type=int, help=f"training epochs (default: {d['epochs']})")
    add("--batch-size", type=int, help=f"batch size (default: {d['batch_size']})")
    add("--lr", type=float, help=f"peak SGD rate of the one-cycle schedule (default: {d['lr']})")
    add("--seed", type=int, help=f"random seed (default: {d['seed']})")
    add("--device", choices=DEVICES, default="auto", help="device (default: auto = cuda, then mps, then cpu)")
    add("--max-batches", type=int, help="stop each epoch after N batches, for a quick try (default: 0 = all)")
    add("--resume", type=Path, help="continue from a *.last.pt checkpoint with its own schedule (default: start fresh)")
    teach = f"distil: learn {TEACHER_WEIGHT:.0%}% from these models' averaged probabilities, the rest from the labels "
    teach += "(models of the same classes and heads; default: none)"
    add("--teacher", type=Path, nargs="+", metavar="MODEL.pt", help=teach)
    bf16 = "train in float32 (default: bfloat16 autocast where the CPU or GPU supports it)"
    add("--no-bf16", dest="bf16", action="store_false", help=bf16)
    add("--no-progress", action="store_true", help="no progress bars (default: shown)")
    add("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batches is not None and args.max_batches < 0:
        p.error("--max-batches must be 0 (all) or more")
    if args.lr is not None and not 0 < args.lr < math.inf:
        p.error("--lr must be a positive number")
    if args.val is not None and not args.val.exists():  # checked before minutes of loading the training images
        p.error(f"--val {args.val} not found: {VAL_HELP}")
    if args.val is not None and args.val.is_file() and not args.val.name.endswith((".csv", ".csv.gz")):
        p.error(f"--val {args.val} is neither a .csv/.csv.gz file nor a folder: {VAL_HELP}")
    for t in args.teacher or []:  # checked before minutes of loading the training images
        if not t.is_file():
            p.error(f"--teacher {t} not found: pass model files (.pt) that train.py wrote")
    if args.resume is None:  # with --resume the checkpoint's schedule fills them in (resume_schedule)
        for k, v in SCHEDULE_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    return args


def resume_schedule(args):
    """The checkpoint `args.resume` (read once); its schedule fills the flags not given, and a different one stops
    before any work (OneCycleLR is fixed by epochs, batches and rate when a run starts: PyTorch fails mid-epoch)."""
    ck = load_checkpoint(args.resume, missing_hint="pass the *.last.pt file an earlier train.py run wrote")
    if "optimizer" not in ck:
        raise UserError(f"--resume {args.resume} has no optimiser state: pass the *.last.pt file beside the model")
    recorded = ck.get("train_args", {})
    if dropped := next((k for k in DROPPED_FLAGS if recorded.get(k)), None):
        raise UserError(
            f"--resume {args.resume}: that run used --{dropped.replace('_', '-')}, which train.py no longer has "
            "(RESULTS.md names the commit that does): start a new run"
        )
    clashes = []
    for k, default in SCHEDULE_DEFAULTS.items():
        was = recorded.get(k, default)
        if getattr(args, k) is None:
            setattr(args, k, was)
        elif getattr(args, k) != was:
            clashes.append(f"--{k.replace('_', '-')} {was} (not {getattr(args, k)})")
    was = [Path(t) for t in ck.get("teacher_paths") or [REPO_ROOT / t for t in recorded.get("teacher") or []]] or None
    if args.teacher is None:
        args.teacher = was
    elif was is None or [t.resolve() for t in args.teacher] != [t.resolve() for t in was]:
        clashes.append(f"--teacher {' '.join(map(str, was or ['(none)']))}")
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
    """Fill in --out and refuse to overwrite a model without --replace; returns where the model --out replaces is
    kept (None when nothing is replaced)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.resume is not None:
        own = args.resume.with_name(args.resume.name.replace(".last.pt", ".pt"))
        if args.out is None:
            args.out = own
        if args.out.resolve() == own.resolve():
            return None  # the resumed run's own model
    elif args.out is None:
        args.out = first_free(lambda n: RUNS_DIR / f"{stamp}{n}") / MODEL_NAME
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
    return first_free(lambda n: beside_model(args.out, f".{stamp}{n}.bak.pt"))


def first_free(path_for):
    """The first of path_for(""), path_for("-2"), path_for("-3"), ... that does not exist: two runs started in
    one second each get their own folder, and two replacing runs each keep the model they replaced."""
    path, n = path_for(""), 2
    while path.exists():
        path, n = path_for(f"-{n}"), n + 1
    return path


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


def load_data(args, progress, log):
    """The training faces, and validation faces from --val, the Test data folder beside --data, or a hold-out."""
    faces, labels, classes, skipped, paths = load_image_folder(args.data, progress, flag="--data")
    if skipped:
        log(f"skipped {len(skipped)} unreadable images in {args.data} (first: {skipped[0][0]}: {skipped[0][1]})")
    votes = read_votes(args.data, paths, classes)
    shares, fer2013 = votes if votes is not None else (None, None)
    val_src = args.val
    if val_src is None and (args.data.parent / "Test data").is_dir() and args.data.name != "Test data":
        val_src = args.data.parent / "Test data"
    val_fer2013 = None
    if val_src is not None:
        val = load_labelled(
            val_src, classes, flag="--val", lacks="the training data lacks", only=VALIDATION, progress=progress
        )
        if val.note:
            log(f"--val {Path(val_src).name}: {val.note}")
        if val.skipped:
            log(f"skipped {len(val.skipped)} unreadable validation images, first {val.skipped[0][0]}")
        val_faces, val_labels, val_name = val.faces, val.labels, Path(val_src).name
        if val.paths is None:  # a CSV: its labels are FER2013's
            val_fer2013 = val.labels
        elif votes is not None:
            val_fer2013 = (read_votes(val_src, val.paths, classes) or (None, None))[1]
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


def build_run(args, data, device, procs):
    """The model, its weight average, optimiser, one-cycle schedule, scaler and losses, as the recipe says."""
    two_heads = data.shares is not None
    arch_args = {**DEFAULT_ARCH_ARGS, "extra_heads": list(HEADS[1:])} if two_heads else dict(DEFAULT_ARCH_ARGS)
    model = build_model(DEFAULT_ARCH, arch_args, len(data.classes)).to(device, memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(EMA_DECAY), use_buffers=True)
    train_model = model
    if procs.world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [prm for prm in model.parameters() if prm.ndim > 1]
    no_decay = [prm for prm in model.parameters() if prm.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=MOMENTUM, nesterov=True)
    steps_per_epoch = len(data.faces) // procs.world // args.batch_size or 1  # --batch-size is per process
    steps_per_epoch = min(steps_per_epoch, args.max_batches or steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=WARMUP_SHARE
    )
    hard = data.fer2013_labels if two_heads else data.labels  # what the cross-entropy with one label learns
    weights = class_weights(np.bincount(hard, minlength=len(data.classes))).to(device)
    loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=LABEL_SMOOTHING)
    vote_loss = nn.CrossEntropyLoss(weight=class_weights(data.shares.sum(0)).to(device)) if two_heads else None
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, args.bf16) == torch.float16)
    heads = list(HEADS) if two_heads else ["fer2013"]
    return Run(model, train_model, ema, optimizer, scheduler, scaler, loss, vote_loss, arch_args, heads)


def restore(run, data, ck, args, log):
    """Load a *.last.pt checkpoint into the run; returns (first epoch to train, history, best so far, wall seconds)."""
    if ck["class_names"] != data.classes or ck["arch_args"] != run.arch_args:
        raise UserError(f"--resume {args.resume} was trained on other classes or another architecture: start fresh")
    run.model.load_state_dict(ck["state_dict"])
    run.ema.load_state_dict(ck["ema"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    log(f"resuming from {args.resume} after epoch {ck['epoch']}")
    return ck["epoch"], ck["history"], ck.get("best"), ck.get("wall_seconds", sum(h["seconds"] for h in ck["history"]))


def run_epoch(run, data, tensors, args, procs, *, epoch, progress):
    """Train one epoch and validate the weight average; returns (history entry, validation metrics)."""
    t0 = time.time()
    loss, acc, seen = train_one_epoch(run, tensors, args, procs, epoch=epoch, progress=progress)
    seconds = time.time() - t0
    device = tensors[0].device
    tta, plain = evaluate(run.ema.module, data, data.val_labels, device, procs)
    entry = {"epoch": epoch + 1, "train_loss": loss, "train_acc": acc, "val_acc": tta["accuracy"]}
    entry.update(val_acc_no_tta=plain["accuracy"], val_macro_f1=tta["macro_f1"], seconds=seconds)
    entry["images_per_s"] = seen / seconds
    metrics = {"validation_set": data.val_name, "n": int(len(data.val_labels)), "accuracy": tta["accuracy"]}
    metrics.update(accuracy_no_tta=plain["accuracy"], macro_f1=tta["macro_f1"], test_shift=TEST_SHIFT)
    metrics.update(per_class=tta["per_class"], confusion=tta["confusion"])
    if len(run.heads) > 1 and data.val_fer2013 is not None:  # the second head, on the faces' FER2013 labels
        head = run.heads[1]
        other, _ = evaluate(answering_with(run.ema.module, head), data, data.val_fer2013, device, procs)
        entry[f"val_acc_{head}_head"] = other["accuracy"]
        metrics["labels"] = f"the {run.heads[0]} head on {data.val_name}'s labels"
        scores = {"labels": "FER2013's", "accuracy": other["accuracy"], "macro_f1": other["macro_f1"]}
        metrics["other_heads"] = {head: scores}
    return entry, metrics


def train(args, device, procs, resumed=None, backup=None):
    """Load the faces, build the model and its optimiser, train epoch by epoch saving each, then plot."""
    started = time.time()  # the wall time recorded counts data loading, validation and saving too
    torch.set_float32_matmul_precision("high")
    log = print if procs.main else (lambda *a, **k: None)  # under torchrun, rank 0 speaks for all
    progress = not args.no_progress and procs.main
    set_seed(args.seed)
    data = load_data(args, progress, log)
    run = build_run(args, data, device, procs)
    dtype = autocast_dtype(device, args.bf16)
    precision = {torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}.get(dtype, "float32")
    world = f", {procs.world} processes (torchrun)" if procs.world > 1 else ""
    log(f"device: {device}, {precision}, {torch.get_num_threads()} threads{world}")
    log(f"model: {DEFAULT_ARCH} {run.arch_args}, {count_parameters(run.model):,} parameters")
    start_epoch, history, best = 0, [], None
    if resumed is not None:
        start_epoch, history, best, earlier = restore(run, data, resumed, args, log)
        started -= earlier
    facts = {"device": str(device), "bf16": dtype == torch.bfloat16, "processes": procs.world}
    paths = output_paths(args.out, args.plots)
    # uint8 on the training device: tens of MB for FER2013, so a GPU augments and trains without a loader.
    on_device = lambda a: torch.from_numpy(a).to(device) if a is not None else None  # noqa: E731
    tensors = tuple(on_device(a) for a in (data.faces, data.labels, data.shares, data.fer2013_labels))
    taught = None
    if args.teacher:
        taught = teacher_probabilities(args.teacher, data.faces, data.classes, run.heads, device, args.bf16, log)
    tensors += (taught,)
    saved_model, epochs_saved = False, 0
    try:
        for epoch in range(start_epoch, args.epochs):
            entry, metrics = run_epoch(run, data, tensors, args, procs, epoch=epoch, progress=progress)
            history.append(entry)
            is_best = best is None or metrics["accuracy"] > best["accuracy"]
            e, heads = entry, "".join(f"  {name} head {acc:.4f}" for name, acc in other_heads(entry).items())
            log(
                f"epoch {e['epoch']:3d}/{args.epochs}  loss {e['train_loss']:.4f}  train acc {e['train_acc']:.4f}  "
                f"val acc {e['val_acc']:.4f}  macro-F1 {e['val_macro_f1']:.4f}{heads}  {e['seconds']:.0f}s "
                f"({e['images_per_s']:.0f} img/s){'  *best' if is_best else ''}",
                flush=True,
            )
            if is_best:
                best = {"epoch": epoch + 1, "accuracy": metrics["accuracy"], "metrics": metrics}
            if procs.main:  # the first save of a --replace run keeps the model it replaces
                keep = None if saved_model else backup
                save_epoch(run, data, args, epoch, history, best, is_best, facts, started, keep)
                saved_model, epochs_saved = saved_model or is_best, epochs_saved + 1
            procs.barrier()  # under torchrun no process goes on before rank 0's files are whole
    except BaseException as e:
        # An interrupted or failed run leaves its plots too, but the first error is the one reported.
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
    where = f"model: {args.out}; plots: {paths['cm_counts'].parent}"
    log(f"best validation accuracy {best['accuracy']:.4f} at epoch {best['epoch']}; {where}")
    if procs.main and args.out.resolve() != (REPO_ROOT / "models" / MODEL_NAME).resolve():
        log(f"use it: python test.py --model {display_path(args.out)} photo.jpg")
    return {"model": args.out, "best": best, "history": history, "paths": paths}


def main(args):
    resumed = resume_schedule(args) if args.resume is not None else None
    backup = choose_outputs(args)
    device, procs = setup_processes(args.device)
    try:
        return train(args, device, procs, resumed=resumed, backup=backup)
    finally:
        if procs.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, parse_args())
