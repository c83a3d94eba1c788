"""The ``featurestore`` command line: a thin Click layer over the ``run_*`` functions.

Commands are imported when they are called, not when the group is built:
importing every stage (scikit-learn, pandas, the report's plotting) cost
about 4 s before a command such as ``scan`` could start. ``featurestore
--help`` still imports them all, for their one-line help.
"""

import importlib

import click

from pipelines.errors import one_line_failures

# Command name -> the module whose ``command`` it is, in the order --help lists them.
COMMANDS = {
    "demo": "pipelines.demo.run",
    "scan": "pipelines.scan",
    "extract": "pipelines.extract.run",
    "fit-heads": "pipelines.heads.fit",
    "audit-labels": "pipelines.audit.run",
    "tables": "pipelines.tables",
    "index": "pipelines.similar.index",
    "search": "pipelines.similar.search",
    "eval-search": "pipelines.similar.evaluate",
    "near-duplicates": "pipelines.similar.near_duplicates",
    "predict": "pipelines.heads.predict",
    "report": "pipelines.report.run",
    "fit-embedding": "pipelines.embedding.run",
    "verify": "pipelines.embedding.verify",
    "train-cnn": "pipelines.cnn.run",
    "fine-tune": "pipelines.finetune.run",
    "explain": "pipelines.explain.run",
    "ingest": "pipelines.ingest.run",
    "label": "pipelines.ingest.labels",
    "scores": "pipelines.ingest.scores",
    "serve": "pipelines.serve.run",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is used."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        command = importlib.import_module(COMMANDS[name]).command
        # Every command: a full disk or a dead worker is one line, not a traceback.
        command.callback = one_line_failures(command.callback)
        return command


@click.group("featurestore", cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xray-featurestore")
def main():
    """Image feature store with a classifier zoo.

    Scan an image folder, extract CNN features once into versioned tables,
    then tune, audit and search from those tables.
    """
