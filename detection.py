"""Finding faces in photos and cutting them out as the network's 48x48 input.

Shared by test.py and benchmark.py; split from common.py as face detection is a subject of its own.
"""
import os

import cv2
import numpy as np

from common import IMAGE_SIZE, UserError


def crop_face(gray, box, size=IMAGE_SIZE):
    """The face in `box` (x, y, w, h) of a gray image, resized to size x size uint8."""
    x, y, w, h = (int(v) for v in box)
    crop = gray[max(y, 0):y + h, max(x, 0):x + w]
    interp = cv2.INTER_AREA if min(crop.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


# ---------------------------------------------------------------------------------------------
# Face detection


def load_face_detector():
    """OpenCV's frontal-face Haar cascade, the one that ships with opencv-python."""
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise UserError(f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them): "
                        "pip install 'opencv-python<5', or pass --no-detect with face crops")
    path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"could not load the Haar cascade {path}: reinstall 'opencv-python-headless<5'")
    return cascade


def detect_faces(cascade, gray, scale_factor=1.1, min_neighbors=3, min_weight=0.0, min_size_frac=0.0, max_side=1280):
    """Face boxes (x, y, w, h) in a gray uint8 image; large images are searched at a smaller size.

    A low `min_neighbors` finds more faces; `min_weight`, the cascade's confidence in its last stage
    (detectMultiScale3's level weight), then removes the weak detections that are mostly not faces.
    The search runs on a histogram-equalised copy (finds more faces in dim or flat light); where that
    finds none, on the plain image, since equalising a photo that is mostly flat background (a face on
    a white wall) washes the face out.
    """
    h, w = gray.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else gray
    min_side = max(20, int(min_size_frac * min(small.shape[:2])))
    if min(small.shape[:2]) < min_side:
        return []
    for image in (cv2.equalizeHist(small), small):
        boxes, _, weights = cascade.detectMultiScale3(image, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                                      minSize=(min_side, min_side), outputRejectLevels=True)
        found = [tuple(int(round(v / scale)) for v in b) for b, wt in zip(boxes, np.ravel(weights)) if wt >= min_weight]
        if found:
            return found
    return []


