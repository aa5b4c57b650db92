"""Drawing on photos and frames: a box and an 'emotion confidence' label on each face, placed so that no label
covers another face or label. Shared by test.py and benchmark.py.
"""

import cv2

# One saturated BGR colour per emotion, so the same emotion always has the same box colour; each box is
# drawn over a dark outline, so it shows on light and dark backgrounds alike.
COLORS = {
    "anger": (40, 40, 230),
    "disgust": (30, 160, 30),
    "fear": (200, 60, 200),
    "happy": (0, 210, 255),
    "sad": (230, 130, 30),
    "surprise": (0, 130, 255),
    "neutral": (240, 240, 240),
}
LABEL_MAX_HEIGHT = 0.09  # a label's share of the photo's height at most, unless that is below legible
LABEL_HEIGHT_PER_SCALE = 44  # label height in px per unit of Hershey font scale, text and padding


def _overlap(a, b):
    """Area shared by two (x0, y0, x1, y1) rectangles."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def face_core(box):
    """The part of a face box that must stay visible under its own label: eyes, nose and mouth. The box's top
    quarter (hair, forehead) and its edges may be covered when there is no room outside the box."""
    x, y, w, h = box
    return (x + round(w * 0.1), y + round(h * 0.25), x + round(w * 0.9), y + round(h * 0.92))


def place_label(box, size, taken, image_shape):
    """Where a label of `size` (w, h) goes by `box`: the nearest spot above, under or inside the top of the box,
    shifted sideways or stacked away from it if need be, that covers no other face or label (`taken`) nor its
    own face's eyes and mouth (a box at the photo's top edge); where there is none, the spot that covers least."""
    x, y, w, h = box
    tw, th = size
    height, width = image_shape[:2]
    taken = [*taken, face_core(box)]
    spots = []
    for step in range(6):  # rows ever further from the box
        for ty, extra in ((y - th - step * th, 0), (y + h + step * th, 0.5), (y + step * th, 1)):
            for tx in (x, x + w - tw, x + (w - tw) // 2, x - tw, x + w, x - tw // 2, x + w - tw // 2):
                spots.append((step + extra + abs(tx - x) / max(tw, 1) * 0.25, tx, ty))
    best, best_cost = None, None
    for _, tx, ty in sorted(spots):
        tx, ty = min(max(tx, 0), max(width - tw, 0)), min(max(ty, 0), max(height - th, 0))
        rect = (tx, ty, tx + tw, ty + th)
        cost = sum(_overlap(rect, t) for t in taken)
        if cost == 0:
            return rect
        if best_cost is None or cost < best_cost:
            best, best_cost = rect, cost
    return best


def label_layout(faces, shape):
    """For each face, its label text, rectangle (x0, y0, x1, y1), font scale and stroke: sized by the face and
    the image, placed where it covers no other face and no other label where there is such a spot."""
    height, width = shape[:2]
    smallest = max(0.45, max(height, width) / 1600)  # the smallest text still legible at this image's size
    taken = [(x, y, x + w, y + h) for x, y, w, h in (f["box"] for f in faces)]  # labels must not cover faces...
    layout = []
    for f in faces:
        x, y, w, h = f["box"]
        text = f"{f['emotion']} {f['confidence']:.0%}"
        # Sized by the face, but never taller than LABEL_MAX_HEIGHT of the photo: on a tight crop the label
        # must fit over the forehead rather than cover the face.
        scale = max(smallest, min(2.0, w / 140, height * LABEL_MAX_HEIGHT / LABEL_HEIGHT_PER_SCALE))
        stroke = max(1, round(scale * 1.6))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)
        pad = max(2, round(th / 4))
        own = (x, y, x + w, y + h)
        rect = place_label((x, y, w, h), (tw + 2 * pad, th + base + 2 * pad), [t for t in taken if t != own], shape)
        taken.append(rect)  # ...nor other labels
        layout.append({"text": text, "rect": rect, "scale": scale, "stroke": stroke, "pad": pad, "base": base})
    return layout


def annotate(bgr, faces, note=None):
    """Draw a box and 'emotion confidence' on each face (and `note` top left); returns the drawn copy.

    Lines grow with the image and text with the face (label_layout), so they stay readable on a large
    photo; each box is drawn over a dark outline, so it shows on any background.
    """
    img = bgr.copy()
    line = max(2, round(max(img.shape[:2]) / 400))
    for f in faces:
        x, y, w, h = f["box"]
        cv2.rectangle(img, (x, y), (x + w, y + h), (0, 0, 0), line + 2)
        cv2.rectangle(img, (x, y), (x + w, y + h), COLORS.get(f["emotion"], (0, 255, 0)), line)
    for f, lab in zip(faces, label_layout(faces, img.shape)):
        rect = lab["rect"]
        cv2.rectangle(img, rect[:2], rect[2:], COLORS.get(f["emotion"], (0, 255, 0)), -1)
        cv2.rectangle(img, rect[:2], rect[2:], (0, 0, 0), 1)
        cv2.putText(
            img,
            lab["text"],
            (rect[0] + lab["pad"], rect[3] - lab["pad"] - lab["base"]),
            cv2.FONT_HERSHEY_SIMPLEX,
            lab["scale"],
            (0, 0, 0),
            lab["stroke"],
            cv2.LINE_AA,
        )
    if note:
        cv2.putText(img, note, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(img, note, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2, cv2.LINE_AA)
    return img
