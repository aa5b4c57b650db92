"""Drawing on photos and frames: a box and an 'emotion confidence' label on each face, placed so that no label
covers another face or label (test.py and benchmark.py); and --eval's sheet of the model's mistakes.
"""

import cv2
import numpy as np

from ferlite.files import atomic_write

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


SHEET_CELL = 96  # px a face crop is drawn at (nearest-neighbour from 48: the pixels the model saw)
SHEET_PER_CLASS = 8  # the most confident mistakes shown for each true emotion
SHEET_LABEL_WIDTH = 190  # px of the left column naming the row's true emotion


def most_confident_mistakes(labels, probs, per_class=SHEET_PER_CLASS):
    """For each class k (rows of `probs`' columns), the indices of faces labelled k that the model answered
    otherwise, most confident answer first, at most `per_class`; and the number of such faces."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    rows = []
    for k in range(probs.shape[1]):
        wrong = np.flatnonzero((labels == k) & (predicted != k))
        rows.append((wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class], len(wrong)))
    return rows


def _text(img, text, org, scale, color, stroke=1, width=None):
    """`text` at `org`, its scale lowered until it fits in `width` px where one is given."""
    while width and scale > 0.3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)[0][0] > width:
        scale -= 0.05
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, stroke, cv2.LINE_AA)


def mistakes_sheet(crops, labels, probs, classes, title, per_class=SHEET_PER_CLASS):
    """A BGR contact sheet: a row per true emotion (classes order) of its most confident mistakes, each face crop
    as the model saw it under the emotion it answered and its confidence; returns (image, the rows drawn)."""
    rows = most_confident_mistakes(labels, probs, per_class)
    cell, caption, top = SHEET_CELL, 26, 40
    img = np.full(
        (top + len(classes) * (cell + caption + 8), SHEET_LABEL_WIDTH + per_class * (cell + 4)), 255, np.uint8
    )
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    _text(img, title, (8, 26), 0.6, (0, 0, 0), width=img.shape[1] - 16)
    for r, (k, (shown, wrong)) in enumerate(zip(classes, rows)):
        y = top + r * (cell + caption + 8)
        _text(img, f"true: {k}", (8, y + cell // 2), 0.65, (0, 0, 0), 2)
        _text(img, f"{wrong} of {int((labels == r).sum())} wrong", (8, y + cell // 2 + 26), 0.5, (60, 60, 60))
        for c, i in enumerate(shown):
            x = SHEET_LABEL_WIDTH + c * (cell + 4)
            face = cv2.resize(np.asarray(crops[i], np.uint8), (cell, cell), interpolation=cv2.INTER_NEAREST)
            img[y : y + cell, x : x + cell] = face[..., None]
            answer = classes[int(probs[i].argmax())]
            cv2.rectangle(img, (x, y + cell), (x + cell - 1, y + cell + caption), COLORS.get(answer, (0, 255, 0)), -1)
            _text(img, f"{answer} {probs[i].max():.0%}", (x + 4, y + cell + 18), 0.5, (0, 0, 0), width=cell - 8)
    return img, rows


TIMELINE_FACES = 4  # the faces seen longest get a panel each; the rest are in the summary only


def plot_timeline(records, summaries, classes, path, title):
    """A PNG with a panel per face seen longest (TIMELINE_FACES at most): its smoothed probability of each emotion
    over the seconds of the clip, in the colours its boxes have, headed by its summary line."""
    # Imported here: matplotlib is slow to import and only the end of a video needs it.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    shown = summaries[:TIMELINE_FACES]
    n = max(1, len(shown))
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.4 * n + 0.6), squeeze=False, sharex=True)
    for ax, s in zip(axes[:, 0], shown):
        rows = [r for r in records if r["id"] == s["id"]]
        t = [r["time"] for r in rows]
        for c in classes:
            b, g, r = COLORS.get(c, (0, 200, 0))
            rgb = (0.45, 0.45, 0.45) if c == "neutral" else (r / 255, g / 255, b / 255)  # the white box: gray on paper
            ax.plot(t, [row["probabilities"][c] for row in rows], color=rgb, lw=1.6, label=c)
        ax.set(ylim=(0, 1), ylabel="probability", title=s["line"])
        ax.title.set_fontsize(9)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no face was found in any frame", ha="center", va="center")
    axes[-1, 0].set(xlabel="seconds", xlim=(0, max([r["time"] for r in records], default=0) or 1))
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
