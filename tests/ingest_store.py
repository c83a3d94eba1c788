"""A tiny living store for the ingest and serve tests: digits 3 and 8 at 32 px, a cosine
index and a logreg head, plus new scans the store has never seen."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

TABLE = "densenet121/max"
MODEL = "densenet121/max/logreg"


def build_store(root: Path, *, per_class: int = 20, new_scans: int = 6) -> SimpleNamespace:
    from pipelines.demo.data import write_digits_dataset, write_new_scans
    from pipelines.extract.run import ExtractConfig, run_extract
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
    from pipelines.similar.index import IndexConfig, run_index

    dataset = write_digits_dataset(root / "digits", size=32)
    for folder in dataset.iterdir():
        if folder.name not in ("3", "8"):
            shutil.rmtree(folder)
        else:
            for path in sorted(folder.glob("*.png"))[per_class:]:
                path.unlink()
    store = root / "store"
    run_extract(ExtractConfig(dataset=dataset, store=store, pool="max", weights="none",
                              image_size=32, workers=1, progress=False))
    run_index(IndexConfig(store=store, table=TABLE))
    fit = run_fit_heads(FitHeadsConfig(store=store, table=TABLE, heads=["logreg"],
                                       search="none", cv=3), echo=lambda _: None)
    scans = write_new_scans(root / "new", size=32, count=new_scans)
    return SimpleNamespace(root=root, dataset=dataset, store=store, key=fit.table_key,
                           scans=scans)


@pytest.fixture(scope="session")
def living_store(tmp_path_factory):
    """One store for test_ingest and test_serve (its build is most of their cost): each
    module ingests its own scans (ingest 0-7, serve 8-21) and checks changes, not totals."""
    from pipelines.audit.run import AuditLabelsConfig, run_audit_labels

    living = build_store(tmp_path_factory.mktemp("living"), new_scans=22)
    run_audit_labels(AuditLabelsConfig(store=living.store, table=TABLE, neighbours=0,
                                       method="threshold", below=1.0, top=10),
                     echo=lambda _: None)
    return living
