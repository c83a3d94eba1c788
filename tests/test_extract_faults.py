"""Extract under faults from outside: a file rewritten after the scan, a full disk, a killed worker.

Each is run through the ``featurestore`` command as a user would, and each
ends with a rerun that repairs what the fault left.
"""

import errno
import functools
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import click
import psutil
import pytest
from click.testing import CliRunner

from featurestore import Store
from featurestore.scan import hash_file
from pipelines.cli import main
from pipelines.errors import EXIT_CANNOT_WRITE, one_line_failures
from pipelines.extract import run as extract_run
from pipelines.extract.errors import read_errors
from pipelines.extract.run import ExtractConfig, run_extract
from pipelines.scan import ScanConfig, run_scan
from tests.image_zoo import encoded, gradient_rgb, image_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--pool", "max",
             "--workers", "1", "--quiet"]


def extract(dataset, store, *extra):
    return CliRunner().invoke(main, ["extract", str(dataset), "--store", str(store),
                                     *TINY_ARGS, *extra])


def rows(store):
    """``{image_id: features}`` of the max table's raw views."""
    X, _, ids, _ = Store(store).open("densenet121/max").to_numpy()
    return {image_id: X[k] for k, image_id in enumerate(ids["image_id"])}


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("Error:")]


# -- a file rewritten after the scan -----------------------------------------------


def test_same_size_rewrite_is_reported_never_stored_under_the_old_id(tmp_path):
    data, store = tmp_path / "data", tmp_path / "store"
    image_folder(data, n_per_class=3)
    scan = data / "cat_a" / "scan.bmp"  # BMP: the same geometry is the same file size
    scan.write_bytes(encoded(gradient_rgb(40, 30, seed=7), "BMP"))
    run_scan(ScanConfig(dataset=data, store=store, progress=False))
    old_id = hash_file(scan)
    new_bytes = encoded(gradient_rgb(40, 30, seed=8), "BMP")
    assert len(new_bytes) == scan.stat().st_size and hashlib.sha256(new_bytes).hexdigest() != old_id
    scan.write_bytes(new_bytes)

    result = extract(data, store)
    assert result.exit_code == 3, result.output
    assert "cat_a/scan.bmp: changed since scan (same size, other bytes)" in result.output
    assert "rerun featurestore scan" in result.output
    stored = rows(store)
    assert old_id not in stored  # neither the old image's features nor the new one's
    assert len(stored) == 6  # every unchanged file was extracted
    errors = read_errors(store)
    assert errors["path"].tolist() == ["cat_a/scan.bmp"]
    assert errors["image_id"].tolist() == [old_id]

    run_scan(ScanConfig(dataset=data, store=store, progress=False))  # the hint, followed
    again = extract(data, store)
    assert again.exit_code == 0, again.output
    stored = rows(store)
    assert old_id not in stored and hash_file(scan) in stored and len(stored) == 7
    assert read_errors(store).empty


# -- a full disk ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs mounted for this test (skipped where mounting is not allowed)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path, leave_bytes: int) -> Path:
    filler = mount / "filler"
    stat = os.statvfs(mount)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def test_full_disk_is_one_line_keeps_committed_rows_and_a_rerun_completes(
        tmp_path, small_disk, monkeypatch):
    data, store = tmp_path / "data", small_disk / "store"
    image_folder(data, n_per_class=8, classes=("cat_a",))
    assert extract(data, store).exit_code == 0
    first = rows(store)
    image_folder(tmp_path / "more", n_per_class=16)
    (tmp_path / "more" / "cat_b").rename(data / "cat_b")  # 16 new scans arrive
    run_scan(ScanConfig(dataset=data, store=store, progress=False))
    # Parts of 8 rows, so new rows may be committed before the disk fills too.
    monkeypatch.setattr(extract_run, "ExtractConfig",
                        functools.partial(ExtractConfig, rows_per_part=8))
    filler = fill(small_disk, leave_bytes=160_000)

    full = extract(data, store)
    assert full.exit_code == EXIT_CANNOT_WRITE, full.output
    assert "Traceback" not in full.output
    (line,) = error_lines(full.output)
    assert "no space left on device" in line and str(store) in line
    assert "rerun the same command" in line
    committed = rows(store)  # what was committed before the disk filled is readable
    assert set(first) <= set(committed)  # new parts may fit, consolidating them does not
    for image_id, features in first.items():
        np.testing.assert_array_equal(committed[image_id], features)

    filler.unlink()  # free space, then the same command again
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = extract(data, store)
    assert again.exit_code == 0, again.output
    complete = rows(store)
    assert len(complete) == 24
    assert not list(store.rglob(".tmp-*"))  # the half-written file of the full disk is gone
    for image_id, features in committed.items():  # kept as they were, not recomputed
        np.testing.assert_array_equal(complete[image_id], features)


def test_every_command_reports_a_write_failure_in_one_line_and_nothing_else():
    ctx = click.Context(main)
    commands = [main.get_command(ctx, name) for name in main.list_commands(ctx)]
    assert all(getattr(cmd.callback, "_one_line_failures", False)
               for cmd in commands), "a command without the shared handler"

    @click.command()
    @click.option("--store")
    def quota(store):  # a command that wrapped the OSError in its own error, as many do
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", f"{store}/part.h5")
        except OSError as err:
            raise click.ClickException("could not save") from err

    @click.command()
    def bug():
        raise OSError(errno.EACCES, "Permission denied")

    out = CliRunner().invoke(click.Command("q", callback=one_line_failures(quota.callback),
                                           params=quota.params), ["--store", "S"])
    assert out.exit_code == EXIT_CANNOT_WRITE
    assert out.output.startswith("Error: cannot write S/part.h5 (store S): disk quota exceeded.")
    other = CliRunner().invoke(click.Command("b", callback=one_line_failures(bug.callback)))
    assert isinstance(other.exception, PermissionError)  # not a write failure: kept as is


# -- a killed worker -----------------------------------------------------------------

_CLI_WITH_SMALL_PARTS = textwrap.dedent("""
    import functools, sys
    from pipelines.cli import main
    from pipelines.extract import run
    run.ExtractConfig = functools.partial(run.ExtractConfig, rows_per_part=4)
    main(sys.argv[1:])
""")


def _workers_of(pid):
    """The spawned worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    return [child for child in psutil.Process(pid).children()
            if "spawn_main" in " ".join(child.cmdline())]


def test_killed_worker_stops_the_run_with_one_line_and_a_rerun_resumes(tmp_path):
    data, store = tmp_path / "data", tmp_path / "store"
    image_folder(data, n_per_class=24)
    args = ["extract", str(data), "--store", str(store), "--weights", "none",
            "--image-size", "32", "--batch-size", "4", "--pool", "max", "--workers", "2",
            "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", _CLI_WITH_SMALL_PARTS, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(store.glob("tables/*/hdf5/part-*")) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a worker could be killed"
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)  # noticed: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert line == (f"Error: extract worker pid {workers[0].pid} died (signal 9, SIGKILL; "
                    f"killed, or out of memory?); committed rows are kept, rerun to resume.")
    _, alive = psutil.wait_procs(workers[1:], timeout=10)
    assert not alive, "the other worker outlived the run"
    committed = rows(store)
    assert 0 < len(committed) < 48

    resumed = run_extract(ExtractConfig(dataset=data, store=store, weights="none",
                                        image_size=32, batch_size=4, pool="max", workers=1,
                                        progress=False))
    assert resumed.exit_code == 0 and resumed.views_skipped == len(committed)
    assert len(rows(store)) == 48
