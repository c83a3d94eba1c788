"""The store's file and folder names have one owner, featurestore.paths, and the diagrams say so."""

import ast
import re
from pathlib import Path

import pytest

import featurestore.paths as paths
from featurestore import Store

REPO = Path(__file__).resolve().parents[1]
#: Names inside a table folder, which the docstring diagram shows too.
TABLE_LEVEL = (paths.LINEAGE_FILE, paths.PENDING_DIR, paths.INDEX_DIR,
               paths.NEAR_DUPLICATES_FILE)
STORE_NAMES = paths.LAYOUT + TABLE_LEVEL


def diagram(text: str) -> list[str]:
    """Lines of the first ``STORE/`` tree in ``text`` (a README section or a docstring)."""
    match = re.search(r"^( *)STORE/\n((?:\1 .*\n)+)", text, re.MULTILINE)
    assert match, "no STORE/ diagram found"
    indent = len(match[1])
    return [line[indent:] for line in match[2].splitlines()]


def top_level(lines: list[str]) -> set[str]:
    """First path component of the entries indented once (two spaces) under STORE/."""
    return {re.match(r"  (\S+)", line)[1].split("/")[0]
            for line in lines if re.match(r"  \S", line)}


def readme_concepts() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Concepts\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("where, text", [("README.md ## Concepts", readme_concepts()),
                                         ("featurestore/paths.py docstring", paths.__doc__)])
def test_store_diagram_lists_exactly_the_layout(where, text):
    shown = top_level(diagram(text))
    assert shown == set(paths.LAYOUT), (
        f"{where}: missing {set(paths.LAYOUT) - shown}, not in LAYOUT {shown - set(paths.LAYOUT)}")


def test_paths_docstring_shows_the_table_folder_too():
    inner = " ".join(line for line in diagram(paths.__doc__) if line.startswith("    "))
    for name in TABLE_LEVEL:
        assert name in inner


def test_every_layout_entry_has_a_store_path():
    store_paths = paths.StorePaths(Path("S"))
    found = {p.relative_to("S").parts[0] for p in (
        getattr(store_paths, name) for name in dir(paths.StorePaths)
        if isinstance(getattr(paths.StorePaths, name), property))
        if isinstance(p, Path)}
    assert found == set(paths.LAYOUT)


def _sources():
    for package in ("pipelines", "classifiers", "featurestore"):
        for file in sorted((REPO / package).rglob("*.py")):
            if file != REPO / "featurestore" / "paths.py":
                yield file


def _spelled_names(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, name)`` of every store name a module spells itself.

    File names (``leaderboard.parquet``) count wherever they appear as a whole
    string; folder names (``models``) only where they build a path (``x / "models"``,
    ``Path("models")``), since the same words are also dict keys and CLI names.
    """
    files = {n for n in STORE_NAMES if "." in n}
    folders = set(STORE_NAMES) - files
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in files:
            found.append((node.lineno, node.value))
        operands = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                node.func, "attr", None)) in ("Path", "joinpath", "join"):
            operands = node.args
        found += [(o.lineno, o.value) for o in operands
                  if isinstance(o, ast.Constant) and o.value in folders]
    return found


def test_no_module_spells_a_store_name_itself():
    offences = [f"{file.relative_to(REPO)}:{line}: {name!r}" for file in _sources()
                for line, name in _spelled_names(ast.parse(file.read_text(encoding="utf-8")))]
    assert not offences, "use store.paths (featurestore.paths) instead:\n" + "\n".join(offences)


def test_the_check_finds_a_spelled_name():
    found = _spelled_names(ast.parse('p = root / "models" / key\nq = "optuna.sqlite"'))
    assert sorted(found) == [(1, "models"), (2, "optuna.sqlite")]
    assert _spelled_names(ast.parse('d = {"models": 1}\n"""optuna.sqlite holds it."""')) == []


def test_store_of_passes_a_store_through_and_opens_a_path(tmp_path):
    store = Store(tmp_path)
    assert Store.of(store) is store
    assert Store.of(tmp_path).paths.leaderboard == tmp_path / paths.LEADERBOARD_FILE
    assert Store.of(str(tmp_path)).root == tmp_path
