"""The package layout keeps its promises: imports run downhill, stage folders export their API."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extract", "heads", "audit", "report", "similar", "demo", "embedding", "cnn",
          "finetune", "explain", "ingest", "serve")
#: Which top-level packages each package may import: storage <- classifiers <- stages <- CLI.
ALLOWED = {"featurestore": {"featurestore"}, "classifiers": {"classifiers"},
           "pipelines": {"featurestore", "classifiers", "pipelines"}}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_run_downhill(package):
    uphill = {str(path.relative_to(ROOT)): sorted(_imported_packages(path) - ALLOWED[package])
              for path in sorted((ROOT / package).rglob("*.py"))}
    # featurestore/__main__.py is the `python -m featurestore` entry point: the CLI itself.
    uphill.pop("featurestore/__main__.py", None)
    assert {name: pkgs for name, pkgs in uphill.items() if pkgs} == {}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_folder_exports_its_config_and_run_function(stage):
    package = importlib.import_module(f"pipelines.{stage}")
    assert package.__all__, stage
    for name in package.__all__:
        assert getattr(package, name).__name__ == name
    assert any(name.startswith("run_") for name in package.__all__)
    assert any(name.endswith("Config") for name in package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        getattr(package, "nothing_here")


def test_every_stage_module_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "pipelines").rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert missing == []
