"""``python -m featurestore`` runs the same CLI as the ``featurestore`` script."""

from pipelines.cli import main

if __name__ == "__main__":
    main(prog_name="featurestore")
