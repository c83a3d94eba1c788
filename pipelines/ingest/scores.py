"""``featurestore scores --store STORE [--model M] [--image ID]``: what the models said of ingested images."""

from __future__ import annotations

from pathlib import Path

import click

from featurestore import FeatureStoreError, Store
from pipelines.extract.run import EXIT_BAD_INPUT


class _CommandFailed(click.ClickException):
    exit_code = EXIT_BAD_INPUT


@click.command("scores")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default=None, help="Only this model (<table key>/<head>[@<view>]).")
@click.option("--image", "image_id", default=None, help="Only this image id.")
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the full table (.csv or .parquet) instead of listing it.")
def command(store, model, image_id, out):
    """List the scores that ingest wrote: one row per image, model and model version."""
    from pipelines.heads.predict import write_predictions

    try:
        frame = Store(store, create=False).scores(
            model=model, image_ids=[image_id] if image_id else None)
        if out is not None:
            if out.suffix.lower() not in (".csv", ".parquet"):
                raise FeatureStoreError(f"out must end in .csv or .parquet; got {str(out)!r}.")
            write_predictions(frame, out)
    except FeatureStoreError as err:
        raise _CommandFailed(str(err)) from err
    if out is not None:
        click.echo(f"{len(frame)} score(s) written to {out}.")
    elif frame.empty:
        click.echo("No scores yet: `featurestore ingest` writes them.")
    else:
        shown = frame.assign(image_id=frame["image_id"].str[:12],
                             model_version=frame["model_version"].str[:12])
        click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
