"""ferlite: every face in a photo, each with its emotion.

    from ferlite import Recognizer
    faces = Recognizer().analyze("photo.jpg")

The runtime (this package's top level: names, errors, images, detection, the ONNX model, tracking, drawing, the
recognizer) needs ONNX Runtime, OpenCV and NumPy, never PyTorch. `ferlite.training` (the network, checkpoints,
the ONNX export) imports PyTorch; it imports the runtime, never the other way round.
"""

__all__ = ["Recognizer"]


def __getattr__(name):
    if name == "Recognizer":
        # Here, at first use: `from ferlite.errors import UserError` (train.py, preparation.py) need not load ONNX
        # Runtime and OpenCV.
        from ferlite.recognizer import Recognizer

        return Recognizer
    raise AttributeError(f"module 'ferlite' has no attribute {name!r}")
