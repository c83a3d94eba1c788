"""``featurestore serve --store STORE``: the HTTP API (and review page) on uvicorn.

The same code path as ``featurestore ingest``: an upload is ingested by
:class:`~pipelines.ingest.session.IngestSession`. Off loopback a ``--token`` is
required (the server refuses to start without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from featurestore import FeatureStoreError
from pipelines.extract.run import EXIT_BAD_INPUT

#: Modules of the ``serve`` extra (setup.cfg).
SERVE_EXTRA = ("fastapi", "starlette", "uvicorn", "python_multipart")


@dataclass
class ServeConfig:
    """Settings of one server."""

    store: Path
    """Store folder with at least one table."""
    host: str = "127.0.0.1"
    """Address to listen on; anything but loopback needs ``token``."""
    port: int = 8000
    token: str | None = None
    """Bearer token of the writing endpoints (and of every endpoint off loopback)."""
    max_upload_mb: float = 50.0
    """Largest upload accepted, checked while the body is read."""


def run_serve(config: ServeConfig) -> None:
    """Build the app (backbones and heads load now) and serve it until stopped."""
    try:
        import uvicorn

        from pipelines.serve.app import ServeSettings, create_app
    except ImportError as err:
        if err.name not in SERVE_EXTRA:
            raise
        raise FeatureStoreError(f"featurestore serve needs the serve extra ({err.name} is "
                                f"missing): pip install 'xray-featurestore[serve]'.") from err

    settings = ServeSettings(host=config.host, token=config.token,
                             max_upload_bytes=int(config.max_upload_mb * 1024 * 1024))
    settings.check()  # before anything loads
    from threadpoolctl import threadpool_limits

    # Requests run on threads of their own: with a BLAS thread per core for each
    # product, 8 concurrent `similar` queries contended for the cores (bench_serve,
    # loaded 2 cores: 22 queries/s with the default, 106 with one thread each).
    threadpool_limits(1, user_api="blas")
    app = create_app(config.store, settings)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


class _CommandFailed(click.ClickException):
    exit_code = EXIT_BAD_INPUT


@click.command("serve")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", default=None, envvar="FEATURESTORE_TOKEN",
              help="Bearer token for writes (required off loopback) [env FEATURESTORE_TOKEN].")
@click.option("--max-upload-mb", default=50.0, show_default=True, type=click.FloatRange(0.001))
def command(store, host, port, token, max_upload_mb):
    """Serve the store over HTTP: upload scans, read scores, search neighbours (docs at /docs)."""
    try:
        run_serve(ServeConfig(store=store, host=host, port=port, token=token,
                              max_upload_mb=max_upload_mb))
    except (FeatureStoreError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
