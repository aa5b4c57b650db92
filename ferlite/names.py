"""The names every part shares: the seven emotions in FER2013's id order, the face size, the devices."""

import numpy as np

from ferlite.errors import UserError

# FER2013's label ids, in id order (the CSV's `target` column indexes this tuple). A model's outputs are in
# another order, its class_names (ImageFolder's alphabetical folders): fer2013_ids() is the one translation.
EMOTIONS = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")
IMAGE_SIZE = 48


def fer2013_ids(classes):
    """The FER2013 id of each of a model's classes, in the model's output order.

    The one translation between the two orders: `a[:, fer2013_ids(classes)]` puts columns in FER2013's id
    order (FER+'s vote shares) in model order; model_labels() maps labels the other way.
    """
    return np.array([EMOTIONS.index(c) for c in classes], dtype=np.int64)


def model_labels(names, classes, where):
    """Emotion names (a folder's, or EMOTIONS[id] of a CSV's ids) as indices into `classes`.

    A name that `classes` lacks is a UserError: "{where} has emotion 'x' that ..." (`where` says both halves).
    """
    index = {c: i for i, c in enumerate(classes)}
    missing = next((n for n in names if n not in index), None)
    if missing is not None:
        raise UserError(where.replace("{emotion}", repr(missing)))
    return np.array([index[n] for n in names], dtype=np.int64)


DEVICES = ("auto", "cpu", "cuda", "mps")  # --device's choices in train.py and test.py
