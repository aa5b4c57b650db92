"""Measure training and inference speed on this machine (a benchmark to rerun, not a test).

    python benchmark.py                 # medians of 5 runs each
    python benchmark.py --runs 9 --model models/Facial_Emotion_Recognizer.pt
    python benchmark.py --markdown models/benchmark.json   # the README's speed table from saved figures
    python benchmark.py --cold-start .venv/bin/python light/bin/python --sizes .venv light   # the whole process

Prints, as medians of --runs runs: training images/s in float32 and bfloat16 (one optimiser step
on a batch of synthetic faces, augmentation included), inference faces/s one at a time and in
batches, test.py's work on one photo (detection and classification apart), and how close
training runs to the CPU's limit: training FLOPs per image times images/s over a large bfloat16
matmul's FLOP/s, measured in the same run. Then test.py's photos/s on a folder of --photos generated
photos, one at a time and on its workers, side by side (the whole folder once each, not medians).

With --cold-start, only the whole process a user starts: `python test.py --photo` from the shell, once per
interpreter named (a light and a full install's, say), --runs times each in turn, side by side: median wall time
and median peak memory (the process's maximum resident set). With --sizes, each virtual environment's size on disk.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

try:  # the full install's (requirements-full.txt): the benchmark times training and PyTorch beside the ONNX copy
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
except ImportError as e:
    if "torch" not in str(e):
        raise
    sys.exit("error: benchmark.py needs PyTorch, which this install lacks: pip install -r requirements-full.txt")

from ferlite.detection import VIDEO_DETECT_SIZE, letterbox
from ferlite.drawing import annotate
from ferlite.errors import UserError, run_main
from ferlite.fer2013 import read_csv
from ferlite.files import REPO_ROOT, write_json
from ferlite.images import read_image
from ferlite.tracking import FaceTracker, SteadyRoll
from ferlite.training.checkpoints import load_checkpoint
from ferlite.training.network import build_model, cpu_has_bf16, model_from_checkpoint, predict_proba, to_input


def load_script(name):
    """One of the project's scripts, loaded by path: a tool measures what they do without being one of them
    (and `import test` would find Python's own package)."""
    spec = importlib.util.spec_from_file_location(f"fer_{name}", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(fn, runs, warmup=2):
    """Median seconds of `fn()` over `runs` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_fn(model, batch, bf16, device, augment):
    """One augmented training step on a synthetic batch, as train.py does it (`augment` is train.py's)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    faces = torch.randint(0, 256, (batch, 48, 48), dtype=torch.uint8)
    y = torch.randint(0, 7, (batch,))
    gen = torch.Generator().manual_seed(0)

    def step():
        x = augment(to_input(faces), gen).contiguous(memory_format=torch.channels_last)
        # bfloat16 even where the CPU emulates it (train.py then stays in float32): the row shows what it would cost
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(x)  # a two-head model in training mode answers with each head: one loss each, added
            heads = logits if isinstance(logits, tuple) else (logits,)
            loss = sum(F.cross_entropy(h.float(), y) for h in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@contextlib.contextmanager
def busy_core():
    """A second process spinning on one core for the duration."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def csv_rows_per_second(rows, runs):
    """Rows/s of common.read_csv on a generated Kaggle-layout CSV of `rows` rows (median of `runs` reads)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fer2013.csv"
        with open(path, "w") as f:
            f.write("emotion,pixels,Usage\n")
            for i in range(rows):
                pixels = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
                f.write(f"{i % 7},{pixels},{'Training' if i % 9 else 'PublicTest'}\n")
        return rows / median_time(lambda: read_csv(path, progress=False), max(1, runs // 2), warmup=0)


# Photos as folders hold them, cycled: a web-sized copy, a 3 MP export and a 12 MP phone or camera original.
PHOTO_SIZES = ((1280, 960), (2048, 1536), (4032, 3024))


def make_photos(folder, n, sample):
    """`n` JPEGs in `folder`: the sample photo's face on a blurred copy of itself, at each of PHOTO_SIZES in turn
    (hard links of three files where the file system allows: the bytes are the same, the work on them too)."""
    src = cv2.imread(str(sample))
    made = []
    for i, (w, h) in enumerate(PHOTO_SIZES):
        canvas = cv2.resize(cv2.GaussianBlur(src, (0, 0), 8), (w, h))
        face = cv2.resize(src, (h * src.shape[1] // src.shape[0] // 2, h // 2))
        canvas[h // 4 : h // 4 + face.shape[0], w // 3 : w // 3 + face.shape[1]] = face
        cv2.imwrite(str(path := folder / f"size{i}.jpg"), canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
        made.append(path)
    photos = []
    for k in range(n):
        photos.append(dest := folder / f"photo{k:04d}.jpg")
        try:
            dest.hardlink_to(made[k % len(made)])
        except OSError:
            shutil.copyfile(made[k % len(made)], dest)
    return photos


def photos_per_second(testpy, model, n, sample, block=100):
    """test.py's photos/s on `n` photos (make_photos) one at a time, as before the pool, and on its workers
    (PHOTO_WORKERS, a detector and int8 thread each), as test.py runs them: side by side, the two taking turns
    on blocks of `block` photos (first one, then the other) so that both see the same machine."""
    device, workers = torch.device("cpu"), min(testpy.PHOTO_WORKERS, n)
    one = testpy.Recognizer(model, device)
    pool = testpy.Recognizer(model, device, threads=1, detect_threads=1)
    seconds = {1: 0.0, workers: 0.0} if workers > 1 else {1: 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp), n, sample)
        for k in range(0, n, block):
            order = list(seconds) if (k // block) % 2 == 0 else list(seconds)[::-1]
            for w in order:
                (out := Path(tmp) / f"out{w}").mkdir()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    t = time.perf_counter()
                    testpy.run_photos(one if w == 1 else pool, photos[k : k + block], out, workers=w)
                    seconds[w] += time.perf_counter() - t
                shutil.rmtree(out)
    return {w: n / s for w, s in seconds.items()}, workers


def training_flops_per_image(model, batch=32):
    """Forward plus backward FLOPs per image, counted by torch.utils.flop_counter."""
    x = torch.randn(batch, 1, 48, 48)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()  # every head, as training
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_flops(bf16, runs, n=2048):
    """FLOP/s of a large n x n matmul in bfloat16 (or float32)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, runs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training and inference speed on this machine.")
    p.add_argument(
        "--model",
        type=Path,
        default=REPO_ROOT / "models" / "Facial_Emotion_Recognizer.pt",
        help="model file whose architecture is measured (default: the shipped model)",
    )
    p.add_argument(
        "--photo",
        type=Path,
        default=REPO_ROOT / "samples" / "grace_hopper.jpg",
        help="photo for the test.py latency (default: samples/grace_hopper.jpg)",
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (default: 5)")
    p.add_argument(
        "--csv-rows", type=int, default=32298, help="rows of the generated CSV whose reading is timed (default: 32298)"
    )
    p.add_argument(
        "--batch-size", type=int, default=128, help="training batch (default: 128; inference batches as test.py does)"
    )
    p.add_argument(
        "--photos",
        type=int,
        default=1000,
        help="photos (generated) whose test.py photos/s is timed, one at a time and on its workers; 0 skips "
        "(default: 1000)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file (default: none)")
    p.add_argument(
        "--cold-start",
        nargs="+",
        metavar="PYTHON",
        help="time `PYTHON test.py --photo` as a whole process, for each interpreter named (default: off)",
    )
    p.add_argument("--project", type=Path, default=REPO_ROOT, help="--cold-start: whose test.py (default: this one)")
    p.add_argument("--sizes", nargs="+", type=Path, metavar="VENV", help="size on disk of each venv (default: none)")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the README's speed table from a JSON this script wrote, measuring nothing",
    )
    return p.parse_args(argv)


def read_figures(path):
    """The figures a --json run wrote, or a UserError naming the file."""
    try:
        figures = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--markdown {path} not found: pass the file a benchmark.py --json run wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--markdown {path} is not a JSON file benchmark.py wrote ({type(e).__name__})") from None
    if not isinstance(figures, dict):
        raise UserError(f"--markdown {path} is not a JSON file benchmark.py wrote (not an object)")
    return figures


def markdown_table(r):
    """The README's speed table from benchmark figures (a dict as --json writes it)."""
    ratio = r["train_img_s_bf16"] / r["train_img_s_fp32"]
    used = r["train_flops_per_image"] * r["train_img_s_bf16"]
    rows = [
        ("training, float32", f"{r['train_img_s_fp32']:,.0f} images/s"),
        (
            "training, bfloat16 autocast + channels_last",
            f"{r['train_img_s_bf16']:,.0f} images/s ({ratio:.1f}x float32)",
        ),
        (
            "training FLOPs in use",
            f"{r['train_flops_per_image'] / 1e9:.2f} GFLOP/image x {r['train_img_s_bf16']:,.0f} "
            f"images/s = {used / 1e12:.2f} TFLOP/s, {r['utilisation']:.0%} of a large bfloat16 "
            f"matmul on the same cores ({r['matmul_flops_bf16'] / 1e12:.2f} TFLOP/s; float32 "
            f"{r['matmul_flops_fp32'] / 1e12:.2f})",
        ),
        (
            f"inference, one face at a time, as `test.py` ({r['engine']} copy, {r['int8_threads']} threads)",
            f"{r['infer_one_face_s']:,.0f} faces/s (1 thread: {r['infer_one_face_int8_1_thread_s']:,.0f}); "
            f"PyTorch, test.py's path before, {r['infer_one_face_pytorch_s']:,.0f} on 1 thread "
            f"({r['threads']}: {r['infer_one_face_pytorch_all_cores_s']:,.0f}): "
            f"{r['infer_one_face_s'] / r['infer_one_face_pytorch_s']:.1f}x",
        ),
        (
            "the same with another program busy on one core",
            f"{r['busy_one_face_s']:,.0f} faces/s (1 thread: {r['busy_one_face_int8_1_thread_s']:,.0f}); "
            f"PyTorch {r['busy_one_face_pytorch_s']:,.0f} on 1 thread "
            f"({r['threads']}: {r['busy_one_face_pytorch_all_cores_s']:,.0f})",
        ),
        (
            "inference, batched, as `test.py --eval` (PyTorch, each face and its mirror image)",
            f"{r['infer_batched_faces_s']:,.0f} faces/s",
        ),
        ("inference, batched, one pass per face (PyTorch)", f"{r['infer_batched_no_tta_faces_s']:,.0f} faces/s"),
        (
            f"inference, batched, {r['engine']} copy ({r['int8_threads']} threads, each face and its mirror image)",
            f"{r['infer_batched_int8_faces_s']:,.0f} faces/s",
        ),
        (
            "test.py on the sample photo",
            f"detection {r['photo_detect_ms']:.0f} ms, classification {r['photo_classify_ms']:.1f} ms",
        ),
        (
            "video, 640x480 frames, as `test.py` (RetinaFace at 640 px, tracking, drawing)",
            f"{r['video_640x480_fps']:.0f} frames/s",
        ),
        ("the same with another program busy on one core", f"{r['busy_video_640x480_fps']:.0f} frames/s"),
        (f"reading a FER2013 CSV ({r['csv_rows']:,} rows, generated)", f"{r['csv_rows_s']:,.0f} rows/s"),
    ]
    if "photos_s_pool" in r:  # recorded since test.py works on photos in a pool
        sizes = ", ".join(f"{w}x{h}" for w, h in PHOTO_SIZES)
        rows.insert(-1, (
            f"`test.py` on a folder of {r['photos']:,} photos ({sizes} in turn)",
            f"{r['photos_s_pool']:.1f} photos/s on {r['photo_workers']} workers; one at a time, as before, "
            f"{r['photos_s_one']:.1f}: {r['photos_s_pool'] / r['photos_s_one']:.2f}x",
        ))  # fmt: skip
    if "cpu" in r:  # figures from before it was recorded say their machine in RESULTS.md's text
        rows.insert(0, ("machine", f"{r['cpu']}, {r['threads']} threads, bfloat16 {bf16_kind(r['bf16_supported'])}"))
    return "\n".join(["| | |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])


def bf16_kind(native):
    """How this CPU runs bfloat16, as the figures record it."""
    return "native" if native else "emulated (train.py uses float32)"


def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform says), for the figures' record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# Times one whole process and reads its peak memory from a small Python of its own: a child forked from this
# process (PyTorch loaded, hundreds of MB) would count this process's pages as its own peak, since Linux keeps the
# peak across exec.
LAUNCHER = """import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def process_run(cmd, cwd):
    """(wall seconds, peak resident memory in MB) of one whole process `cmd`, its output discarded."""
    r = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, *map(str, cmd)], cwd=cwd, capture_output=True, text=True, check=False
    )
    try:
        wall, kb, code = r.stdout.split()[-3:]
    except ValueError:
        code = "?"
    if r.returncode or code != "0":
        raise UserError(f"{' '.join(map(str, cmd))} failed (exit {code}): {r.stderr.strip()[-300:]}")
    return float(wall), int(kb) / 1024


def venv_mb(path):
    """Megabytes of the files under `path` (a virtual environment), links not followed."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--sizes {path} is not a folder: name a virtual environment")
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def cold_start(args):
    """--cold-start and --sizes: the whole process of test.py on one photo per interpreter, side by side."""
    results = {}
    for venv in args.sizes or []:
        results[f"size_mb {venv}"] = venv_mb(venv)
        print(f"{venv}: {results[f'size_mb {venv}']:,.0f} MB on disk")
    pythons = args.cold_start or []
    with tempfile.TemporaryDirectory() as tmp:
        # the interpreter's path as given, made absolute (a venv's python is a link that must not be resolved)
        cmds = {py: [os.path.abspath(py), "test.py", str(args.photo.resolve()), "--out", tmp] for py in pythons}
        for cmd in cmds.values():
            process_run(cmd, args.project)  # once untimed: files into the page cache, as for a user's second run
        times = {py: [] for py in pythons}
        for _ in range(args.runs):
            for py, cmd in cmds.items():  # in turn, so a noisy minute falls on every interpreter alike
                times[py].append(process_run(cmd, args.project))
    for py, runs in times.items():
        wall, peak = statistics.median(w for w, _ in runs), statistics.median(m for _, m in runs)
        results[f"cold_start {py}"] = {"wall_s": wall, "peak_mb": peak, "runs": runs}
        print(f"{py} test.py {args.photo.name} ({args.project}): wall {wall:.2f} s, peak memory {peak:.0f} MB "
              f"(medians of {len(runs)})")  # fmt: skip
    if args.json:
        write_json(results, args.json)
    return results


def main(args):
    if args.cold_start or args.sizes:
        return cold_start(args)
    if args.markdown:
        try:
            print(markdown_table(read_figures(args.markdown)))
        except KeyError as e:
            raise UserError(
                f"--markdown {args.markdown} lacks {e}: rerun python benchmark.py --json {args.markdown}"
            ) from None
        return None
    device = torch.device("cpu")
    train, testpy = load_script("train"), load_script("test")
    ckpt = load_checkpoint(args.model)
    results = {"threads": torch.get_num_threads(), "bf16_supported": cpu_has_bf16(), "cpu": cpu_name()}
    print(
        f"{ckpt['arch']} {ckpt['arch_args']}, {torch.get_num_threads()} threads, "
        f"bf16 {bf16_kind(results['bf16_supported'])}; {results['cpu']}; medians of {args.runs} runs"
    )

    # What train.py trains: an ensemble (tools/ensemble.py) is its members, each trained by its own run.
    trained = ckpt["arch_args"]["members"][0] if ckpt["arch"] == "Ensemble" else ckpt
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build_model(trained["arch"], trained["arch_args"], len(ckpt["class_names"])).to(
            memory_format=torch.channels_last
        )
        model.train()
        s = median_time(train_step_fn(model, args.batch_size, bf16, device, train.augment), args.runs)
        key = "bf16" if bf16 else "fp32"
        results[f"train_img_s_{key}"] = args.batch_size / s
        print(f"training {key}: {args.batch_size / s:8.0f} images/s  (batch {args.batch_size})")

    model = model_from_checkpoint(ckpt, device)
    faces = np.random.default_rng(0).integers(0, 256, (1024, 48, 48), dtype=np.uint8)
    one = faces[:1]
    cores = torch.get_num_threads()

    def with_threads(n, fn):
        """`fn()` with PyTorch on `n` threads (test.py's photos and video use INFERENCE_THREADS); an int8
        copy loaded inside takes as many."""
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(cores)

    # As test.py classifies photos and video: the int8 copy where it is fresh (else PyTorch on one thread); beside
    # it the copy on one thread, and PyTorch itself, test.py's path before the copy, on one thread and on all.
    rec = with_threads(testpy.INFERENCE_THREADS, lambda: testpy.Recognizer(args.model, device))
    rec_1 = testpy.Recognizer(args.model, device, threads=1)
    rec_pt = testpy.Recognizer(args.model, device, engine="pytorch")
    results["engine"] = "int8" if rec.int8 is not None else "pytorch"
    results["int8_threads"] = rec.int8.threads if rec.int8 is not None else 0
    # PyTorch on all cores goes first: its OpenMP threads keep spinning a while after a call, which slowed the
    # int8 copy's second thread when it came next.
    one_face_paths = (
        (rec_pt, cores),
        (rec_pt, testpy.INFERENCE_THREADS),
        (rec_1, testpy.INFERENCE_THREADS),
        (rec, testpy.INFERENCE_THREADS),
    )

    def one_face(runs):
        """Seconds for one face on each of one_face_paths, timed alternately so all see the same machine."""
        times = [[] for _ in one_face_paths]
        for _ in range(runs):
            for (r, n), t in zip(one_face_paths, times):
                t.append(with_threads(n, lambda r=r: median_time(lambda: r.classify(one), 20, warmup=2)))
        pt_all, pt, int8_1, path = (statistics.median(t) for t in times)
        return path, int8_1, pt, pt_all

    s1, s1_one, s1_pt, s1_pt_all = one_face(args.runs * 2)
    sb = median_time(lambda: predict_proba(model, faces, device, bf16=True), args.runs)  # as photos classify
    sn = median_time(lambda: predict_proba(model, faces, device, tta=False, bf16=True), args.runs)
    si = median_time(lambda: rec.classify(faces), args.runs)
    results.update(
        infer_one_face_s=1 / s1,
        infer_one_face_int8_1_thread_s=1 / s1_one,
        infer_one_face_pytorch_s=1 / s1_pt,
        infer_one_face_pytorch_all_cores_s=1 / s1_pt_all,
        infer_batched_faces_s=len(faces) / sb,
        infer_batched_no_tta_faces_s=len(faces) / sn,
        infer_batched_int8_faces_s=len(faces) / si,
    )
    print(
        f"inference, one face at a time, as test.py ({results['engine']}): {1 / s1:8.0f} faces/s "
        f"(int8 on 1 thread {1 / s1_one:.0f}); PyTorch {1 / s1_pt:.0f} on {testpy.INFERENCE_THREADS} thread, "
        f"{1 / s1_pt_all:.0f} on {cores}: {s1_pt / s1:.1f}x\n"
        f"batched, PyTorch as test.py --eval: {len(faces) / sb:8.0f} faces/s (with the mirror image), "
        f"without it {len(faces) / sn:8.0f}; {results['engine']} with the mirror image {len(faces) / si:8.0f}"
    )

    bgr = read_image(args.photo)
    boxes = rec.boxes(bgr)
    sd = median_time(lambda: rec.boxes(bgr), args.runs)
    gray = testpy.to_gray(bgr)
    crops = np.stack([rec.crop(gray, b) for b in boxes]) if boxes else faces[:1]
    sc = with_threads(testpy.INFERENCE_THREADS, lambda: median_time(lambda: rec.classify(crops), args.runs))
    results.update(photo_detect_ms=sd * 1e3, photo_classify_ms=sc * 1e3, photo_faces=len(boxes))
    print(
        f"test.py on {args.photo.name} ({bgr.shape[1]}x{bgr.shape[0]}, {len(boxes)} faces, {rec.detector_name}): "
        f"detection {sd * 1e3:.1f} ms, classification {sc * 1e3:.1f} ms"
    )

    video = with_threads(  # as test.py --video and --camera
        testpy.INFERENCE_THREADS, lambda: testpy.Recognizer(args.model, device, detect_size=VIDEO_DETECT_SIZE)
    )
    frame = letterbox(bgr, 640, 480)  # the photo as a 640x480 video frame
    tracker, steady = FaceTracker(video.classes), SteadyRoll()

    def video_frame(runs):
        def one_frame():
            return annotate(frame, tracker.update(video.faces_in(frame, steady.rolls), frame))

        return with_threads(testpy.INFERENCE_THREADS, lambda: median_time(one_frame, runs))

    sv = video_frame(args.runs * 4)
    results.update(video_640x480_fps=1 / sv, video_faces=len(video.faces_in(frame)))
    print(
        f"video, 640x480 frame ({results['video_faces']} faces, detection at {VIDEO_DETECT_SIZE} px): "
        f"{1 / sv:.1f} frames/s (detection, classification, tracking, drawing)"
    )

    with busy_core():  # another program holds one of the cores, as on a user's busy machine
        b1, b1_one, b1_pt, b1_pt_all = one_face(args.runs * 2)
        bv = video_frame(args.runs * 4)
    results.update(
        busy_one_face_s=1 / b1,
        busy_one_face_int8_1_thread_s=1 / b1_one,
        busy_one_face_pytorch_s=1 / b1_pt,
        busy_one_face_pytorch_all_cores_s=1 / b1_pt_all,
        busy_video_640x480_fps=1 / bv,
    )
    print(
        f"with one core busy: one face {1 / b1:.0f} faces/s (int8 on 1 thread {1 / b1_one:.0f}; PyTorch "
        f"{1 / b1_pt:.0f}, on {cores} threads {1 / b1_pt_all:.0f}), video {1 / bv:.1f} frames/s"
    )

    if args.photos > 0:
        rates, workers = photos_per_second(testpy, args.model, args.photos, args.photo)
        results.update(photos=args.photos, photo_workers=workers, photos_s_one=rates[1], photos_s_pool=rates[workers])
        print(
            f"test.py on {args.photos} photos ({', '.join(f'{w}x{h}' for w, h in PHOTO_SIZES)} in turn): "
            f"{rates[1]:.1f} photos/s one at a time, {rates[workers]:.1f} on {workers} workers: "
            f"{rates[workers] / rates[1]:.2f}x"
        )

    rows = csv_rows_per_second(args.csv_rows, args.runs)
    results.update(csv_rows=args.csv_rows, csv_rows_s=rows)
    print(f"reading a FER2013 CSV of {args.csv_rows:,} rows: {rows:,.0f} rows/s")

    flops = training_flops_per_image(build_model(trained["arch"], trained["arch_args"], len(ckpt["class_names"])))
    peak = matmul_flops(True, args.runs)
    peak32 = matmul_flops(False, args.runs)
    used = flops * results["train_img_s_bf16"]
    results.update(
        train_flops_per_image=flops, matmul_flops_bf16=peak, matmul_flops_fp32=peak32, utilisation=used / peak
    )
    print(
        f"training: {flops / 1e9:.2f} GFLOP/image x {results['train_img_s_bf16']:.0f} images/s"
        f" = {used / 1e12:.2f} TFLOP/s;"
        f" bf16 matmul {peak / 1e12:.2f} TFLOP/s (fp32 {peak32 / 1e12:.2f}): {used / peak:.0%} of the CPU's bf16 limit"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "runs": args.runs, **results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    run_main(main, parse_args())
