"""Probe (not used by the scripts): the shipped model as int8 ONNX in ONNX Runtime, one face at a time.

    pip install onnx                                     # not in requirements.txt: only this probe needs it
    python tools/int8_probe.py ../shared/data/fer2013/val.csv.gz

Exports the fused model to ONNX, quantises it statically (QDQ, int8 weights per channel, uint8 activations)
with the first 512 faces of the CSV as calibration, then compares on every face of the CSV, as test.py
scores them (quarter-pixel resampled, mirror image averaged): accuracy and agreement of PyTorch (bfloat16),
ONNX Runtime float32 and int8; and one face with its mirror image at a time on one thread (median of 5).
Issue 17: a candidate for the one-face path, measured here before it is built in.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import EMOTIONS, REPO_ROOT, load_checkpoint, read_csv  # noqa: E402
from network import model_from_checkpoint, subpixel_shift, to_input  # noqa: E402


def main(csv):
    torch.set_num_threads(1)
    ck = load_checkpoint(REPO_ROOT / "models" / "Facial_Emotion_Recognizer.pt")
    model = model_from_checkpoint(ck, torch.device("cpu")).eval()
    faces, ids, _, _ = read_csv(csv, progress=False)
    labels = np.array([ck["class_names"].index(EMOTIONS[i]) for i in ids])
    x = subpixel_shift(to_input(torch.from_numpy(faces)))
    pairs = torch.cat([x, x.flip(-1)], 1).reshape(-1, 1, 48, 48).numpy()  # face, mirror, face, mirror, ...
    tmp = Path(tempfile.mkdtemp())
    torch.onnx.export(
        model, x[:2], tmp / "m.onnx", input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False
    )

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": pairs[i : i + 64]} for i in range(0, 1024, 64)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        tmp / "m.onnx",
        tmp / "m8.onnx",
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = {n: ort.InferenceSession(str(tmp / f), opts) for n, f in (("fp32", "m.onnx"), ("int8", "m8.onnx"))}

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def torch_run(b):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(b).contiguous(memory_format=torch.channels_last)).float().numpy()

    runners = {"PyTorch bfloat16": torch_run}
    runners.update({f"ONNX Runtime {n}": (lambda b, s=s: s.run(None, {"x": b})[0]) for n, s in sessions.items()})
    answers = {}
    for name, run in runners.items():
        p = softmax(np.concatenate([run(pairs[i : i + 128]) for i in range(0, len(pairs), 128)]))
        answers[name] = (p[0::2] + p[1::2]) / 2
    ref = answers["PyTorch bfloat16"]
    for name, p in answers.items():
        print(
            f"{name}: accuracy {(p.argmax(1) == labels).mean():.2%} on {len(labels)} faces; same answer as PyTorch "
            f"{(p.argmax(1) == ref.argmax(1)).mean():.2%}, largest probability difference {np.abs(p - ref).max():.3f}"
        )
    one = pairs[:2]
    for name, run in runners.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                run(one)
            times.append((time.perf_counter() - start) / 200)
        print(f"{name}, one face and its mirror image a call, 1 thread: {1 / statistics.median(times):.0f} faces/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT / "data" / "train.csv")
