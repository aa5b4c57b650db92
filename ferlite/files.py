"""Where the project lives, and files written whole or not at all."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # ferlite/ sits in the project folder


def project_relative(path):
    """`path` as written into a checkpoint or JSON: relative to the project when inside it, else its name.

    A model file travels between machines; the build machine's absolute paths mean nothing elsewhere.
    """
    p = Path(path)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return p.name


def beside_model(model_path, suffix):
    """The file that goes with model file `X.pt`: `X` + `suffix` in the same folder (`X.last.pt`, `X.metrics.json`)."""
    p = Path(model_path)
    return p.with_name((p.name[:-3] if p.name.endswith(".pt") else p.name) + suffix)


@contextlib.contextmanager
def atomic_write(dest, backup=None):
    """A temporary path beside `dest` (the same extension, so writers pick the format), renamed onto it on success.

    An interrupted or failed write leaves the earlier `dest` as it was and no temporary file behind; with `backup`
    (a path) the earlier `dest` is also copied there before it is replaced. The file gets the usual permissions
    (umask), not mkstemp's owner-only ones: a model file is for everyone who can read the folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial{dest.suffix}", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        if backup is not None and dest.exists():
            shutil.copy2(dest, backup)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path, indent=2):
    """`obj` as JSON to `path` through atomic_write."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
