"""Shared fixtures: the scripts loaded by path, synthetic FER2013 CSVs, and where ../shared is."""

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from ferlite import fer2013  # noqa: E402
from ferlite.names import EMOTIONS  # noqa: E402
from ferlite.training import checkpoints, network  # noqa: E402


def load_script(name):
    """Import one of the repo's scripts by path (`import test` would find Python's own package)."""
    spec = importlib.util.spec_from_file_location(f"fer_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script, *args):
    """`python <script>.py ARGS` in this process, as the script's last line runs it (parse_args, then run_main):
    its exit code, stdout and stderr as subprocess.run gives them, without starting Python and torch again. For
    the many error cases; each script keeps a test that runs it as its own process. PyTorch's thread count is
    restored after (test.py sets it)."""
    out, err, threads, code = io.StringIO(), io.StringIO(), torch.get_num_threads(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            script.run_main(script.main, script.parse_args([str(a) for a in args]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def synthetic_faces(n, seed=0):
    """n 48x48 uint8 'faces' whose class is readable from the picture (a bright band per class), and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 7
    faces = rng.integers(0, 60, size=(n, 48, 48), dtype=np.uint8)
    for i, y in enumerate(labels):
        faces[i, 6 * y : 6 * y + 6, :] = 220
    return faces, labels


def write_csv(path, faces, labels, layout="ours", usage=None, newline="\n"):
    """A FER2013 CSV in our layout (input,target) or the original one (emotion,pixels[,Usage])."""
    rows = []
    if layout == "ours":
        rows.append("input,target")
        rows += [f"{' '.join(map(str, f.ravel()))},{y}" for f, y in zip(faces, labels)]
    else:
        rows.append("emotion,pixels" + (",Usage" if usage is not None else ""))
        for i, (f, y) in enumerate(zip(faces, labels)):
            rows.append(f"{y},{' '.join(map(str, f.ravel()))}" + (f",{usage[i]}" if usage is not None else ""))
    Path(path).write_text(newline.join(rows) + newline, newline="")
    return Path(path)


def write_ferplus(path, labels, usage, seed=0):
    """A fer2013new.csv for a FER2013 CSV's rows: ten votes a face, most for the face's own label, some elsewhere."""
    rng = np.random.default_rng(seed)
    own = {e: c for c, e in fer2013.FERPLUS_EMOTION.items()}
    rows = ["Usage,Image name," + ",".join(fer2013.FERPLUS_COLUMNS)]
    for i, (y, u) in enumerate(zip(labels, usage)):
        votes = dict.fromkeys(fer2013.FERPLUS_COLUMNS, 0)
        votes[own[EMOTIONS[y]]] = 6
        for c in rng.choice(fer2013.FERPLUS_COLUMNS, size=4):
            votes[c] += 1
        rows.append(f"{u},fer{i:07d}.png," + ",".join(str(votes[c]) for c in fer2013.FERPLUS_COLUMNS))
    Path(path).write_text("\n".join(rows) + "\n")
    return Path(path)


def pytest_configure(config):
    config.addinivalue_line("markers", "int8: a training test that checks the int8 copy, so train.py writes it")


@pytest.fixture(scope="session")
def preparation():
    return load_script("preparation")


@pytest.fixture(scope="session")
def train():
    return load_script("train")


@pytest.fixture(scope="session")
def testpy():
    return load_script("test")


@pytest.fixture
def small_csv(tmp_path):
    faces, labels = synthetic_faces(70)
    return write_csv(tmp_path / "small.csv", faces, labels), faces, labels


def tiny_checkpoint(**extra):
    """An untrained 8-channel model and its checkpoint dict: enough to check the plumbing, not the accuracy."""
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7)
    return model, {
        "format_version": checkpoints.CHECKPOINT_FORMAT,
        "arch": "EmotionNet",
        "arch_args": {"widths": [8, 8, 8, 8]},
        "class_names": sorted(EMOTIONS),
        "input_size": 48,
        "mean": 0.5,
        "std": 0.25,
        "state_dict": model.state_dict(),
        "epoch": 1,
        "metrics": {"accuracy": 0.5},
        **extra,
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained model file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    checkpoints.atomic_save(tiny_checkpoint()[1], path)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "test.py"), *map(str, args)], capture_output=True, text=True)
