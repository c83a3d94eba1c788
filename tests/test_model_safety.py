"""Saved models tried as a careless or hostile colleague would: edited, planted, killed.

Every planted pickle would create a marker file when unpickled (checked once
below, so the plant is live); each route to it must be refused with a clear
error and the marker must not exist. The attacker also rewrites the SHA-256 in
``model.json``, so the refusals never rest on a hash mismatch.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import skops.io
from click.testing import CliRunner
from PIL import Image
from sklearn.linear_model import LogisticRegression

from featurestore import FeatureStoreError
from featurestore.scan import hash_file
from pipelines.cli import main
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.models import (OOF_FILE, list_models, load_model, prediction_file,
                                    save_model)
from tests.test_fit_heads import write_digits_table


class Planted:
    """Unpickling (or reconstructing) this object opens ``path`` for writing: it creates it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety") / "store"
    lin = write_digits_table(root)
    run_fit_heads(FitHeadsConfig(store=root, table=lin.key, heads=["logreg"], search="none",
                                 cv=3), echo=lambda s: None)
    return root, lin


@pytest.fixture
def store(fitted_store, tmp_path):
    """A private copy of the fitted store, its logreg folder and the marker a plant would create."""
    root, lin = fitted_store
    copy = tmp_path / "deep" / "er" / "store"
    shutil.copytree(root, copy)
    return copy, lin, copy / "models" / lin.key / "logreg", tmp_path / "pwned"


def edit_record(folder, change):
    record = json.loads((folder / "model.json").read_text())
    change(record)
    (folder / "model.json").write_text(json.dumps(record))


def plant_pickle(path, marker):
    path.write_bytes(pickle.dumps(Planted(marker)))
    return hash_file(path)


def test_the_planted_pickle_is_live(tmp_path):
    pickle.loads(pickle.dumps(Planted(tmp_path / "live")))
    assert (tmp_path / "live").exists()


def _old_joblib_model(folder, marker, record):
    # A folder as fit-heads wrote it before skops: model.joblib, format joblib.
    (folder / "model.skops").unlink()
    record["files"].pop("model.skops")
    record["files"]["model.joblib"] = plant_pickle(folder / "model.joblib", marker)
    record.update(format="joblib", model_file="model.joblib")
    del record["model_files"]


def _other_joblib_in_folder(folder, marker, record):
    record["files"]["extra.joblib"] = plant_pickle(folder / "extra.joblib", marker)
    record["model_files"] = ["extra.joblib"]


def _joblib_outside_the_store(folder, marker, record):
    outside = folder.parents[3] / "x.joblib"
    name = "../../../../x.joblib"
    assert (folder / name).resolve() == outside.resolve()
    record["files"][name] = plant_pickle(outside, marker)
    record["model_files"] = [name]


def _skops_name_outside_the_folder(folder, marker, record):
    outside = folder.parents[3] / "x.skops"
    outside.write_bytes(pickle.dumps(Planted(marker)))
    name = "../../../../x.skops"
    record["files"][name] = hash_file(outside)
    record["model_files"] = [name]


def _pickle_renamed_to_skops(folder, marker, record):
    record["files"]["model.skops"] = plant_pickle(folder / "model.skops", marker)


def _files_key_deleted(folder, marker, record):
    record["files"]["extra.joblib"] = plant_pickle(folder / "extra.joblib", marker)
    record["model_files"] = ["extra.joblib"]
    del record["files"]


def _model_file_not_hashed(folder, marker, record):
    plant_pickle(folder / "model.skops", marker)
    del record["files"]["model.skops"]


ROUTES = {
    "old model.joblib": (_old_joblib_model, "pickled model .*model.joblib.*Refit"),
    "other .joblib in folder": (_other_joblib_in_folder, "pickled model .*extra.joblib"),
    "../../../../x.joblib": (_joblib_outside_the_store, "pickled model"),
    "../../../../x.skops": (_skops_name_outside_the_folder, "not a plain file name"),
    "pickle as model.skops": (_pickle_renamed_to_skops, "Cannot load the model"),
    "files key deleted": (_files_key_deleted, "lacks files"),
    "model file not hashed": (_model_file_not_hashed, "records no SHA-256 for 'model.skops'"),
}


@pytest.mark.parametrize("route", ROUTES)
def test_each_pickle_route_is_refused_and_runs_nothing(store, route):
    root, lin, folder, marker = store
    plant, message = ROUTES[route]
    edit_record(folder, lambda record: plant(folder, marker, record))
    with pytest.raises(FeatureStoreError, match=message):
        load_model(root, lin.key, "logreg")
    assert not marker.exists()


def test_predict_refuses_an_old_joblib_model_in_one_line_naming_the_folder(store, tmp_path):
    root, lin, folder, marker = store
    edit_record(folder, lambda record: _old_joblib_model(folder, marker, record))
    image = tmp_path / "img.png"
    Image.new("L", (8, 8)).save(image)
    result = CliRunner().invoke(main, ["predict", str(image), "--store", str(root),
                                       "--model", f"{lin.key}/logreg"])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and str(folder) in error[0] and "Refit" in error[0]
    assert "Traceback" not in result.output and not marker.exists()


def test_skops_file_with_an_untrusted_type_is_refused_naming_it(store):
    root, lin, folder, marker = store
    skops.io.dump({"head": Planted(marker)}, folder / "model.skops")
    edit_record(folder, lambda r: r["files"].update({"model.skops": hash_file(
        folder / "model.skops")}))
    with pytest.raises(FeatureStoreError, match=r"tests\.test_model_safety\.Planted.*not trust"):
        load_model(root, lin.key, "logreg")
    assert not marker.exists()


def test_skops_file_of_a_trusted_but_wrong_type_is_refused(store):
    root, lin, folder, _ = store
    skops.io.dump(LogisticRegression(), folder / "model.skops")
    edit_record(folder, lambda r: r["files"].update({"model.skops": hash_file(
        folder / "model.skops")}))
    with pytest.raises(FeatureStoreError, match="holds a LogisticRegression, not a LogRegHead"):
        load_model(root, lin.key, "logreg")


def test_an_edited_lineage_is_refused(store):
    root, lin, folder, _ = store
    edit_record(folder, lambda r: r["lineage"].update(input_size=[64, 64]))
    with pytest.raises(FeatureStoreError, match="lineage gives table key"):
        load_model(root, lin.key, "logreg")


def test_an_edited_lineage_with_a_matching_key_is_refused_by_its_folder(store):
    from featurestore import Lineage

    root, lin, folder, _ = store

    def retarget(record):
        record["lineage"]["input_size"] = [64, 64]
        record["table_key"] = Lineage.from_dict(record["lineage"]).key

    edit_record(folder, retarget)
    with pytest.raises(FeatureStoreError, match=f"filed under table {lin.key}"):
        load_model(root, lin.key, "logreg")


@pytest.mark.parametrize("damage, message", [
    (lambda folder: edit_record(folder, lambda r: r.pop("lineage")), "lacks lineage"),
    (lambda folder: (folder / "model.json").write_text('{"head": "logreg",'), "Cannot read"),
    (lambda folder: (folder / "model.json").write_text("[1, 2]"), "JSON list"),
])
def test_a_broken_model_json_is_a_one_line_error_naming_it(store, damage, message):
    root, lin, folder, _ = store
    damage(folder)
    with pytest.raises(FeatureStoreError, match=message) as err:
        load_model(root, lin.key, "logreg")
    assert str(folder / "model.json") in str(err.value) and "\n" not in str(err.value)


def test_predictions_of_another_fit_are_refused(store):
    root, lin, folder, _ = store
    oof = folder / OOF_FILE
    import pandas as pd

    pd.read_parquet(oof).iloc[:10].to_parquet(oof, index=False)  # an older, smaller fit's rows
    with pytest.raises(FeatureStoreError, match="does not match the SHA-256"):
        prediction_file(folder, OOF_FILE)
    with pytest.raises(FeatureStoreError, match="does not match the SHA-256"):
        load_model(root, lin.key, "logreg")


KILLED_SAVE = textwrap.dedent("""
    import os, sys
    from pipelines.heads.models import load_model, save_model
    root, key = sys.argv[1], sys.argv[2]
    model = load_model(root, key, "logreg")

    def killed(path):
        os._exit(9)  # as a kill -9 would: no clean-up, no finally

    save_model(root, model.estimator, head="logreg", lineage=model.lineage, params={},
               threshold=None, positive_class=None, meta={"fitted_at": "new"},
               extra_files={"oof.parquet": lambda p: p.write_bytes(b"new"), "z.parquet": killed})
""")


def test_a_save_killed_between_its_files_leaves_the_previous_model(store):
    root, lin, folder, _ = store
    before = json.loads((folder / "model.json").read_text())
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(root), lin.key],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    leftovers = [p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "oof.parquet").read_bytes() == b"new"
    model = load_model(root, lin.key, "logreg")  # the previous complete model, unchanged
    assert model.meta["fitted_at"] == before["fitted_at"]
    assert prediction_file(folder, OOF_FILE).stat().st_size > 3
    assert [ref.path for ref in list_models(root)] == [folder]
    save_model(root, model.estimator, head="logreg", lineage=lin, params={}, threshold=None,
               positive_class=None, meta={"fitted_at": "next"})
    assert not [p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    assert load_model(root, lin.key, "logreg").meta["fitted_at"] == "next"
    assert not (folder / OOF_FILE).exists()  # the new model has no OOF file: none is kept


def test_a_model_left_aside_by_a_kill_between_the_renames_is_put_back(store):
    root, lin, folder, _ = store
    half_built = folder.with_name(".tmp-0123abcd-logreg")
    shutil.copytree(folder, half_built)
    os.rename(folder, folder.with_name(".tmp-0123abcd-logreg.old"))
    assert load_model(root, lin.key, "logreg").head == "logreg"
    assert folder.is_dir() and not folder.with_name(".tmp-0123abcd-logreg.old").exists()


def test_a_folder_the_project_did_not_write_is_never_replaced(store):
    root, lin, folder, _ = store
    mine = folder.with_name("svm")
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    model = load_model(root, lin.key, "logreg")
    with pytest.raises(FeatureStoreError, match="holds no model.json.*refusing to replace"):
        save_model(root, model.estimator, head="svm", lineage=lin, params={}, threshold=None,
                   positive_class=None)
    assert (mine / "thesis.tex").read_text() == "x" and sorted(os.listdir(mine)) == ["thesis.tex"]
