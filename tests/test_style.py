"""The rules a reader relies on: scripts import only the shared modules, imports sit at the top (a lazy one says
why), and one line length for all (ruff, configured in ruff.toml)."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ("preparation.py", "train.py", "test.py")
SHARED = ("common.py", "network.py", "detection.py")


@pytest.mark.parametrize("name", SCRIPTS + SHARED)
def test_no_script_imports_another(name):
    text = (ROOT / name).read_text()
    assert not re.findall(r"^\s*(?:from|import) (?:train|test|preparation|benchmark)\b", text, re.M), name


@pytest.mark.parametrize("name", SCRIPTS + SHARED + ("benchmark.py",))
def test_imports_inside_functions_say_why(name):
    lines = (ROOT / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s+(from \S+ )?import ", line):
            said = any("#" in above for above in lines[max(0, i - 3) : i + 1])
            assert said, f"{name}:{i + 1}: an import inside a function needs a comment saying why: {line.strip()}"


def test_readme_states_the_import_rule():
    layout = (ROOT / "README.md").read_text().split("## Layout")[1]
    assert "imports only `common.py`, `network.py`, `detection.py` and libraries" in layout


def test_ruff_is_clean():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
