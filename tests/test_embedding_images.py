"""A derived table scores new image files (predict) and keeps up with ingest: the parent's
recipe extracts them, its projection maps them."""

import shutil

import numpy as np
import pytest

from featurestore import Store
from pipelines.embedding import FitEmbeddingConfig, run_fit_embedding
from pipelines.heads import FitHeadsConfig, PredictConfig, load_model, run_fit_heads, run_predict
from pipelines.ingest import IngestConfig, run_ingest
from tests.test_predict import _rescan


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    """Digits 0, 1 and 2 (12 images each) extracted at 32 px, an embedding and a head on it."""
    from pipelines.demo.data import write_digits_dataset
    from pipelines.extract.run import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("embedding-images")
    dataset = write_digits_dataset(root / "digits", size=32)
    for folder in dataset.iterdir():
        if folder.name not in ("0", "1", "2"):
            shutil.rmtree(folder)
        else:
            for path in sorted(folder.glob("*.png"))[12:]:
                path.unlink()
    store = Store(root / "store")
    run_extract(ExtractConfig(dataset=dataset, store=store.root, pool="avg", weights="none",
                              image_size=32, workers=1, progress=False))
    result = run_fit_embedding(FitEmbeddingConfig(store=store.root, table="densenet121/avg",
                                                  dim=8, epochs=1, p=3, k=4),
                               echo=lambda _: None)
    run_fit_heads(FitHeadsConfig(store=store.root, table=result.lineage.name, heads=["logreg"],
                                 search="none", cv=2), echo=lambda _: None)
    return store, dataset, result.lineage


def test_new_image_is_projected_where_its_twin_row_is(derived, tmp_path):
    store, dataset, lineage = derived
    reader = store.open(lineage)
    meta = reader.metadata()
    row = int(np.flatnonzero(meta["aug_id"] == 0)[0])
    twin = tmp_path / "rescan.png"  # same pixels, other bytes: not in any table
    _rescan(dataset / meta["path"][row], twin, "new scanner")
    out = tmp_path / "pred.csv"
    scored = run_predict(PredictConfig(inputs=[str(twin)], store=store.root,
                                       model=f"{lineage.key}/logreg", out=out, progress=False,
                                       workers=1)).frame
    assert scored["source"].tolist() == ["extracted"]
    expected = load_model(store, lineage.key, "logreg").predict_proba(
        reader.read_features(np.array([row])))
    got = scored[[c for c in scored.columns if c.startswith("proba_")]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # The predict cache holds the projected row (8 wide), never the parent's 1,024.
    assert Store(store.paths.cache).open(lineage).dimension == 8
    # Ingest gives the twin its parent row, then its projected row in the derived table,
    # scored by the head there with predict's numbers.
    parent_rows, rows = len(store.open("densenet121/avg")), len(reader)
    [outcome] = run_ingest(IngestConfig(paths=[twin], store=store.root), echo=lambda _: None).outcomes
    assert outcome.new and not outcome.error
    assert len(store.open("densenet121/avg")) == parent_rows + 1
    grown = store.open(lineage)
    assert len(grown) == rows + 1
    new_row = int(np.flatnonzero(grown.metadata()["image_id"] == outcome.image_id)[0])
    np.testing.assert_allclose(grown.read_features(np.array([new_row])),
                               reader.read_features(np.array([row])), atol=1e-3)
    ingested = store.scores(model=f"{lineage.key}/logreg")
    np.testing.assert_allclose(
        ingested[[c for c in ingested.columns if c.startswith("proba_")]].to_numpy(), got,
        atol=1e-4)
