"""Join models train.py wrote into one model file whose answer is their probabilities averaged (network.Ensemble).

    python tools/ensemble.py runs/seed0/Facial_Emotion_Recognizer.pt runs/seed1/Facial_Emotion_Recognizer.pt \\
        --out models/Facial_Emotion_Recognizer.pt --replace

The members must have the same classes, heads and input (train.py with the same data and labels, other seeds).
The model file is read like any other (test.py, --eval, --teacher). Beside it go its metrics JSON (each member's
own, as train.py wrote it beside the member, and the ensemble's answering head on the validation folder), its
confusion matrices and its ONNX copies (int8 and float, calibrated on the training faces as train.py calibrates).
An existing --out is replaced only with --replace, and kept as <name>.<date-time>.bak.pt.
"""

import argparse
import json
import sys
import time
from pathlib import Path

try:  # the full install's (requirements-full.txt)
    import torch
except ImportError:
    sys.exit("error: tools/ensemble.py needs PyTorch, which this install lacks: pip install -r requirements-full.txt")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ferlite.errors import UserError, run_main  # noqa: E402
from ferlite.files import beside_model, project_relative, write_json  # noqa: E402
from ferlite.images import load_image_folder  # noqa: E402
from ferlite.onnx_model import file_sha256  # noqa: E402
from ferlite.scoring import confusion_matrix, metrics_from_confusion, plot_confusion  # noqa: E402
from ferlite.training.checkpoints import CHECKPOINT_FORMAT, atomic_save, load_checkpoint  # noqa: E402
from ferlite.training.export import write_int8  # noqa: E402
from ferlite.training.network import head_names, model_from_checkpoint, predict_proba  # noqa: E402


def read_json(path):
    return json.loads(Path(path).read_text())


SAME = ("class_names", "heads", "input_size", "mean", "std")  # what every member must share


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Join models into one that answers with their averaged probabilities.")
    p.add_argument("members", nargs="+", type=Path, metavar="MODEL.pt", help="two or more model files from train.py")
    p.add_argument("--out", type=Path, required=True, help="the model file to write")
    p.add_argument("--replace", action="store_true", help="overwrite --out (kept as <name>.<date-time>.bak.pt)")
    p.add_argument(
        "--data", type=Path, default=ROOT / "face_datasets" / "Train data",
        help="training faces, to calibrate the int8 copy (default: face_datasets/Train data)",
    )  # fmt: skip
    p.add_argument(
        "--val", type=Path, default=ROOT / "face_datasets" / "Test data",
        help="validation faces for the metrics JSON (default: face_datasets/Test data)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if len(args.members) < 2:
        p.error("give two or more model files to join")
    return args


def joined(paths):
    """The ensemble's checkpoint dict from the members' model files."""
    ckpts = [load_checkpoint(p, missing_hint="pass model files (.pt) that train.py wrote") for p in paths]
    first = ckpts[0]
    for path, ck in zip(paths[1:], ckpts[1:]):
        if ck["arch"] == "Ensemble" or first["arch"] == "Ensemble":
            raise UserError(f"{path}: join the models train.py wrote, not an ensemble")
        for key in SAME:
            if ck.get(key) != first.get(key):
                raise UserError(
                    f"{path} has {key} {ck.get(key)} where {paths[0]} has {first.get(key)}: join models of one recipe"
                )
    state = {f"members.{i}.{k}": v for i, ck in enumerate(ckpts) for k, v in ck["state_dict"].items()}
    members = [
        {"file": project_relative(p), "sha256": file_sha256(p), "arch": ck["arch"], "arch_args": ck["arch_args"],
         "epoch": ck.get("epoch"), "train_args": ck.get("train_args"), "recipe": ck.get("recipe"),
         "metrics": ck.get("metrics")}
        for p, ck in zip(paths, ckpts)
    ]  # fmt: skip
    arch_args = {"members": [{"arch": m["arch"], "arch_args": m["arch_args"]} for m in members]}
    described = {key: first[key] for key in SAME if key in first}
    return {"format_version": CHECKPOINT_FORMAT, "arch": "Ensemble", "arch_args": arch_args, **described,
            "members": members, "state_dict": state}  # fmt: skip


def main(args):
    ckpt = joined(args.members)
    if args.out.exists() and not args.replace:
        raise UserError(f"--out {args.out} exists: pass --replace to overwrite it (it is kept as a .bak.pt)")
    val_faces, val_labels, val_classes, _, _ = load_image_folder(args.val, progress=False, flag="--val")
    if val_classes != list(ckpt["class_names"]):
        raise UserError(f"--val {args.val} has folders {', '.join(val_classes)}, not the models' classes")
    train_faces = load_image_folder(args.data, progress=False)[0]
    backup = beside_model(args.out, time.strftime(".%Y%m%d-%H%M%S.bak.pt")) if args.out.exists() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = model_from_checkpoint(ckpt, torch.device("cpu"), args.out)  # the members load, or one clear error
    probs = predict_proba(model, val_faces, torch.device("cpu")).numpy()
    classes = list(ckpt["class_names"])
    m = metrics_from_confusion(confusion_matrix(val_labels, probs.argmax(1), len(classes)), classes)
    head = head_names(ckpt)[0]
    validation = {"validation_set": args.val.name, "n": len(val_labels), "accuracy": m["accuracy"],
                  "macro_f1": m["macro_f1"], "per_class": m["per_class"], "confusion": m["confusion"],
                  "labels": f"the {head} head on the folders' labels"}  # fmt: skip
    atomic_save({**ckpt, "metrics": validation}, args.out, backup)
    stem = args.out.name[: -len(".pt")] if args.out.name.endswith(".pt") else args.out.stem
    members = [  # each member's own metrics JSON where train.py left it beside the member, else what its .pt says
        {k: v for k, v in m.items() if k != "metrics"} | {"metrics": read_json(beside_model(p, ".metrics.json"))}
        if beside_model(p, ".metrics.json").is_file() else m
        for p, m in zip(args.members, ckpt["members"])
    ]  # fmt: skip
    write_json(
        {"model": args.out.name, "arch": "Ensemble", "heads": ckpt["heads"], "class_names": classes,
         "validation": validation, "members": members},
        beside_model(args.out, ".metrics.json"),
    )  # fmt: skip
    title = f"{args.out.name}, {len(members)} models averaged, on {args.val.name}"
    for kind, rates in (("counts", False), ("normalized", True)):
        plot = args.out.with_name(f"{stem}.confusion_{kind}.png")
        plot_confusion(m["confusion"], classes, plot, rates, f"{title}: {'recall per class' if rates else 'counts'}")
    copy = write_int8(args.out, train_faces)
    kept = f"; the model it replaced is kept as {backup}" if backup else ""
    print(
        f"wrote {args.out} ({len(members)} models averaged: accuracy {m['accuracy']:.2%}, macro-F1 "
        f"{m['macro_f1']:.3f} on {args.val.name}) and its ONNX copy {copy}{kept}"
    )


if __name__ == "__main__":
    run_main(main, parse_args())
