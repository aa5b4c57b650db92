"""Every command the README shows is run here, as written, in a fresh copy of the project with small data.

Only what names the user's own files is filled in (a tiny FER2013 CSV at data/fer2013.csv and FER+'s votes for
it at data/fer2013new.csv, photo.jpg, clip.mp4, the run folder train.py made); training commands get `--epochs 2`
where they name no schedule. Commands that cannot run here are listed in ELSEWHERE with the test or reason that
covers them, and every README command must be one or the other.
"""

import re
import shutil
import subprocess
import sys

import cv2
from conftest import ROOT, synthetic_faces, write_csv, write_ferplus
from test_testpy_inputs import SAMPLE, make_video

README = ROOT / "README.md"
ELSEWHERE = {
    "python3 -m venv": ".ci/run runs both set-up commands, each in its own env (test_ci_runs_the_readme_commands)",
    "pip install": ".ci/run installs both requirements files; the CPU-only index is out of reach here",
    "python -m pytest": "this suite itself, run by .ci/run (test_ci_runs_the_readme_commands)",
    "torchrun": "tests/test_distributed.py runs train.py under torchrun with two CPU processes",
    "python SCRIPT.py --help": "tests/test_first_hour.py runs --help of every script",
}


def readme_commands():
    """Each `python ...` / `torchrun ...` / `pip ...` command of the README, in order (code blocks and inline)."""
    text = README.read_text()
    found = []
    for block, inline in re.findall(r"```bash\n(.*?)```|`([^`\n]+)`", text, re.S):
        for line in block.splitlines() if block else [inline]:
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if re.match(r"(python3?|torchrun|pip) ", part) and part not in found:
                    found.append(part)
    return found


def fresh_copy(tmp):
    """The project as a clone has it (no runs, outputs or data), plus a user's small files."""
    root = tmp / "project"
    shutil.copytree(
        ROOT,
        root,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "tests",
            "outputs",
            "runs",
            "face_datasets",
            "__pycache__",
            ".pytest_cache",
            "*.csv",
            "*.csv.gz",
        ),
    )
    faces, labels = synthetic_faces(42)
    usage = ["Training"] * 28 + ["PublicTest"] * 7 + ["PrivateTest"] * 7
    write_csv(root / "data" / "fer2013.csv", faces, labels, layout="orig", usage=usage)
    write_ferplus(root / "data" / "fer2013new.csv", labels, usage)
    shutil.copy(SAMPLE, root / "photo.jpg")
    for folder in ("more_photos", "photos"):
        (root / folder).mkdir()
        shutil.copy(SAMPLE, root / folder / "p.jpg")
    (root / "crops").mkdir()
    cv2.imwrite(str(root / "crops" / "face.png"), faces[0])
    make_video(root / "clip.mp4", frames=4)
    return root


def newest_run(root):
    runs = sorted((root / "runs").iterdir())
    return runs[-1].relative_to(root).as_posix()


def test_every_readme_command_runs(tmp_path):
    root = fresh_copy(tmp_path)
    ran, covered = [], []
    for cmd in readme_commands():
        if any(cmd.startswith(k) for k in ELSEWHERE) or cmd in ELSEWHERE:
            covered.append(cmd)
            continue
        assert cmd.startswith("python "), f"README command neither run here nor covered elsewhere: {cmd}"
        args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', cmd)][1:]
        if "<date-time>" in cmd:
            args = [a.replace("runs/<date-time>", newest_run(root)) for a in args]
        if args[0] == "train.py" and not {"--epochs", "--resume"} & set(args):
            args += ["--epochs", "2"]
        expect_fail = "--camera" in args  # no camera on a test machine: the clear one-line error is the answer
        r = subprocess.run(
            [sys.executable, *args, "--no-progress"]
            if args[0] in ("train.py", "preparation.py")
            else [sys.executable, *args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if expect_fail:
            assert r.returncode == 1 and "no camera found" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
        else:
            assert r.returncode == 0, f"README command failed: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        ran.append(cmd)
    assert len(ran) >= 12 and covered, (ran, covered)
    assert (root / "outputs" / "clip_emotions.mp4").exists() and (root / "faces.json").exists()
    assert (root / "outputs" / "clip_timeline.png").stat().st_size and list((root / "outputs").glob("mistakes_*.png"))
    assert (root / "face_datasets" / "Final test data").is_dir()
    assert list((root / "models").glob("Facial_Emotion_Recognizer.*.bak.pt")), "--replace keeps the old model"


def test_ci_runs_the_readme_commands():
    """.ci/run runs the README's two set-up commands, each in an environment of its own: the light install (no
    PyTorch) annotating the sample photo, then the full install running the tests."""
    ci = (ROOT / ".ci" / "run").read_text()
    text = README.read_text().split("## On a fresh machine")[1].split("\n## ")[0]
    light, full = re.findall(r"```bash\n(python3 -m venv [^\n]*)\n```", text)[:2]
    assert "pip install -r requirements.txt && python test.py samples/grace_hopper.jpg" in light
    assert "pip install -r requirements-full.txt && python -m pytest -q -rs tests" in full
    light_part, full_part = ci.split("pip install -q -r requirements.txt\n")[1], ci.split("requirements-full.txt\n")[-1]
    assert "python test.py samples/grace_hopper.jpg" in light_part.split("python3 -m venv")[0]
    assert "python -m pytest -q -rs tests" in full_part
    assert ci.count("python3 -m venv") == 2 and "import torch" in light_part  # the light one is checked to lack it
    assert "torch" not in (ROOT / "requirements.txt").read_text().replace("PyTorch", "")


def test_the_readme_python_example_runs(tmp_path):
    """The README's Python lines, as written, in a fresh copy of the project where PyTorch cannot be imported (the
    light install), with a short clip.mp4 in the project folder."""
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    root = fresh_copy(tmp_path)
    make_video(root / "clip.mp4", frames=3)
    no_torch = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None\n"
    r = subprocess.run([sys.executable, "-c", no_torch + code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("[(1, ") == 3, r.stdout  # one face, followed as id 1 through the three frames
