"""``extract --engine ray`` on a real single-node Ray cluster (127.0.0.1, two CPUs).

One cluster serves the module. Each Ray run builds its actors' models, which
dominates the cost, so the runs are few: one with an actor killed after its
first part (features must still equal the local engine's, one row per key),
and a driver killed mid-run whose rerun completes the table.
"""

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from featurestore import Store
from pipelines.extract.ray_engine import start_local_cluster
from pipelines.extract.run import ExtractConfig, command, run_extract
from tests.image_zoo import image_folder
from tests.pg_server import free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(weights="none", image_size=32, batch_size=4, augment=1, progress=False)


def config(dataset, store, **overrides):
    return ExtractConfig(dataset=dataset, store=store, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two CPUs on 127.0.0.1; its GCS address."""
    start_local_cluster(num_cpus=2, object_store_memory=200 * 2**20, logging_level="ERROR",
                        log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "images"
    image_folder(root, n_per_class=4)
    return root


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    store = tmp_path_factory.mktemp("local") / "store"
    assert run_extract(config(dataset, store, workers=1)).exit_code == 0
    return store


def rows(store, pool):
    """``(ids sorted by (image_id, aug_id), features in that order)``."""
    X, _, ids, _ = Store(store).open(f"densenet121/{pool}").to_numpy()
    order = np.argsort(ids, order=["image_id", "aug_id"])
    return ids[order], X[order]


def assert_equal_to_local(store, reference):
    for pool in ("max", "avg"):
        ids, X = rows(store, pool)
        ids_ref, X_ref = rows(reference, pool)
        assert len(set(ids.tolist())) == len(ids)  # one row per (image_id, aug_id)
        np.testing.assert_array_equal(ids, ids_ref)
        np.testing.assert_allclose(X, X_ref, rtol=0, atol=1e-6)
    assert not list(Path(store).glob("tables/*/pending"))  # everything committed


def part_writers(store) -> list[Path]:
    """Ray part writers' folders that hold at least one committed part."""
    return [p for p in Path(store).glob("tables/*/pending/ray-*") if any(p.glob("hdf5/part-*"))]


def listening_sockets() -> list[tuple[str, str, int]]:
    """``(process, address, port)`` of every listening socket of this process and its
    descendants: the cluster's GCS, raylet, agents and workers."""
    me = psutil.Process()
    found = []
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            found += [(process.name(), c.laddr.ip, c.laddr.port)
                      for c in process.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM
                                                            and not c.raddr)]
    return found


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too


def kill_first_writer(store, killed: list, stop: threading.Event, sockets: list) -> None:
    """Kill -9 the actor owning the first part writer with a part (its name holds the pid),
    noting first the cluster's listening sockets (with its actors up)."""
    while not stop.is_set():
        for folder in part_writers(store):
            pid = int(folder.name.split("-")[-2])
            sockets += listening_sockets()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


def test_features_equal_local_after_an_actor_is_killed_mid_run(cluster, dataset, reference,
                                                                tmp_path):
    store, killed, stop, sockets = tmp_path / "store", [], threading.Event(), []
    watcher = threading.Thread(target=kill_first_writer, args=(store, killed, stop, sockets))
    watcher.start()
    try:
        result = run_extract(config(dataset, store, engine="ray", actors=2))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no actor wrote a part"
    assert result.exit_code == 0 and result.workers == 2
    assert result.views_written >= result.views_total  # the killed batch was redone
    assert_equal_to_local(store, reference)
    # The local cluster serves this machine only: GCS, raylet, agents, actors on loopback.
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any("MapWorker" in n for n in names), names
    exposed = [s for s in sockets if not loopback(s[1])]
    assert not exposed, exposed


_DRIVER = textwrap.dedent("""
    import sys
    from pipelines.extract.run import ExtractConfig, run_extract
    run_extract(ExtractConfig(dataset=sys.argv[1], store=sys.argv[2], weights="none",
                              image_size=32, batch_size=4, augment=1, progress=False,
                              engine="ray", ray_address=sys.argv[3], actors=1))
""")


def test_rerun_after_the_driver_is_killed_completes_from_the_store(cluster, dataset, reference,
                                                                   tmp_path):
    store = tmp_path / "store"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(dataset), str(store), cluster],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not part_writers(store):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the driver never committed a part"
        time.sleep(0.02)
    driver.kill()
    driver.communicate()
    result = run_extract(config(dataset, store, engine="ray", actors=1))
    # The killed run's parts were committed first (once its actor let go of them).
    assert result.merged["rows"] >= 1 and result.exit_code == 0
    assert_equal_to_local(store, reference)


def test_an_unreachable_ray_address_is_one_error_line(dataset, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    out = CliRunner().invoke(command, [str(dataset), "--store", str(tmp_path / "store"),
                                       "--weights", "none", "--image-size", "32", "--quiet",
                                       "--engine", "ray", "--ray-address", address])
    assert out.exit_code == 2, out.output
    assert out.output.startswith(f"Error: Cannot reach the Ray cluster at ray_address "
                                 f"'{address}': "), out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
