"""The rules a reader relies on: scripts import only the shared modules, imports sit at the top (a lazy one says
why), and one line length for all (ruff, configured in ruff.toml)."""

import ast
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ("preparation.py", "train.py", "test.py")
SHARED = tuple(sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "ferlite").rglob("*.py")))


@pytest.mark.parametrize("name", SCRIPTS + SHARED)
def test_no_script_imports_another(name):
    text = (ROOT / name).read_text()
    assert not re.findall(r"^\s*(?:from|import) (?:train|test|preparation|benchmark)\b", text, re.M), name


def unexplained_lazy_imports(source):
    """Line numbers of functions' first imports that no comment explains: on the import's line, or in the comment
    lines right above it, a reason (a slow or optional piece, needed only here) must be given."""
    lines = source.splitlines()
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if not imports:
            continue
        first = min(n.lineno for n in imports)
        said = [lines[first - 1].partition("#")[2]]
        above = first - 2
        while above >= 0 and lines[above].strip().startswith("#"):
            said.append(lines[above])
            above -= 1
        if not re.search(r"\b(here|only|slow|optional)\b", " ".join(said), re.I):
            bad.append(first)
    return bad


def test_the_lazy_import_check_can_fail():
    assert unexplained_lazy_imports("def f():\n    x = 1  # a note\n    import json\n") == [3]
    assert unexplained_lazy_imports("def f():\n    # slow to import, only f needs it\n    import json\n") == []
    assert unexplained_lazy_imports("def f():\n    import json  # here: optional\n    import csv\n") == []


@pytest.mark.parametrize("name", SCRIPTS + SHARED + ("benchmark.py",))
def test_imports_inside_functions_say_why(name):
    bad = unexplained_lazy_imports((ROOT / name).read_text())
    assert not bad, f"{name}:{bad[0]}: an import inside a function needs a comment saying why"


def test_readme_states_the_import_rule():
    layout = (ROOT / "README.md").read_text().split("## Layout")[1]
    assert "imports only the `ferlite` package and libraries" in layout


@pytest.mark.parametrize("command", [["check", "--no-cache"], ["format", "--check", "--no-cache"]])
def test_ruff_is_clean(command):
    """ruff.toml's one line length and one format: `ruff check` and `ruff format --check` find nothing."""
    r = subprocess.run([sys.executable, "-m", "ruff", *command, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
