"""Saved models: names (``<table>/<head>[@<view>]``), view folders and held-out predictions."""

import numpy as np
import pandas as pd
import pytest

from featurestore import FeatureStoreError, Store
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.models import list_models, load_model, resolve_model_name, save_model
from tests.test_fit_heads import write_digits_table


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """logreg on the max and avg digits tables, knn on max; a logreg on a view of max."""
    root = tmp_path_factory.mktemp("models") / "store"
    lin_max = write_digits_table(root, pool="max")
    lin_avg = write_digits_table(root, pool="avg")
    quiet = dict(search="none", cv=3)
    run_fit_heads(FitHeadsConfig(store=root, table=lin_max.key, heads=["logreg", "knn"],
                                 min_recall=0.9, positive_class="d8", **quiet),
                  echo=lambda s: None)
    run_fit_heads(FitHeadsConfig(store=root, table=lin_avg.key, heads=["logreg"], **quiet),
                  echo=lambda s: None)
    model = load_model(root, lin_max.key, "logreg")
    save_model(root, model.estimator, head="logreg", lineage=lin_max, params={},
               threshold=None, positive_class=None, view="clean")
    return root, lin_max, lin_avg


def test_models_are_listed_and_named_by_table_head_and_view(fitted):
    root, lin_max, lin_avg = fitted
    names = [ref.name for ref in list_models(root)]
    assert sorted(names) == sorted([f"{lin_max.key}/logreg", f"{lin_max.key}/knn",
                                    f"{lin_avg.key}/logreg", f"{lin_max.key}/logreg@clean"])
    assert resolve_model_name(root, "digits/max/logreg").path == \
        root / "models" / lin_max.key / "logreg"
    assert resolve_model_name(root, "knn").table_key == lin_max.key  # unique head: no table
    ref = resolve_model_name(root, "logreg@clean")
    assert (ref.head, ref.view, ref.path.name) == ("logreg", "clean", "logreg@clean")
    assert load_model(root, ref.table_key, ref.head, view=ref.view).meta["view"] == "clean"


def test_ambiguous_or_unknown_model_names_say_what_exists(fitted):
    root, lin_max, lin_avg = fitted
    with pytest.raises(FeatureStoreError, match=r"ambiguous.*digits/max/logreg|ambiguous.*e\.g\."):
        resolve_model_name(root, "logreg")
    with pytest.raises(FeatureStoreError, match=f"No model named 'svm'.*{lin_avg.key}/logreg"):
        resolve_model_name(root, "svm")
    with pytest.raises(FeatureStoreError, match="No model named 'digits/avg/knn'"):
        resolve_model_name(root, "digits/avg/knn")
    with pytest.raises(FeatureStoreError, match="view 'other'"):
        load_model(root, lin_max.key, "logreg", view="other")


def test_heldout_file_holds_the_saved_models_predictions(fitted):
    root, lin_max, _ = fitted
    model = load_model(root, lin_max.key, "logreg")
    held = pd.read_parquet(root / "models" / lin_max.key / "logreg" / "heldout.parquet")
    with Store(root).open(lin_max) as reader:
        X, y, ids, _ = reader.to_numpy(split="test", aug="raw")
    assert list(held.image_id) == list(ids["image_id"]) and list(held.label) == list(y)
    proba = held[[f"proba_{c}" for c in model.classes]].to_numpy()
    np.testing.assert_allclose(proba, model.predict_proba(X), rtol=1e-6)
    # Decided with the recall-floor threshold, exactly as predict() decides.
    assert model.threshold is not None
    assert list(held.predicted) == list(model.predict(X))
