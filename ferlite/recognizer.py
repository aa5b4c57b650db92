"""The recognizer: every face in an image, each with its emotion, from the model's ONNX copy. No PyTorch.

    from ferlite import Recognizer
    faces = Recognizer().analyze("photo.jpg")   # a path, a BGR array (cv2.imread) or a PIL image
    # [{"box": [x, y, w, h], "emotion": "happy", "confidence": 0.93, "probabilities": {...}}, ...]

    for frame, faces in Recognizer(detect_size=640).video("clip.mp4"):   # each face followed, its answer smoothed
        ...

test.py is built on this class (it adds PyTorch as a second engine), so the command line and the API give the same
answers.
"""

from pathlib import Path

import cv2
import numpy as np

from ferlite.detection import PHOTO_DETECT_SIZE, box_roll, crop_face, load_detector
from ferlite.errors import ImageReadError, UserError
from ferlite.files import REPO_ROOT
from ferlite.images import read_image, to_gray
from ferlite.onnx_model import Int8Model, int8_path, load_copy
from ferlite.tracking import SMOOTH_FRAMES, FaceTracker, SteadyRoll

DEFAULT_MODEL = REPO_ROOT / "models" / "Facial_Emotion_Recognizer.pt"
# The int8 copy runs on two threads that sleep when idle (onnx_model.Int8Model): ahead of one thread on an idle
# 2-core machine, and still with another program holding a core (RESULTS.md, "Speed").
INT8_THREADS = 2
PYTORCH_INSTALL = "pip install -r requirements-full.txt"  # what brings PyTorch (the full install: training, tests)


def open_onnx(model, head=None, threads=INT8_THREADS, asked=None):
    """The ONNX model that answers for model file `model`: the file itself if it is an `.onnx`, else the int8 copy
    beside the `.pt` where it was made from that very file (load_int8). UserError where there is none, or where it
    lacks `head` (with_head; `asked` is how the error names the request)."""
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise UserError(f"model file {path} not found: pass another --model")
        try:
            onnx = Int8Model(path, threads)
        except Exception as e:  # onnxruntime raises its own types for a damaged file
            raise UserError(f"model file {path} could not be read ({type(e).__name__}): pass another --model") from None
        return with_head(onnx, head, path, asked)
    if not path.is_file():
        raise UserError(f"model file {path} not found: train one with train.py or pass --model")
    onnx, why = load_copy(path, threads=threads, head=head)
    if onnx is not None:
        return with_head(onnx, head, path, asked)
    raise UserError(
        f"{why}: without PyTorch only an int8 copy made from {path.name} can answer; "
        f"write one with python tools/export_int8.py --model {path} (needs PyTorch: {PYTORCH_INSTALL})"
    )


def with_head(onnx, head, path, asked=None):
    """`onnx` where it answers with `head` (None: its first), else a UserError naming the heads it has; `asked`: how
    the error names the request (default "head 'x'"; test.py says "--head x")."""
    if head is None or head in onnx.heads:
        return onnx
    asked = asked or f"head {head!r}"
    if onnx.format < 2:  # a copy written before copies had every head: only its own
        raise UserError(
            f"{asked}: {onnx.path} was written before the int8 copy had every head; rewrite it with "
            f"python tools/export_int8.py --model {path} (needs PyTorch: {PYTORCH_INSTALL})"
        )
    raise UserError(f"{asked}: model file {path} has {' and '.join(onnx.heads)} only; pass one of those")


def as_bgr(image):
    """A path, a BGR or gray array (as cv2.imread gives), a BGRA array, or a PIL image -> 8-bit BGR array."""
    if isinstance(image, (str, Path)):
        try:
            return read_image(image)
        except ImageReadError as e:  # its message says why, after the file's name
            raise ImageReadError(f"{image}: {e}") from None
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image: RGB order
        return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise UserError(f"an image array must be 8-bit (uint8), not {a.dtype}")
    if a.ndim == 2:
        return cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return a if a.shape[2] == 3 else cv2.cvtColor(a, cv2.COLOR_BGRA2BGR)
    raise UserError(f"an image array must be H x W gray or H x W x 3 BGR, not of shape {a.shape}")


class Recognizer:
    """Finds every face in an image and names each face's emotion. Built once (it loads the model and, at first
    use, the face detector), then called for any number of images or video frames.

    `model`: a `.pt` whose int8 copy is beside it (default: the shipped model), or an `.onnx` copy itself.
    `head`: which of the model's heads answers (default its first: ferplus for the shipped model, what most of ten
    people see; fer2013 answers as FER2013's one labeller a face did). `detector`: retinaface, haar or none (each
    image is one face). `detect_size`: longest side of the copy searched for faces. `threads`: the model's,
    `detect_threads`: RetinaFace's. `classifier`: anything with `classes`, `heads`, `size` and
    `predict_proba(faces, head=None)` in place of the ONNX copy (test.py passes PyTorch's).
    """

    def __init__(
        self, model=DEFAULT_MODEL, *, head=None, detector="retinaface", detect_size=None, threads=None,
        detect_threads=None, classifier=None,
    ):  # fmt: skip
        self.path = Path(model)
        self.classifier = classifier or open_onnx(self.path, head, threads or INT8_THREADS)
        self.classes = list(self.classifier.classes)
        self.heads = list(self.classifier.heads)
        self.head = head or self.heads[0]
        self.size = self.classifier.size
        self.detector_name, self.detect_size, self._detector = detector, detect_size or PHOTO_DETECT_SIZE, None
        self.detect_threads = detect_threads

    @property
    def detector(self):
        """The face detector, loaded at first use: scoring a CSV of face crops needs none."""
        if self._detector is None:
            self._detector = load_detector(self.detector_name, max_side=self.detect_size, threads=self.detect_threads)
        return self._detector

    def classify(self, crops):
        """Probabilities (N, C) for uint8 face crops (N, 48, 48), in the order of `classes`."""
        crops = np.asarray(crops, dtype=np.uint8).reshape(-1, self.size, self.size)
        return self.classifier.predict_proba(crops, head=self.head)

    def boxes(self, bgr):
        """The faces found in a BGR image, one per face: (x, y, w, h, score[, landmarks]) as the detector gives."""
        return self.detector.detect(bgr)

    def crop(self, gray, box, roll=None):
        """The face in a detector's box, framed as FER2013 frames its faces and turned upright by `roll` degrees
        (default: so that its eyes are level, where the detector gives landmarks; crop_face)."""
        roll = box_roll(box) if roll is None else roll
        return crop_face(gray, box[:4], self.size, self.detector.framing, roll=roll)

    def faces_in(self, bgr, rolls=None):
        """Every face in a BGR image as a face dict {'box', 'emotion', 'confidence', 'probabilities'}, one batch;
        `rolls`: a function from the detector's boxes to the degrees each face is turned by, in place of each
        face's own eye angle (track's SteadyRoll)."""
        boxes = self.boxes(bgr)
        if not boxes:
            return []
        gray = to_gray(bgr)
        turns = rolls(boxes) if rolls else [None] * len(boxes)
        probs = self.classify(np.stack([self.crop(gray, b, r) for b, r in zip(boxes, turns)]))
        return [self.face(b, p, bgr.shape) for b, p in zip(boxes, probs)]

    def face(self, box, p, shape):
        """One face dict, from its box (in whole pixels, inside the image) and probabilities."""
        height, width = shape[:2]
        x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
        x1, y1 = min(width, round(box[0] + box[2])), min(height, round(box[1] + box[3]))
        k = int(p.argmax())
        return {
            "box": [int(x0), int(y0), int(max(1, x1 - x0)), int(max(1, y1 - y0))],
            "emotion": self.classes[k],
            "confidence": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
        }

    def analyze(self, image):
        """Every face in `image` (a path, a BGR or gray array, or a PIL image) as a list of face dicts:
        [{"box": [x, y, w, h], "emotion": ..., "confidence": ..., "probabilities": {emotion: p, ...}}, ...]."""
        return self.faces_in(as_bgr(image))

    def track(self, frames, smooth=SMOOTH_FRAMES):
        """For each BGR frame of `frames` (any iterable), (frame, faces): each face followed from frame to frame
        (its 'id') and its answer averaged over `smooth` frames, the frame's own kept as 'raw_emotion' and
        'raw_confidence' (tracking.FaceTracker), as test.py --video and --camera do."""
        tracker, steady = FaceTracker(self.classes, smooth), SteadyRoll()
        for frame in frames:
            yield frame, tracker.update(self.faces_in(frame, steady.rolls), frame)

    def video(self, source, smooth=SMOOTH_FRAMES):
        """track() over the frames of a video file (a path) or a camera (its index)."""
        yield from self.track(read_frames(source), smooth)


def read_frames(source):
    """The BGR frames of a video file (a path) or a camera (an int), read as they are asked for."""
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise UserError(f"video {source} not found")
    cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not cap.isOpened():
        raise UserError(f"{source} cannot be opened as a video or camera")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame
    finally:
        cap.release()


__all__ = ["DEFAULT_MODEL", "Recognizer", "as_bgr", "int8_path", "open_onnx", "read_frames"]
