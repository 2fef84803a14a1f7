"""Nothing in the repository reads outside it, so a fresh clone in a folder with no neighbours
passes its tests: a scan of every tracked text file for paths that climb out of the repo or name
a machine's folders, and of the Python sources for `dirname(... __file__)` / `Path(__file__)`
chains that go above the repository root.
"""
import ast
import os
import re
import subprocess

from tests.conftest import REPO

# What a path out of the repo looks like in source text. (Written so that this file's own
# patterns do not match themselves.)
CLIMBING = [
    (re.compile(r"\.\.[/\\]+shared"), "the project's neighbouring shared folder"),
    (re.compile(r"\bos\.pardir\b"), "os dot pardir (climbs a folder)"),
    (re.compile(r"dirname\(\s*REPO\s*\)"), "the folder above the repository"),
    (re.compile(r"(?<![\w.:/~-])/(work|home|root|Users|mnt|scratch)/"),
     "a machine's absolute path"),
]
TEXT_SUFFIXES = (".py", ".sh", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".json",
                 ".tsv", ".gitignore", "run")


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):     # an exported tree without .git
        skip = {".git", ".venv", "__pycache__", "outputs", ".pytest_cache"}
        files = [os.path.relpath(os.path.join(d, f), REPO)
                 for d, dirs, names in os.walk(REPO)
                 for f in names if not dirs.__setitem__(slice(None),
                                                        [x for x in dirs if x not in skip])]
    # benchmarks/results/ records the commands of runs on other machines (their --out folder):
    # nothing reads those paths.
    return sorted(f for f in files if f.endswith(TEXT_SUFFIXES)
                  and not f.startswith("benchmarks/results/")
                  and os.path.isfile(os.path.join(REPO, f)))


FILES = tracked_files()
PY_FILES = [f for f in FILES if f.endswith(".py")]


def test_the_scan_sees_the_sources():
    assert "runtime/inputs.py" in PY_FILES and "README.md" in FILES
    assert os.path.relpath(__file__, REPO) in PY_FILES


def test_no_path_out_of_the_repo():
    found = []
    for path in FILES:
        with open(os.path.join(REPO, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        found += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r} ({why})"
                  for pattern, why in CLIMBING for m in pattern.finditer(text)]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def _dirname_depth(node):
    """How many folders `node` climbs from the file: dirname(dirname(abspath(__file__))) -> 2
    (the file's own folder counts 1), Path(__file__).parent.parent / .parents[1] -> 2; None when
    the expression is not such a chain."""
    if isinstance(node, ast.Name) and node.id == "__file__":
        return 0
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
            node.func, "id", None)
        if name in ("abspath", "realpath", "Path", "resolve", "normpath") and node.args:
            return _dirname_depth(node.args[0])
        if name == "resolve" and isinstance(node.func, ast.Attribute):
            return _dirname_depth(node.func.value)
        if name == "dirname" and node.args:
            inner = _dirname_depth(node.args[0])
            return None if inner is None else inner + 1
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _dirname_depth(node.value)
        return None if inner is None else inner + 1
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents" and isinstance(node.slice, ast.Constant)):
        inner = _dirname_depth(node.value.value)
        return None if inner is None else inner + 1 + node.slice.value
    return None


def climbs_out(path, source):
    """The `__file__` chains in `source` (a file at `path` in the repo) that leave the repo."""
    levels = len(path.split("/"))              # dirname this many times = the repository root
    found = []
    for node in ast.walk(ast.parse(source)):
        depth = _dirname_depth(node)
        if depth is not None and depth > levels:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_file_relative_path_above_the_repo():
    found = []
    for path in PY_FILES:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            found += [f"{path}: {hit}" for hit in climbs_out(path, f.read())]
    assert not found, "paths above the repository root:\n" + "\n".join(found)


def test_the_checks_catch_what_they_are_for():
    """The detectors themselves: each must flag its case and pass the legitimate form."""
    assert climbs_out("tests/ldm/test_x.py", "import os\nR = os.path.dirname(os.path.dirname("
                      "os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))")
    assert not climbs_out("tests/ldm/test_x.py", "import os\nR = os.path.dirname(os.path."
                          "dirname(os.path.dirname(os.path.abspath(__file__))))")
    assert climbs_out("runtime/x.py", "from pathlib import Path\nR = Path(__file__).parents[2]")
    assert not climbs_out("runtime/x.py", "from pathlib import Path\nR = Path(__file__).parent"
                          ".parent")
    bad = ["open('..' + '/shared/x')".replace("' + '", ""), "os." + "pardir",
           "os.path.dirname(" + "REPO)", "'/" + "work/main/x'", "'/" + "home/me/x'"]
    for text in bad:
        assert any(p.search(text) for p, _ in CLIMBING), text
    for text in ["https://example.com/home/x", "tests/data/keys.tsv", "cd \"$(dirname $0)/..\""]:
        assert not any(p.search(text) for p, _ in CLIMBING), text
