"""Following faces from frame to frame in a video or a camera's stream, each face's answer averaged over frames;
the summary of each followed face."""

from collections import deque

import cv2
import numpy as np

from ferlite.detection import box_roll, iou

# A face in a video keeps its label unless its answer, averaged over this many frames, changes.
SMOOTH_FRAMES = 10
SWITCH_MARGIN = 0.05  # ...and keeps it while the averaged answer for it is within this of the best one
TRACK_IOU = 0.3  # a box in the next frame overlapping this much is the same face...
TRACK_MISSING = 5  # ...and a face unseen for more frames than this is gone
# A new shot ends every track, even where a face of the next shot sits where the last one was: a cut is a change
# of a frame's hue, saturation and value averaged over its pixels of more than SCENE_CUT (of 255), as
# PySceneDetect's ContentDetector defines one (its default threshold), on a copy CUT_WIDTH px wide: so small
# that a pan of 16 px a frame or a 5% zoom stays under it (RESULTS.md, "Video").
SCENE_CUT, CUT_WIDTH = 27.0, 32
GRAY_SATURATION = 8  # a frame whose mean saturation is below this is black and white
# A followed face is turned upright by its eyes' angle averaged over frames: each frame moves the angle this share
# of the way to that frame's own. RetinaFace's eyes on a small face jitter by degrees from frame to frame, and a
# crop turned by each frame's own angle changed its answer more often than the box's plain crop (RESULTS.md,
# "Faces turned upright").
ROLL_EMA = 0.05


class FaceTracker:
    """Follows faces from frame to frame by box overlap and averages each face's answer over `window` frames.

    update() gives each face record an 'id', keeps the frame's own answer as 'raw_emotion' and
    'raw_confidence', and replaces 'emotion', 'confidence' and 'probabilities' by the average.
    """

    def __init__(self, classes, window=SMOOTH_FRAMES, margin=None):
        self.classes, self.window = classes, max(1, window)
        self.margin = (SWITCH_MARGIN if window > 1 else 0.0) if margin is None else margin
        self.tracks, self.next_id, self.last_frame = {}, 1, None

    def update(self, faces, frame=None):
        """`frame`: the BGR frame the faces are in; a new shot (scene_change) starts every face afresh."""
        if frame is not None:
            small = frame_hsv(frame)
            if self.last_frame is not None and scene_change(self.last_frame, small) > SCENE_CUT:
                self.tracks.clear()
            self.last_frame = small
        pairs = sorted(
            ((iou(f["box"], t["box"]), i, tid) for i, f in enumerate(faces) for tid, t in self.tracks.items()),
            reverse=True,
        )
        matched, used = {}, set()
        for overlap, i, tid in pairs:
            if overlap < TRACK_IOU:
                break
            if i not in matched and tid not in used:
                matched[i] = tid
                used.add(tid)
        for tid in list(self.tracks):
            if tid not in used:
                self.tracks[tid]["missing"] += 1
                if self.tracks[tid]["missing"] > TRACK_MISSING:
                    del self.tracks[tid]
        for i, f in enumerate(faces):
            tid = matched.get(i)
            if tid is None:
                tid, self.next_id = self.next_id, self.next_id + 1
                self.tracks[tid] = {"history": deque(maxlen=self.window)}
            track = self.tracks[tid]
            track.update(box=f["box"], missing=0)
            track["history"].append([f["probabilities"][c] for c in self.classes])
            mean = np.mean(track["history"], axis=0)
            k = int(mean.argmax())
            held = track.get("label")
            if held is not None and mean[held] + self.margin >= mean[k]:
                k = held  # a near tie keeps the label the face has: no flicker between two close answers
            track["label"] = k
            f.update(
                id=tid,
                raw_emotion=f["emotion"],
                raw_confidence=f["confidence"],
                emotion=self.classes[k],
                confidence=float(mean[k]),
                probabilities={c: float(v) for c, v in zip(self.classes, mean)},
            )
        return faces


class SteadyRoll:
    """The degrees each face of a video is turned upright by: its eyes' angle (eye_roll), averaged over the frames
    in which a box overlapping it by TRACK_IOU or more was found in the frame before (an exponential average at
    `rate`; 1 is each frame's own angle). Faces without landmarks (Haar's) are not turned."""

    def __init__(self, rate=ROLL_EMA):
        self.rate, self.last = rate, []

    def rolls(self, boxes):
        """The angles for one frame's boxes (x, y, w, h, score[, landmarks]), in their order."""
        out = []
        for box in boxes:
            roll = box_roll(box)
            before = max(self.last, key=lambda kept: iou(kept[0], box[:4]), default=None)
            if before is not None and iou(before[0], box[:4]) >= TRACK_IOU:
                roll = before[1] + self.rate * (roll - before[1])
            out.append(roll)
        self.last = [(box[:4], roll) for box, roll in zip(boxes, out)]
        return out


def frame_hsv(bgr):
    """A CUT_WIDTH px wide copy of a frame in HSV, as int16 (scene_change subtracts two)."""
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    h, w = bgr.shape[:2]
    small = cv2.resize(bgr, (CUT_WIDTH, max(1, round(h * CUT_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2HSV).astype(np.int16)


def scene_change(a, b):
    """How much two frames (frame_hsv copies) differ: the mean change of hue, saturation and value, 0-255; of
    value alone where both are gray (PySceneDetect's luma_only), whose hue and saturation are 0 throughout."""
    if a.shape != b.shape:
        return 255.0
    change = np.abs(a - b).mean(axis=(0, 1))
    gray = max(a[..., 1].mean(), b[..., 1].mean()) < GRAY_SATURATION
    return float(change[2] if gray else change.mean())


def clock(seconds):
    """'1:32' for 92.4 seconds; hours as '1:02:03'."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def track_summaries(records, classes):
    """Per followed face (FaceTracker's ids), the most frames first: when it was seen, in how many frames, and
    each emotion's share of those frames (its smoothed answer; shares in descending order, zeros left out)."""
    by_id = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    summaries = []
    for tid, rows in sorted(by_id.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        counts = {c: sum(r["emotion"] == c for r in rows) for c in classes}
        shares = {c: n / len(rows) for c, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n}
        first, last = rows[0]["time"], rows[-1]["time"]
        line = f"face {tid}, {clock(first)}-{clock(last)}, {len(rows):,} frame{'s' if len(rows) > 1 else ''}: "
        line += ", ".join(f"{c} {s:.0%}" for c, s in shares.items())
        summaries.append({"id": tid, "first": first, "last": last, "frames": len(rows), "shares": shares, "line": line})
    return summaries
