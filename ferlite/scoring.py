"""Scores: the confusion matrix, accuracy and macro-F1, agreement with FER+'s votes, the confusion plot."""

import numpy as np

from ferlite.fer2013 import ferplus_majority, ferplus_shares
from ferlite.names import fer2013_ids


def confusion_matrix(labels, predicted, k):
    """The k x k matrix of counts: row a face's label, column the class predicted for it."""
    return np.bincount(np.asarray(labels) * k + np.asarray(predicted), minlength=k * k).reshape(k, k)


def metrics_from_confusion(cm, classes):
    """Accuracy, macro-F1 and, for each of `classes`, precision, recall, F1 and support; 0 where undefined."""
    cm = np.asarray(cm, dtype=np.int64)
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        r = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f.mean()),
        "confusion": cm.tolist(),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def ferplus_scores(probs, votes, classes):
    """The model's answers against FER+'s people: accuracy and macro-F1 on the faces more than half of them agree on
    (FER+'s majority faces), and how far the probabilities are from the vote shares (mean KL divergence, in nats, and
    the mean total variation, half the summed absolute difference), over faces with votes for one of our emotions."""
    majority = ferplus_majority(votes)
    agreed = majority >= 0
    to_model = {e: i for i, e in enumerate(fer2013_ids(classes))}
    labels = np.array([to_model[e] for e in majority[agreed]], dtype=np.int64)
    m = metrics_from_confusion(confusion_matrix(labels, probs[agreed].argmax(1), len(classes)), classes)
    shares = ferplus_shares(votes)[:, fer2013_ids(classes)].astype(np.float64)
    voted = shares.sum(1) > 0
    p = np.clip(probs[voted].astype(np.float64), 1e-7, 1.0)
    t = shares[voted]
    kl = (t * (np.log(np.where(t > 0, t, 1.0)) - np.log(p))).sum(1)
    tv = 0.5 * np.abs(t - probs[voted]).sum(1)
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "faces": int(agreed.sum()),
        "kl_divergence": float(kl.mean()),
        "total_variation": float(tv.mean()),
        "vote_faces": int(voted.sum()),
        "confusion": m["confusion"],
        "recall": {c: v["recall"] for c, v in m["per_class"].items()},
    }


def plot_confusion(confusion, classes, path, normalize, title):
    """The confusion matrix as an annotated heatmap, counts or row-normalised rates, saved as PNG."""
    # Imported here: matplotlib is slow to import, paid only by runs that draw. Drawn with matplotlib alone:
    # seaborn's heatmap drew the same picture and its import (scipy with it) cost each run more than a second.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    cm = np.array(confusion, dtype=float)
    if normalize:
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(cm.max(), 1e-9), aspect="auto")
    fig.colorbar(image, ax=ax)
    n = len(classes)
    ax.set_xticks(range(n), classes)
    ax.set_yticks(range(n), classes)
    for (i, j), v in np.ndenumerate(cm):  # dark cells get white figures, as seaborn's annot did
        dark = v > 0.6 * image.norm.vmax
        ax.text(j, i, f"{v:.2f}" if normalize else f"{v:.0f}", ha="center", va="center", color="w" if dark else "k")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
