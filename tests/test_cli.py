"""The command line: entry points, `tables`, and the end-to-end demo."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from featurestore import Lineage, Store
from featurestore.manifest import Manifest
from pipelines.cli import main
from pipelines.demo.run import DemoConfig, run_demo
from tests.test_tables import make_rows


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "featurestore", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "Usage: featurestore" in out
    for name in ("scan", "tables", "demo"):
        assert name in out


def test_each_command_is_registered_under_its_own_name_and_imported_only_when_used():
    import click

    from pipelines.cli import COMMANDS
    ctx = click.Context(main)
    assert [main.get_command(ctx, name).name for name in COMMANDS] == list(COMMANDS)
    # The CLI must start fast: no stage (scikit-learn, TensorFlow) at import.
    probe = "import sys, pipelines.cli; print(sorted({'sklearn', 'tensorflow', 'keras'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tables_lists_rows_dimension_lineage_and_size(tmp_path):
    store = Store(tmp_path / "store")
    lin = Lineage(backbone="densenet121", weights="imagenet", weights_sha256="ab" * 32,
                  pool="avg", input_size=224, preprocessing="torch",
                  library_versions={"keras": "3.15.1"})
    with store.writer(lin, formats=("hdf5", "parquet")) as w:
        w.append(**make_rows(123))
    result = CliRunner().invoke(main, ["tables", str(store.root), "--versions"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith(lin.key))
    fields = line.split()
    assert fields[1:4] == ["123", "16", "hdf5,parquet"]
    assert lin.name == "densenet121/avg/224" and lin.name in fields
    assert "imagenet" in line and "abababababab" in line
    assert f"{lin.key}: keras 3.15.1" in result.output


def test_tables_on_a_missing_store_names_it(tmp_path):
    result = CliRunner().invoke(main, ["tables", str(tmp_path / "nowhere")])
    assert result.exit_code != 0
    assert "nowhere" in result.output


# Every stage twice: 160 s on 2 quiet cores, but up to 870 s was seen while other jobs
# loaded them, so this one test gets more than the suite's 600 s.
@pytest.mark.timeout(1800)
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    config = DemoConfig(workdir=tmp_path / "demo", image_size=32, weights="none",
                        progress=False)
    lines = []
    first = run_demo(config, echo=lines.append)
    assert first["scan"].added == 1797
    with Manifest(config.store / "manifest.sqlite") as manifest:
        counts = manifest.counts()
    assert int(counts.to_numpy().sum()) == 1797 and sorted(counts.columns) == list("0123456789")
    assert first["extract"].views_written == 1797 and first["extract"].exit_code == 0
    assert sorted(first["tables"]["pool"]) == ["avg", "max"]
    assert (first["tables"]["rows"] == 1797).all()
    overall = first["eval_search"].query("label == 'all'")["precision"]
    assert (overall > 0.5).all()  # real digits cluster even under random weights
    board = first["fit_heads"].leaderboard
    assert len(board) == 4  # two heads on each of the two tables
    assert sorted(board["head"]) == ["knn", "knn", "logreg", "logreg"]
    assert (board["balanced_accuracy"] > 0.5).all()  # ten classes: chance is 0.1
    # The audit dropped its top suspects into a view and logreg was refitted on it.
    cleaned = first["fit_heads_view"].leaderboard
    assert len(cleaned) == 5 and list(cleaned.loc[cleaned["view"] != "", "view"]) == ["demo-clean"]
    # New scans were extracted and scored; their file names hold the true digit.
    scored = first["predict"].frame
    assert len(scored) == 24 and (scored["source"] == "extracted").all()
    truth = scored["path"].astype(str).str.extract(r"digit(\d)\.png$")[0]
    assert (scored["predicted"].astype(str) == truth).mean() > 0.5
    report = first["report"].read_text()
    assert first["report"].name == "index.html" and "demo-clean" in report  # before vs after
    again = run_demo(config, echo=lines.append)
    assert again["scan"].added == 0 and again["scan"].unchanged == 1797
    assert again["extract"].views_written == 0 and again["extract"].views_skipped == 1797
    assert (again["predict"].frame["source"] == "cache").all()  # never extracted twice
