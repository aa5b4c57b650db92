"""The model's ONNX copy in ONNX Runtime: what answers photos, video and the API, with no PyTorch.

Beside a model file `X.pt`, `X.int8.onnx` is the same model quantised to int8. The file describes itself
(metadata_props: class names, heads, input size, normalisation, a format version, the sha256 of the `.pt` it was
made from), so nothing here needs the `.pt` or PyTorch; where both are at hand the copy is used only while it was
made from that very `.pt` (load_int8)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ferlite.files import beside_model

# Beside a model file `X.pt`, `X.int8.onnx` is the same model quantised to int8 for ONNX Runtime. The
# `.pt` stays the one source of truth: the copy records the sha256 of the file it was made from and is
# used only while that is the file loaded (load_int8). train.py writes it at the end of a run;
# tools/export_int8.py writes it for an existing model.
INT8_SUFFIX = ".int8.onnx"
# Beside it, for a model with more than one head, `X.float.onnx`: the same graph unquantised. It answers for every
# head but the first, which int8 served less well than the first; the first keeps int8's speed (RESULTS.md, "The
# light install").
FLOAT_SUFFIX = ".float.onnx"
# What the copy's metadata says, by version: 1 (no "format" key) one output, the answering head's; 2 an output per
# head, named in "heads" (answering head first), and the input size.
FORMAT = 2
# Images a forward call: a face and its mirror image go through in the same call, and calls this small keep
# the activations in a CPU's cache (RESULTS.md, "Speed").
PREDICT_BATCH = 64


def int8_path(model_path):
    """Where the int8 copy of model file `model_path` lives: `X.pt` -> `X.int8.onnx` beside it."""
    return beside_model(model_path, INT8_SUFFIX)


def float_path(copy_path):
    """Where the float copy goes beside int8 copy `copy_path`: `X.int8.onnx` -> `X.float.onnx`."""
    p = Path(copy_path)
    stem = p.name[: -len(INT8_SUFFIX)] if p.name.endswith(INT8_SUFFIX) else p.stem
    return p.with_name(stem + FLOAT_SUFFIX)


def file_sha256(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Int8Model:
    """An ONNX copy (the int8 one, or the float one) in an ONNX Runtime session: predict_proba's answers for uint8
    faces, on a CPU, for any head."""

    def __init__(self, path, threads=1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, int(threads)), 1
        # Threads that sleep instead of spinning when idle: with another program on one of two cores, one face
        # took 1.5x as long with spinning threads and 1.3x without (RESULTS.md, "Speed").
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path, self.threads = Path(path), opts.intra_op_num_threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.meta = self.session.get_modelmeta().custom_metadata_map
        self.format = int(self.meta.get("format", 1))
        self.classes = list(json.loads(self.meta.get("class_names", "[]")))
        self.n_classes = len(self.classes)
        # A format-1 copy has one output and does not name its head: None stands for "the model's own".
        self.heads = list(json.loads(self.meta["heads"])) if "heads" in self.meta else [None]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.size = int(self.meta.get("input_size", 48))

    def output(self, head=None):
        """The session's output name for `head` (None: the answering head); KeyError for a head the copy lacks."""
        if head is None or head == self.heads[0]:
            return self.outputs[0]
        if head not in self.heads:
            raise KeyError(head)
        return self.outputs[self.heads.index(head)]

    def predict_proba(self, faces, batch_size=PREDICT_BATCH, head=None):
        """Class probabilities (N, C) for uint8 faces (N, 48, 48) from `head` (default the answering one), each
        face's averaged with its mirror image's.

        The same answers as network.predict_proba's with the checkpoint's mean and std, to int8's precision;
        `batch_size` counts the images of one call, mirror images included.
        """
        name = self.output(head)
        faces = np.ascontiguousarray(faces, dtype=np.uint8)
        step = max(1, batch_size // 2)
        out = [self.session.run([name], {"faces": faces[i : i + step]})[0] for i in range(0, len(faces), step)]
        return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)


def load_int8(model_path, class_names=None, threads=1, head=None, path=None):
    """(Int8Model, None) when the int8 copy beside `model_path` (or the copy at `path`) was made from this very file
    (by sha256: no need to read the `.pt`) and answers with `head` (None: the model's own), else (None, why not)."""
    path = int8_path(model_path) if path is None else Path(path)
    if not path.is_file():
        return None, f"{path} not found"
    try:
        int8 = Int8Model(path, threads)
    except Exception as e:  # onnxruntime raises its own types for a damaged file
        return None, f"{path} could not be read ({type(e).__name__})"
    if int8.meta.get("source_sha256") != file_sha256(model_path):
        return None, f"{path} was made from another version of {Path(model_path).name}"
    if class_names is not None and int8.classes != list(class_names):
        return None, f"{path} names other classes than {Path(model_path).name}"
    if head is not None and head != int8.heads[0] and head not in int8.heads:
        return None, f"{path} was written before the int8 copy had every head, so it lacks the {head} head"
    return int8, None


def load_copy(model_path, class_names=None, threads=1, head=None):
    """load_int8's answer, except that a head other than the model's first is answered by the float copy where it
    is beside the int8 one and made from this very file too (FLOAT_SUFFIX)."""
    int8, why = load_int8(model_path, class_names, threads)
    if int8 is None or head is None or head == int8.heads[0]:
        return int8, why
    exact, _ = load_int8(model_path, class_names, threads, head, path=float_path(int8.path))
    return (exact, None) if exact is not None else (int8, None)
