"""The ``featurestore`` command line: a thin Click layer over the ``run_*`` functions."""

import click

from pipelines.errors import one_line_failures


@click.group("featurestore", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xray-featurestore")
def main():
    """Image feature store with a classifier zoo.

    Scan an image folder, extract CNN features once into versioned tables,
    then tune, audit and search from those tables.
    """


def _register():
    # One module per command; each exposes a click command named ``command``.
    from pipelines import scan, tables
    from pipelines.audit import run as audit_labels
    from pipelines.cnn import run as train_cnn
    from pipelines.demo import run as demo
    from pipelines.embedding import run as fit_embedding
    from pipelines.embedding import verify
    from pipelines.explain import run as explain
    from pipelines.extract import run as extract
    from pipelines.finetune import run as fine_tune
    from pipelines.heads import fit as fit_heads
    from pipelines.heads import predict
    from pipelines.ingest import run as ingest
    from pipelines.ingest import labels as label
    from pipelines.ingest import scores
    from pipelines.report import run as report
    from pipelines.similar import evaluate as eval_search
    from pipelines.serve import run as serve
    from pipelines.similar import index, near_duplicates, search

    for module in (demo, scan, extract, fit_heads, audit_labels, tables, index, search,
                   eval_search, near_duplicates, predict, report, fit_embedding, verify,
                   train_cnn, fine_tune, explain, ingest, label, scores, serve):
        # Every command: a full disk or a dead worker is one line, not a traceback.
        module.command.callback = one_line_failures(module.command.callback)
        main.add_command(module.command)


_register()
