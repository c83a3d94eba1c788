"""A real PostgreSQL server for the tests: own data folder, free port, 127.0.0.1 only.

``initdb`` refuses to run as root, so when the tests run as root the server's
commands run as the ``postgres`` user (``runuser -u postgres --``) in a
temporary folder that user may write. The server is stopped (``pg_ctl stop -m
immediate``) and its folder removed when the context ends, on failure too.
Tests that need it skip with the reason when no PostgreSQL binaries are found
(Debian package ``postgresql``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``pg_ctl``, else None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def postgres_server(database: str = "optuna"):
    """Start a server, create ``database``, yield its SQLAlchemy URL; stop it at the end."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/pg_ctl (Debian package postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pgtest-"))
    data, port = root / "data", free_port()
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    run = lambda *args: subprocess.run(_as_server_user([str(bin_dir / args[0]), *args[1:]]),
                                       check=True, capture_output=True, text=True)
    try:
        run("initdb", "-D", str(data), "-U", user, "--auth=trust", "--no-sync")
        # Unix socket in the data folder: /var/run/postgresql may not exist or be ours.
        run("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
            f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off", "start")
        try:
            run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", user, database)
            yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                            "immediate", "stop"]), capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
