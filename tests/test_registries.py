"""Registries and docs keep their promises: the README's tables and commands, light imports,
and extras that never put two builds of one module side by side."""

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement

from classifiers.registry import heads_table
from featurestore import Lineage, Store
from featurestore.formats import FORMATS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
HEAVY = ("keras", "tensorflow", "jax", "torch")


def readme_section(title: str) -> str:
    """The text under ``## title`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def modules_loaded_by(code: str) -> list[str]:
    """Top-level packages of ``HEAVY`` that a fresh interpreter holds after running ``code``."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_readme_heads_table_is_the_registry_table():
    rows = [line for line in readme_section("Tuning heads").splitlines() if line.startswith("|")]
    assert "\n".join(rows) == heads_table()


def test_featurestore_opens_tables_without_any_deep_learning_library(tmp_path):
    lineage = Lineage(backbone="densenet121", weights="random:0", pool="max", input_size=32,
                      preprocessing="torch", library_versions={"keras": "3.test"})
    n = 6
    with Store(tmp_path).writer(lineage, formats=tuple(FORMATS)) as writer:
        writer.append(features=np.arange(n * 4, dtype=np.float32).reshape(n, 4),
                      image_id=[f"{i:064x}" for i in range(n)], aug_id=[0] * n,
                      label=["a", "b"] * 3, split=["train"] * n,
                      path=[f"{i}.png" for i in range(n)], aug_params=[""] * n)
    reads = "".join(f"assert len(Store({str(tmp_path)!r}).open('densenet121/max', format={f!r})"
                    f".to_numpy().X) == {n}\n" for f in FORMATS)
    assert modules_loaded_by("import featurestore\nfrom featurestore import Store\n" + reads) == []


def test_classifiers_and_their_heads_import_without_keras_or_tensorflow():
    loaded = modules_loaded_by("import classifiers\nclassifiers.list_heads()\n"
                               "classifiers.create_head('logreg')\n")
    assert [m for m in loaded if m in ("keras", "tensorflow")] == []


def _requirements(text: str) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    return {r.name.lower(): r for r in reqs}


def test_cpu_and_gpu_extras_each_bring_one_build_of_xgboost_and_tensorflow():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    base = _requirements(cfg["options"]["install_requires"])
    extras = {name: _requirements(value) for name, value in cfg["options.extras_require"].items()}
    builds = {"xgboost", "xgboost-cpu", "tensorflow", "tensorflow-cpu"}
    # pip installs both wheels of a pair into the same `xgboost`/`tensorflow` folder.
    assert builds & set(base) == set()
    assert builds & set(extras["cpu"]) == {"xgboost-cpu", "tensorflow-cpu"}
    assert builds & set(extras["gpu"]) == {"xgboost", "tensorflow"}
    assert all(builds & set(reqs) == set() for name, reqs in extras.items()
               if name not in ("cpu", "gpu"))


def test_quick_start_installs_the_cpu_builds_and_ci_runs_its_test_command():
    commands = [line for line in readme_section("Quick start").splitlines()
                if line.startswith(("pip install", "bash tests/"))]
    assert commands == ['pip install -e ".[cpu]" && featurestore demo',
                        'bash tests/system-packages.sh && pip install -e ".[cpu,test]"'
                        ' && python -m pytest']
    assert commands[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_without_xgboost_every_other_head_works_and_xgboost_says_what_to_install():
    # A bare `pip install -e .` (neither the cpu nor the gpu extra) has no XGBoost.
    code = (
        "import sys; sys.modules['xgboost'] = None\n"
        "import numpy as np\n"
        "from classifiers import ClassifierError\n"
        "from classifiers.registry import create_head, list_heads\n"
        "assert 'xgboost' in list_heads()\n"
        "X = np.random.default_rng(0).normal(size=(40, 3)); y = np.arange(40) % 2\n"
        "create_head('logreg').fit(X, y)\n"
        "try:\n"
        "    create_head('xgboost').fit(X, y)\n"
        "except ClassifierError as err:\n"
        "    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'pip install -e ".[cpu]"' in out.stdout
