"""Writing a model's int8 ONNX copy (onnx_model reads it): the network quantised, the steps around it float."""

import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ferlite.errors import UserError
from ferlite.files import atomic_write
from ferlite.names import IMAGE_SIZE
from ferlite.onnx_model import FORMAT, file_sha256, float_path, int8_path
from ferlite.training.checkpoints import load_checkpoint
from ferlite.training.network import (
    NORM_MEAN,
    NORM_STD,
    PREDICT_BATCH,
    TEST_SHIFT,
    Ensemble,
    fuse_for_inference,
    head_names,
    model_from_checkpoint,
    subpixel_shift,
)

CALIBRATION_FACES = 512  # spread over the training faces; each with its mirror image sets the int8 ranges


class EveryHead(nn.Module):
    """A model's logits from each of its heads, the answering one first, stacked (H, N, C): one pass of the trunk."""

    def __init__(self, model):
        super().__init__()
        self.stem, self.features = model.stem, model.features
        self.heads = nn.ModuleList([model.head, *model.extra_heads.values()])

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(self.stem(x)), 1), 1)  # dropout: none at inference
        return torch.stack([head(x) for head in self.heads])


class EveryHeadAveraged(nn.Module):
    """EveryHead for an Ensemble: for each head, the log of its members' probabilities averaged (Ensemble)."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x).softmax(-1) for m in self.members]).mean(0).log()


def every_head(ckpt, path="model"):
    """The checkpoint's model as EveryHead on the CPU, BatchNorm folded (fuse_for_inference); its heads are in
    head_names(ckpt)'s order."""
    model = model_from_checkpoint(ckpt, torch.device("cpu"), path, fused=False)
    nets = list(model.members) if isinstance(model, Ensemble) else [model]
    for net in nets:
        if list(net.extra_heads) != head_names(ckpt)[1:]:
            extra = list(net.extra_heads)
            raise UserError(f"model file {path} lists heads {head_names(ckpt)} but has {extra} beside its own")
    graph = EveryHeadAveraged([EveryHead(n) for n in nets]) if isinstance(model, Ensemble) else EveryHead(model)
    return fuse_for_inference(graph).float()


class MirrorAveraged(nn.Module):
    """What predict_proba computes, for every head, as one graph: uint8 faces (N, 48, 48) -> one (N, C) array of
    probabilities a head.

    Each face normalised with the checkpoint's mean and std, resampled TEST_SHIFT pixels off, classified
    with its mirror image in the same call, the two answers averaged. Exported whole, so that one call into
    ONNX Runtime does all of it: NumPy or PyTorch steps between calls cost as much as a third of the
    network's own time (RESULTS.md, "Speed").
    """

    def __init__(self, model, mean, std, shift=TEST_SHIFT):
        super().__init__()
        self.model, self.mean, self.std, self.shift = model, float(mean), float(std), shift

    def forward(self, faces):
        # to_input's arithmetic, written out: its torch.as_tensor would be traced as a constant (a TracerWarning).
        x = subpixel_shift(((faces.float() / 255.0 - self.mean) / self.std).unsqueeze(1), self.shift)
        p = self.model(torch.cat([x, torch.flip(x, dims=[3])])).softmax(-1)  # (H, 2N, C)
        p = p.reshape(p.shape[0], 2, -1, p.shape[2]).mean(1)
        return tuple(p[i] for i in range(p.shape[0]))


def write_int8(model_path, faces, out=None, n_calibration=CALIBRATION_FACES):
    """Write the int8 ONNX copy of model file `model_path` (default: int8_path) and return its path.

    The network is quantised statically (QDQ: int8 weights per output channel, uint8 activations) with
    activation ranges calibrated on `n_calibration` of `faces` (uint8, N x 48 x 48: the training faces),
    evenly spread, each with its mirror image; the steps before and after it (MirrorAveraged) stay float.
    Every head is an output (onnx_model.Int8Model picks one), and the file's metadata says what the runtime
    needs without the `.pt` (onnx_model.FORMAT). A model with more than one head also gets the same graph in
    float beside the copy (`X.float.onnx`, onnx_model.float_path), which answers for its other heads.
    Needs the `onnx` package. The file is written whole or not at all.
    """
    # Here, not at the top: only writing a copy needs onnx and the quantiser; test.py never does.
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model_path = Path(model_path)
    out = Path(out) if out is not None else int8_path(model_path)
    source_sha = file_sha256(model_path)
    ckpt = load_checkpoint(model_path)
    mean, std = ckpt.get("mean", NORM_MEAN), ckpt.get("std", NORM_STD)
    heads = head_names(ckpt)
    graph = MirrorAveraged(every_head(ckpt, model_path), mean, std).eval()
    faces = np.ascontiguousarray(faces, dtype=np.uint8)
    pick = np.unique(np.linspace(0, len(faces) - 1, min(n_calibration, len(faces))).round().astype(int))
    step = PREDICT_BATCH // 2

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"faces": faces[pick[i : i + step]]} for i in range(0, len(pick), step)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated (the new one needs onnxscript), and the mirror image's Slice
            # cannot be constant-folded: neither is the user's concern.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                graph,
                torch.from_numpy(faces[pick[:2]]),
                fp32,
                input_names=["faces"],
                output_names=[f"probabilities_{h}" for h in heads],
                dynamic_axes={"faces": {0: "n"}, **{f"probabilities_{h}": {0: "n"} for h in heads}},
                dynamo=False,
            )
        # Only the network is quantised: the nodes before its first convolution and after its last layer stay float.
        nodes = [n.name for n in onnx.load(fp32).graph.node]
        first = next(i for i, n in enumerate(nodes) if n.endswith("/Conv"))
        last = max(i for i, n in enumerate(nodes) if n.endswith("/Gemm"))
        logging.disable(logging.WARNING)  # onnxruntime advises a pre-processing step on the root logger, twice
        try:
            quantize_static(
                fp32,
                int8,
                Calibration(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=nodes[:first] + nodes[last + 1 :],
            )
        finally:
            logging.disable(logging.NOTSET)
        props = {
            "format": str(FORMAT),
            "heads": json.dumps(heads),
            "input_size": str(int(ckpt.get("input_size", IMAGE_SIZE))),
            "source": model_path.name,
            "source_sha256": source_sha,
            "class_names": json.dumps(list(ckpt["class_names"])),
            "mean": repr(float(mean)),
            "std": repr(float(std)),
            "test_shift": repr(TEST_SHIFT),
        }
        onnx_model = onnx.load(int8)
        onnx.helper.set_model_props(onnx_model, {**props, "precision": "int8", "calibration_faces": str(len(pick))})
        with atomic_write(out) as tmp_out:
            onnx.save(onnx_model, tmp_out)
        if len(heads) > 1:  # the float copy, for the heads int8 serves less well (onnx_model.FLOAT_HEADS)
            float_model = onnx.load(fp32)
            onnx.helper.set_model_props(float_model, {**props, "precision": "float32"})
            with atomic_write(float_path(out)) as tmp_out:
                onnx.save(float_model, tmp_out)
    return out
