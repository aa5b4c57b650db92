"""Write the int8 copy of a model that test.py runs photos and video with, and compare its answers.

    python tools/export_int8.py                                        # models/Facial_Emotion_Recognizer.pt
    python tools/export_int8.py --model runs/X/Facial_Emotion_Recognizer.pt --data "face_datasets/Train data"
    python tools/export_int8.py --check data/fer2013.csv      # its rows not marked Training

train.py writes the copy itself at the end of a run; this is for a model that has none, or whose copy
is stale (test.py says so). Calibrates on the training faces preparation.py wrote, as train.py does.
With --check, scores the held-out faces of a CSV (its rows not marked Training) with PyTorch and with
the int8 copy, as test.py scores them, for each of the model's heads (the copy has them all).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:  # the full install's (requirements-full.txt): the copy is written from the .pt by PyTorch
    import torch
except ImportError:
    sys.exit(
        "error: tools/export_int8.py needs PyTorch, which this install lacks: pip install -r requirements-full.txt"
    )

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ferlite.errors import run_main  # noqa: E402
from ferlite.fer2013 import load_labelled  # noqa: E402
from ferlite.images import load_image_folder  # noqa: E402
from ferlite.onnx_model import float_path, load_copy  # noqa: E402
from ferlite.training.checkpoints import load_checkpoint  # noqa: E402
from ferlite.training.export import write_int8  # noqa: E402
from ferlite.training.network import NORM_MEAN, NORM_STD, head_names, model_from_checkpoint, predict_proba  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write a model's int8 ONNX copy (for test.py) and compare its answers.")
    p.add_argument(
        "--model",
        type=Path,
        default=ROOT / "models" / "Facial_Emotion_Recognizer.pt",
        help="model file (default: the shipped model)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / "face_datasets" / "Train data",
        help="training faces for calibration, one folder per emotion (default: face_datasets/Train data)",
    )
    p.add_argument(
        "--check", type=Path, default=None, metavar="CSV", help="also compare answers on a FER2013 CSV (default: none)"
    )
    return p.parse_args(argv)


def main(args):
    ckpt = load_checkpoint(args.model, missing_hint="pass --model")
    faces = load_image_folder(args.data, progress=False)[0]
    t = time.perf_counter()
    out = write_int8(args.model, faces)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")
    if len(head_names(ckpt)) > 1:  # write_int8 wrote the float copy too
        print(f"wrote {float_path(out)} ({float_path(out).stat().st_size / 1e6:.1f} MB): the other heads' answers")
    if args.check is None:
        return out
    mean, std = ckpt.get("mean", NORM_MEAN), ckpt.get("std", NORM_STD)
    check = load_labelled(args.check, ckpt["class_names"], flag="--check", lacks="the model lacks", progress=False)
    faces, labels = check.faces, check.labels
    for head in head_names(ckpt):  # every head, from the copy that answers for it as test.py picks it
        copy, why = load_copy(args.model, ckpt["class_names"], threads=torch.get_num_threads(), head=head)
        if copy is None:
            raise SystemExit(f"error: {why}")
        model = model_from_checkpoint(ckpt, torch.device("cpu"), args.model, head=head)
        ref = predict_proba(model, faces, torch.device("cpu"), mean, std).numpy()
        p = copy.predict_proba(faces, head=head)
        kind = copy.meta.get("precision", "int8")
        print(
            f"{args.check.name}, {len(labels)} faces, {head} head: PyTorch {(ref.argmax(1) == labels).mean():.2%}, "
            f"{kind} copy ({copy.path.name}) {(p.argmax(1) == labels).mean():.2%}; same answer "
            f"{(p.argmax(1) == ref.argmax(1)).mean():.2%}, largest probability difference {np.abs(p - ref).max():.3f}"
        )
    return out


if __name__ == "__main__":
    run_main(main, parse_args())
