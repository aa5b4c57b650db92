"""Find every face in photos, videos or a webcam and name each face's emotion; or score the model.

    python test.py samples/grace_hopper.jpg               # annotated copy in outputs/
    python test.py photos/ more.png --json faces.json --csv faces.csv
    python test.py --video clip.mp4                       # annotated video + per-frame table in outputs/
    python test.py --camera 0                             # live window; q quits
    python test.py --detector none crops/                 # each image is already one face
    python test.py --eval data/fer2013.csv --ferplus data/fer2013new.csv --json scores.json

Faces are found with RetinaFace (or OpenCV's Haar cascade, --detector haar) and cut out framed as
FER2013 frames its faces; all faces of a photo or frame are classified in one batch, each resampled
a quarter pixel off as training's warps resample every face (network.TEST_SHIFT in ferlite.training),
with the mirror image averaged in (as train.py validates). In a video each face is followed from frame to frame and
its answer averaged over the last --smooth frames, so a still face keeps its label.

Built on ferlite.Recognizer (the Python API): the model's int8 ONNX copy answers, in ONNX Runtime, with no
PyTorch (the light install). PyTorch answers where asked (--engine pytorch, --device cuda) and scores a `.pt`
for --eval, in the full install.
"""

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from ferlite import recognizer as api
from ferlite.detection import DETECTORS, PHOTO_DETECT_SIZE, VIDEO_DETECT_SIZE, crop_face, detector_class
from ferlite.drawing import annotate, mistakes_sheet, plot_timeline
from ferlite.errors import ImageReadError, Interrupted, UserError, run_main
from ferlite.fer2013 import load_labelled
from ferlite.files import REPO_ROOT, atomic_write, write_json
from ferlite.images import IMAGE_EXTENSIONS, is_image_file, read_image, to_gray
from ferlite.names import DEVICES
from ferlite.onnx_model import int8_path, load_copy
from ferlite.scoring import confusion_matrix, ferplus_scores, metrics_from_confusion, plot_confusion
from ferlite.tracking import SMOOTH_FRAMES, track_summaries

DEFAULT_MODEL = api.DEFAULT_MODEL
SAMPLE_PHOTO = REPO_ROOT / "samples" / "grace_hopper.jpg"
# Photos, video and camera classify a few faces a call with PyTorch: too little work to share between threads,
# and a second thread stalls whenever another program holds a core (RESULTS.md, "Speed"). --eval's large
# batches use every core.
INFERENCE_THREADS = 1
# Photos, video and camera classify with the model's int8 copy where it was made from the model file loaded:
# many times faster a face on a CPU, nearly always the same answer (RESULTS.md, "Speed"). --eval keeps
# PyTorch where it is installed, so the scores it reports are the model's own.
ENGINES = ("auto", "int8", "pytorch")
HAAR_GONE = "--detector haar searches with the same settings on every photo; drop the flag"
REMOVED_FLAGS = {"--no-detect": "use --detector none", **dict.fromkeys(
    ("--scale-factor", "--min-neighbors", "--min-weight", "--min-face"), HAAR_GONE)}  # fmt: skip
INT8_THREADS = api.INT8_THREADS
PHOTO_LINES = 20  # up to this many photos get a line per face; more get one progress bar (the records have it all)
# Photos read, searched and annotated at once, a thread each: decoding and drawing use one core whatever the
# detector's threads, so two photos at a time keep two cores busy (benchmark.py, "photos/s").
PHOTO_WORKERS = min(8, os.cpu_count() or 1)
PROGRESS_FILE = "photos_done.jsonl"  # a line per finished photo, for --skip-done after an interrupted run


def pytorch(flag):
    """PyTorch's ferlite.training modules (checkpoints, network), imported only where a flag needs them; where
    PyTorch is not installed (the light install), one line naming the flag and the install that brings it."""
    try:
        # Here, only where a flag needs it: photos, video and the camera run without PyTorch.
        from ferlite.training import checkpoints, network
    except ImportError as e:
        if getattr(e, "name", None) not in ("torch", "torchvision") and "torch" not in str(e):
            raise
        raise UserError(f"{flag} needs PyTorch, which this install lacks: {api.PYTORCH_INSTALL}") from None
    return checkpoints, network


def has_pytorch():
    """Whether PyTorch can be imported here (the full install), without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # sys.modules["torch"] = None, as the light install's test sets it
        return False


class Recognizer(api.Recognizer):
    """ferlite's Recognizer with a choice of engine: the int8 ONNX copy (no PyTorch) or the `.pt` in PyTorch."""

    def __init__(
        self, path, device="cpu", *, detector="retinaface", detect_size=None, engine="auto", threads=None, head=None,
        detect_threads=None, bf16=True,
    ):  # fmt: skip
        """`device`: PyTorch's (a name or a torch.device; the int8 copy runs on the CPU); `threads`: the int8 copy's,
        `detect_threads` RetinaFace's (defaults INT8_THREADS, DETECT_THREADS); `head`: which answers (default the
        model's first); `bf16`: PyTorch classifies in bfloat16 autocast where the CPU has it (photos, video), else
        float32 (--eval: the same figures on every CPU)."""
        self.path, self.device, self.bf16, self.model = Path(path), device, bf16, None
        if self.path.suffix.lower() != ".onnx" and not self.path.is_file():
            raise UserError(f"model file {self.path} not found: train one with train.py or pass --model")
        self.int8 = self.load_engine(engine, threads, head)
        classifier = self.int8 if self.int8 is not None else self.load_pytorch(head, engine)
        super().__init__(
            self.path, head=head, detector=detector, detect_size=detect_size, detect_threads=detect_threads,
            classifier=classifier,
        )  # fmt: skip

    @property
    def on_cpu(self):
        return str(getattr(self.device, "type", self.device)) == "cpu"

    def load_engine(self, engine, threads=None, head=None):
        """The model's int8 copy (see ENGINES) on `threads` threads (default INT8_THREADS), or None where PyTorch
        classifies."""
        if self.path.suffix.lower() == ".onnx":  # an ONNX copy named directly: it is the engine
            if engine == "pytorch":
                raise UserError(f"--engine pytorch needs a .pt model file, not {self.path}")
            return api.open_onnx(
                self.path, head, threads or min(INT8_THREADS, os.cpu_count() or 1), asked=f"--head {head}"
            )
        if engine == "pytorch" or (engine == "auto" and not self.on_cpu):
            return None
        int8, why = load_copy(self.path, threads=threads or min(INT8_THREADS, os.cpu_count() or 1), head=head)
        if int8 is not None and head is not None and head not in int8.heads:
            if int8.format >= 2:  # the copy lists every head the model has: a head it lacks is the user's mistake
                api.with_head(int8, head, self.path, f"--head {head}")
            int8, why = None, f"{int8_path(self.path)} was written before the int8 copy had every head"
        if int8 is None and engine == "int8":
            raise UserError(f"--engine int8: {why}; write it with python tools/export_int8.py --model {self.path}")
        if int8 is None and int8_path(self.path).exists():  # a copy that is there but unusable: say so, once
            rewrite = f"rewrite it with python tools/export_int8.py --model {self.path}"
            print(f"note: {why}, so PyTorch classifies (slower); {rewrite}", file=sys.stderr)
        return int8

    def load_pytorch(self, head, engine):
        """The `.pt` as a classifier in PyTorch (network.TorchClassifier)."""
        flag = "--engine pytorch" if engine == "pytorch" else f"--model {self.path} (no usable int8 copy beside it)"
        checkpoints, network = pytorch(flag)
        if isinstance(self.device, str):
            self.device = checkpoints.choose_device(self.device)
        classifier = network.TorchClassifier(self.path, self.device, head=head, bf16=self.bf16)
        self.model, self.mean, self.std = classifier.model, classifier.mean, classifier.std
        return classifier


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def expand_inputs(paths):
    """Photos named directly, plus the images found in named folders (recursively); (photos, skipped files)."""
    photos, skipped = [], 0
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    if is_image_file(f):
                        photos.append(f)
                    else:
                        skipped += 1
        else:
            photos.append(p)  # a missing or bad file is reported when it is read
    return photos, skipped


def output_path(out_dir, src, used, suffix="_emotions", ext=None):
    """<out>/<stem><suffix><ext>, numbered where two inputs share a name."""
    if ext is None:
        ext = src.suffix.lower() if src.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg"
    name, n = f"{src.stem}{suffix}{ext}", 2
    while name in used:
        name, n = f"{src.stem}{suffix}_{n}{ext}", n + 1
    used.add(name)
    return out_dir / name


def prepare_out_dir(out):
    """Create --out, or say why it cannot be."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created ({e.strerror}): pass another --out") from None


def check_writable(path, flag, out=None):
    """Fail early, before any work, if `flag`'s file cannot be written; inside `out` (--out, made later) it can."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file")
    if not path.parent.is_dir() and not (out is not None and path.parent.absolute() == out.absolute()):
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist; create it or pass another path")


def write_records(records, json_path, csv_path, classes, summaries=None):
    """One record per face (a photo with no face: one record with box None) as JSON and/or CSV; a video's JSON is
    {"faces": its summaries, "frames": the records}."""
    if json_path:
        write_json(records if summaries is None else {"faces": summaries, "frames": records}, json_path, indent=1)
    if csv_path:
        extra = [k for k in ("frame", "time", "id") if any(k in r for r in records)]
        raw = [k for k in ("raw_emotion", "raw_confidence") if any(k in r for r in records)]
        cols = ["file", *extra, "x", "y", "w", "h", "emotion", "confidence", *raw, *classes]
        with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                box = r.get("box") or ["", "", "", ""]
                probs = r.get("probabilities") or {}
                w.writerow(
                    [
                        r["file"],
                        *(r.get(k, "") for k in extra),
                        *box,
                        r.get("emotion") or "",
                        f"{r['confidence']:.4f}" if r.get("confidence") is not None else "",
                        *(r.get("raw_emotion", "") if k == "raw_emotion" else f"{r.get(k, 0):.4f}" for k in raw),
                        *(f"{probs[c]:.4f}" if c in probs else "" for c in classes),
                    ]
                )


def write_image(dest, bgr):
    """An image file written whole (atomic_write), in the format its extension names."""
    with atomic_write(dest) as tmp:
        if not cv2.imwrite(str(tmp), bgr):
            raise UserError(f"could not write {dest}: check --out and free disk space")


def read_progress(path):
    """{photo: (its annotated copy, its records)} from a PROGRESS_FILE; a line cut short by a kill is skipped."""
    done = {}
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                done[entry["photo"]] = (entry["annotated"], entry["records"])
    return done


def annotate_photo(recognizer, photo, dest):
    """Read one photo, find and classify its faces, write its annotated copy to `dest`; its faces (a worker's job)."""
    bgr = read_image(photo)
    faces = recognizer.faces_in(bgr)
    write_image(dest, annotate(bgr, faces))
    return faces


def run_photos(recognizer, photos, out, skip_done=False, workers=1):
    """Annotate each photo into `out`, `workers` at a time, recording each in <out>/PROGRESS_FILE as it is done;
    with `skip_done`, the photos recorded there by an earlier run are skipped. Returns (records, number of
    unreadable photos), in the photos' order."""
    progress, lines = out / PROGRESS_FILE, len(photos) <= PHOTO_LINES
    earlier = read_progress(progress) if skip_done else {}
    records, failed, done, queue, used = [], 0, 0, deque(), {Path(a).name for a, _ in earlier.values()}
    todo = iter(map(Path, photos))

    def record(photo, dest, faces):
        nonlocal done
        none = {"box": None, "emotion": None, "confidence": None, "probabilities": None}
        mine = [{"file": str(photo), **f} for f in faces] or [{"file": str(photo), **none}]
        log.write(json.dumps({"photo": str(photo), "annotated": str(dest), "records": mine}) + "\n")
        log.flush()
        done += 1
        return mine

    with open(progress, "a" if skip_done else "w") as log, ThreadPoolExecutor(workers) as pool:
        bar = tqdm(total=len(photos), unit=" photo", disable=lines, smoothing=0.05, desc="photos")
        current, ahead = None, 2 * workers if workers > 1 else 1  # one worker: one photo at a time, as ever
        try:
            while True:
                while len(queue) < ahead and (photo := next(todo, None)) is not None:
                    dest = None if str(photo) in earlier else output_path(out, photo, used)
                    queue.append((photo, dest, dest and pool.submit(annotate_photo, recognizer, photo, dest)))
                if not queue:
                    break
                current = photo, dest, job = queue.popleft()
                bar.update()
                if job is None:
                    records += earlier[str(photo)][1]
                    continue
                try:
                    faces = job.result()
                except ImageReadError as e:
                    (print if lines else bar.write)(f"error: {photo} {e}; skipped", file=sys.stderr)
                    failed += 1
                    continue
                current = None
                records += record(photo, dest, faces)
                if lines and not faces:
                    print(f"{photo}: no face found")
                for i, f in enumerate(faces if lines else [], 1):
                    x, y, w, h = f["box"]
                    print(f"{photo}: face {i} at ({x}, {y}, {w}x{h}): {f['emotion']} {f['confidence']:.0%}")
        except KeyboardInterrupt:
            pool.shutdown(cancel_futures=True)  # the photos being worked on are finished, and recorded too
            for photo, dest, job in [current, *queue] if current else queue:
                if job and not job.cancelled() and job.exception() is None:
                    record(photo, dest, job.result())
            raise Interrupted(
                f"{done} of {len(photos)} photos were annotated into {out}, each file whole, and recorded in "
                f"{progress}; --json and --csv were not written: run the same command with --skip-done to finish"
            ) from None
    return records, failed


def run_stream(recognizer, capture, name, writer=None, show=None, max_frames=0, smooth=SMOOTH_FRAMES):
    """Annotate every frame of an opened cv2.VideoCapture; returns (records, frames, seconds).

    Each face is followed from frame to frame and its answer averaged over `smooth` frames (FaceTracker).
    `writer(frame)` receives each annotated frame, `show(frame)` too and returns False to stop:
    a video file and a live camera go through this same loop.
    """
    fps_in = capture.get(cv2.CAP_PROP_FPS) or 30.0  # 0 for some cameras
    records, n, t0, fps, read_at = [], 0, time.perf_counter(), 0.0, [0.0]

    def frames():
        while not (max_frames and n >= max_frames):
            ok, frame = capture.read()
            if not ok:
                return
            read_at[0] = time.perf_counter()  # frames per second count the recognizer's work, not the decoding
            yield frame

    for frame, faces in recognizer.track(frames(), smooth):  # the API's tracking and smoothing (ferlite.Recognizer)
        spent = max(time.perf_counter() - read_at[0], 1e-6)
        fps = 0.9 * fps + 0.1 / spent if n else 1 / spent
        for f in faces:
            records.append({"file": name, "frame": n, "time": round(n / fps_in, 3), **f})
        drawn = annotate(frame, faces, note=f"{fps:.0f} fps" if show else None)
        if writer is not None:
            writer(drawn)
        if show is not None and show(drawn) is False:
            break
        n += 1
    return records, n, time.perf_counter() - t0


def run_video(recognizer, video, out, smooth=SMOOTH_FRAMES):
    """Annotate a video file into <out>/<stem>_emotions.mp4 and a per-frame table <stem>_frames.csv."""
    if not video.is_file():
        raise UserError(f"--video {video} not found")
    cap = cv2.VideoCapture(str(video))
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if not cap.isOpened() or w <= 0 or h <= 0:  # a damaged file can open with frames of no size
        cap.release()
        raise UserError(f"--video {video} cannot be opened as a video (is it MP4, AVI, MOV ...?)")
    dest = out / f"{video.stem}_emotions.mp4"
    try:
        with atomic_write(dest) as tmp:  # an interrupted run leaves an earlier video whole
            writer = cv2.VideoWriter(
                str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), cap.get(cv2.CAP_PROP_FPS) or 30.0, (w, h)
            )
            if not writer.isOpened():
                raise UserError(f"cannot write video {dest}: check --out")
            try:
                records, frames, seconds = run_stream(recognizer, cap, str(video), writer=writer.write, smooth=smooth)
            finally:
                writer.release()
            if frames == 0:
                raise UserError(f"--video {video} has no frames that can be decoded")
    except KeyboardInterrupt:
        raise Interrupted(f"{dest} and its frame table were left as they were") from None
    finally:
        cap.release()
    table = out / f"{video.stem}_frames.csv"
    write_records(records, None, table, recognizer.classes)
    print(f"{video}: {frames} frames, {len(records)} faces, {frames / seconds:.1f} frames/s -> {dest}, {table}")
    return records, summarise(records, recognizer, out / f"{video.stem}_timeline.png", video.name)


def summarise(records, recognizer, timeline, name):
    """Print a line per followed face and draw the timeline PNG; returns the summaries (track_summaries)."""
    summaries = track_summaries(records, recognizer.classes)
    for s in summaries:
        print(s["line"])
    plot_timeline(records, summaries, recognizer.classes, timeline, f"{recognizer.path.name} on {name}")
    print(f"timeline: {timeline}")
    return summaries


def quietly(fn, *args):
    """fn(*args) with OpenCV's own log lines off: a missing camera prints a dozen of them before our one line."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        return fn(*args)
    finally:
        cv2.utils.logging.setLogLevel(level)


def run_camera(recognizer, index, out, smooth=SMOOTH_FRAMES):
    """A live window on camera `index` with boxes, labels and frames per second; q quits. Then, as for a video,
    a line per face and <out>/camera<index>_timeline.png."""
    cap = quietly(cv2.VideoCapture, index)
    if not cap.isOpened():
        raise UserError(f"--camera {index}: no camera found at that index (try 0, or check it is connected)")

    def show(frame):
        cv2.imshow("emotions (q quits)", frame)
        return (cv2.waitKey(1) & 0xFF) != ord("q")

    try:
        records, _, _ = run_stream(recognizer, cap, f"camera {index}", show=show, smooth=smooth)
    except cv2.error:
        raise UserError(
            "--camera needs a display and OpenCV with GUI support: install opencv-python "
            "instead of opencv-python-headless, or record a video and use --video"
        ) from None
    finally:
        cap.release()
        try:
            cv2.destroyAllWindows()
        except cv2.error:
            pass
    return summarise(records, recognizer, out / f"camera{index}_timeline.png", f"camera {index}")


# ---------------------------------------------------------------------------------------------
# Evaluation


def load_eval_data(path, recognizer, ferplus=None):
    """The labelled faces of --eval (fer2013.Labelled), from a FER2013 CSV or a folder of emotion folders, and for a
    folder the counts its note gives.

    Folder images of 48x48 or smaller are face crops; larger ones are photos: their largest face is classified,
    or the whole image where none is found. `ferplus`: fer2013new.csv, whose votes come back for a CSV's faces.
    """
    counts = dict.fromkeys(("photos", "no_face", "several_faces", "crops", "unreadable"), 0)

    def read_face(f):
        try:
            bgr = read_image(f)
        except ImageReadError as e:
            print(f"warning: {f} {e}; skipped", file=sys.stderr)
            counts["unreadable"] += 1
            raise
        gray = to_gray(bgr)
        whole = (0, 0, gray.shape[1], gray.shape[0])
        if max(gray.shape) <= recognizer.size:  # a face crop already
            counts["crops"] += 1
            return crop_face(gray, whole, recognizer.size)
        counts["photos"] += 1
        boxes = recognizer.boxes(bgr)
        counts["no_face"] += not boxes
        counts["several_faces"] += len(boxes) > 1
        if not boxes:
            return crop_face(gray, whole, recognizer.size)
        return recognizer.crop(gray, max(boxes, key=lambda b: b[2] * b[3]))  # the largest face is the photo's subject

    lacks = f"the model {recognizer.path.name} does not know"
    data = load_labelled(
        path, recognizer.classes, flag="--eval", lacks=lacks, ferplus=ferplus, read_face=read_face, progress=False
    )
    if data.paths is None:
        return data, {}
    data.note = (
        f"{counts['photos']} photos: {counts['no_face']} with no face found (classified whole), "
        f"{counts['several_faces']} with more than one (the largest classified); {counts['crops']} face crops; "
        f"{counts['unreadable']} unreadable files skipped"
    )
    return data, counts


def run_eval(recognizer, path, out, json_path, ferplus=None):
    """Score the model on labelled data; print a report, save a confusion-matrix PNG, optionally JSON.

    With `ferplus` (fer2013new.csv for a FER2013 CSV) also against FER+'s ten votes a face (ferplus_scores).
    """
    data, counts = load_eval_data(path, recognizer, ferplus)
    t0 = time.perf_counter()
    probs = recognizer.classify(data.faces)
    seconds = time.perf_counter() - t0
    classes = recognizer.classes
    m = metrics_from_confusion(confusion_matrix(data.labels, probs.argmax(1), len(classes)), classes)
    print(f"{'':>10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}")
    for c, v in m["per_class"].items():
        print(f"{c:>10} {v['precision']:9.4f} {v['recall']:9.4f} {v['f1']:9.4f} {v['support']:9d}")
    name, n = Path(path).name, len(data.labels)
    print(
        f"{name}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on {n} faces "
        f"({n / seconds:.0f} faces/s){'; ' + data.note if data.note else ''}"
    )
    fp = ferplus_scores(probs, data.votes, classes) if data.votes is not None else None
    if fp is not None:
        print(
            f"FER+ majority ({fp['faces']} faces more than half of ten people agree on): accuracy "
            f"{fp['accuracy']:.4f}, macro-F1 {fp['macro_f1']:.4f}; "
            f"against the vote shares of {fp['vote_faces']} faces: KL divergence {fp['kl_divergence']:.3f}, "
            f"total variation {fp['total_variation']:.3f}"
        )
    cm_path, sheet_path = (out / f"{kind}_{name.split('.')[0]}.png" for kind in ("confusion", "mistakes"))
    title = f"{recognizer.path.name} on {name}: recall per class, accuracy {m['accuracy']:.1%}"
    plot_confusion(m["confusion"], classes, cm_path, True, title)
    title = f"{recognizer.path.name} on {name}: the most confident mistakes; a row per true emotion"
    sheet, rows = mistakes_sheet(data.faces, data.labels, probs, classes, title)
    write_image(sheet_path, sheet)
    print(f"confusion matrix: {cm_path}; the mistakes to look at: {sheet_path}")
    shown = []  # what the sheet shows, row by row, for --json
    for k, (picked, _) in enumerate(rows):
        for i in picked:
            where = {"file": str(data.paths[i])} if data.paths else {}
            answer, confidence = classes[int(probs[i].argmax())], float(probs[i].max())
            shown.append({"index": int(i), "true": classes[k], "predicted": answer, "confidence": confidence, **where})
    result = {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "n": n,
        "data": str(path),
        "model": str(recognizer.path),
        "head": recognizer.head,
        "note": data.note,
        **counts,
        "confusion": m["confusion"],
        "per_class": m["per_class"],
        "mistakes": {"sheet": str(sheet_path), "shown": shown},
    }
    if fp is not None:
        result["ferplus"] = fp
    if json_path:
        write_json(result, json_path)
    return result


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Find faces and name each face's emotion, or score the model.")
    add = p.add_argument
    add("inputs", nargs="*", type=Path, help="photos and folders of photos (searched recursively)")
    add("--video", type=Path, metavar="FILE", help="annotate a video file (default: none)")
    add("--camera", type=int, metavar="N", help="live window on camera N; q quits (default: none)")
    ev = "score the model on a FER2013 CSV or a folder of emotion folders: a report, the confusion matrix and the "
    add("--eval", type=Path, metavar="PATH", help=ev + "most confident mistakes as PNGs (default: off)")
    fp = "with --eval of a FER2013 CSV: also score against FER+'s votes for its rows (fer2013new.csv) (default: none)"
    add("--ferplus", type=Path, metavar="FILE", help=fp)
    head = "for a model trained on FER+'s votes, which head answers: ferplus (what most of ten people see) or fer2013 "
    head += "(as FER2013's one label a face) "
    add("--head", help=head + "(default: the model's first, ferplus for the shipped model)")
    out = "folder for annotated images, videos, frame tables, timelines and plots (default: outputs/)"
    add("--out", type=Path, default=REPO_ROOT / "outputs", help=out)
    add(
        "--json", type=Path, metavar="FILE", help="write one record per face (or --eval scores) as JSON (default: none)"
    )
    add("--csv", type=Path, metavar="FILE", help="write one row per face as CSV (default: none)")
    skip = f"photos: skip those an earlier run recorded in <out>/{PROGRESS_FILE}, e.g. after Ctrl-C (default: redo all)"
    add("--skip-done", action="store_true", help=skip)
    add("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: models/Facial_Emotion_Recognizer.pt)")
    p.add_argument(
        "--detector",
        choices=DETECTORS,
        default="retinaface",
        help="face detector: RetinaFace, OpenCV's Haar cascade, or none: each image is one face crop "
        "(default: retinaface)",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=SMOOTH_FRAMES,
        metavar="N",
        help=f"--video/--camera: average each face's answer over N frames; 1 = off (default: {SMOOTH_FRAMES})",
    )
    p.add_argument(
        "--detect-size",
        type=int,
        default=None,
        help=f"longest side of the copy searched for faces; smaller is faster but misses small faces "
        f"(default: {PHOTO_DETECT_SIZE} for photos, {VIDEO_DETECT_SIZE} for --video and --camera)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU threads for classifying (default: {INT8_THREADS} for the int8 copy, 1 for each photo of several "
        f"worked on at once; PyTorch {INFERENCE_THREADS} for photos, --video and --camera, all cores for --eval, "
        "OMP_NUM_THREADS where set)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="int8: classify with the model's int8 copy (<model>.int8.onnx, written by train.py; faster, nearly always "
        "the same answer); pytorch: with the .pt itself; auto: int8 for photos, --video and --camera on a CPU where "
        "the copy was made from this model file, else pytorch, and pytorch for --eval (default: auto)",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="device (default: cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")
    given = sys.argv[1:] if argv is None else argv
    gone = next((f for f in REMOVED_FLAGS if any(g == f or g.startswith(f + "=") for g in given)), None)
    if gone:
        p.error(f"{gone} is gone: {REMOVED_FLAGS[gone]}")
    args = p.parse_args(argv)
    modes = sum([bool(args.inputs), args.video is not None, args.camera is not None, args.eval is not None])
    if modes == 0:
        p.exit(
            2,
            f"{p.prog}: error: name a photo or folder, e.g. python test.py "
            f"{SAMPLE_PHOTO.relative_to(REPO_ROOT)} (or --video, --camera, --eval; --help for all)\n",
        )
    if modes > 1:
        p.error("give photos, --video, --camera or --eval, one at a time")
    if args.smooth < 1:
        p.error("--smooth must be 1 (off) or more frames")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be 1 or more")
    if args.detect_size is None:
        args.detect_size = (
            VIDEO_DETECT_SIZE if (args.video is not None or args.camera is not None) else PHOTO_DETECT_SIZE
        )
    if args.detect_size < 24:
        p.error("--detect-size must be at least 24 (pixels)")
    if args.camera is not None and (args.json or args.csv):
        p.error("--json and --csv go with photos or --video, not --camera")
    if args.eval is not None and args.csv:
        p.error("--csv goes with photos or --video; --eval writes --json")
    if args.ferplus is not None and args.eval is None:
        p.error("--ferplus goes with --eval of a FER2013 CSV")
    return args


def classifier_settings(args):
    """The engine and PyTorch's threads, decided here alone: --eval scores with PyTorch on every core unless
    --engine int8 is asked for, so the figures it reports are the model's own; photos, --video and --camera
    classify with the int8 copy where there is one, PyTorch on INFERENCE_THREADS (OMP_NUM_THREADS where set)."""
    scoring = args.eval is not None
    engine = args.engine
    if scoring and engine == "auto" and args.model.suffix.lower() != ".onnx":
        engine = "pytorch" if has_pytorch() else "int8"
        if engine == "int8":
            print(
                f"note: PyTorch is not installed, so --eval scores the ONNX copy of {args.model.name}, whose answers "
                f"differ from the model's own on a face in a few hundred; for the model's own: {api.PYTORCH_INSTALL}",
                file=sys.stderr,
            )
    threads = args.threads or (None if scoring or "OMP_NUM_THREADS" in os.environ else INFERENCE_THREADS)
    return engine, threads


def main(args):
    check_writable(args.json, "--json", args.out)
    check_writable(args.csv, "--csv", args.out)
    prepare_out_dir(args.out)
    device = args.device
    if device != "cpu":  # the int8 copy runs on the CPU; another device is PyTorch's
        device = (
            "cpu" if device == "auto" and not has_pytorch() else pytorch(f"--device {device}")[0].choose_device(device)
        )
    engine, threads = classifier_settings(args)
    settings = {"detector": args.detector, "detect_size": args.detect_size, "engine": engine, "head": args.head}
    settings["bf16"] = args.eval is None  # a figure is scored in float32 (network.predict_both)
    photos, skipped = expand_inputs(args.inputs) if args.inputs else ([], 0)
    if skipped:
        print(f"skipped {skipped} files that are not images ({', '.join(IMAGE_EXTENSIONS)})")
    if args.inputs and not photos:
        raise UserError(f"no images found in {', '.join(map(str, args.inputs))}")
    # A thread each for the detector and the int8 copy then, where one detector may serve several threads.
    workers = max(1, min(PHOTO_WORKERS if detector_class(args.detector).shareable else 1, len(photos)))
    settings.update(threads=args.threads or (1 if workers > 1 else None), detect_threads=1 if workers > 1 else None)
    recognizer = Recognizer(args.model, device, **settings)
    if recognizer.model is not None and threads:  # PyTorch answers: its threads (the int8 copy has its own)
        import torch  # here: only where PyTorch answers (loaded already, by the model)

        torch.set_num_threads(threads)
    if args.eval is not None:
        return run_eval(recognizer, args.eval, args.out, args.json, args.ferplus)
    if args.camera is not None:
        return run_camera(recognizer, args.camera, args.out, args.smooth)
    summaries = None
    if args.video is not None:
        (records, summaries), failed, total = run_video(recognizer, args.video, args.out, args.smooth), 0, 1
    else:
        records, failed = run_photos(recognizer, photos, args.out, args.skip_done, workers)
        total = len(photos)
        n_faces = sum(r["box"] is not None for r in records)
        if failed < total:
            print(f"{total - failed} photos, {n_faces} faces; annotated copies in {args.out}")
    write_records(records, args.json, args.csv, recognizer.classes, summaries)
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    if failed:
        if failed == total:
            none = "the photo could not" if total == 1 else f"none of the {total} photos could"
            raise UserError(f"{none} be read (named above)")
        raise UserError(f"{failed} of {total} photos could not be read (named above); the others were annotated")
    return records


if __name__ == "__main__":
    run_main(main, parse_args())
