"""train-cnn: a small CNN from the store's images, ranked beside the heads on the same test split."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from featurestore import FeatureStoreError, Store
from pipelines.cli import main
from pipelines.cnn import TrainCnnConfig, run_train_cnn
from pipelines.cnn.data import augmenter, load_splits
from pipelines.extract.augment import PRESETS
from pipelines.heads.leaderboard import read_leaderboard
from pipelines.heads.models import HELDOUT_FILE, resolve_model_name
from tests.digit_store import digit_store
from tests.test_predict import _rescan

EPOCHS = dict(epochs=1, batch_size=32, image_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = digit_store(tmp_path_factory.mktemp("cnn"))
    lines = []
    result = run_train_cnn(TrainCnnConfig(store=store, positive_class="d1", min_recall=0.9,
                                          **EPOCHS), echo=lines.append)
    return store, result, lines


def test_cnn_joins_the_leaderboard_with_held_out_test_metrics(trained):
    store, result, lines = trained
    board = read_leaderboard(store)
    row = board[(board["head"] == "cnn")].iloc[0]
    assert row["table"] == "images/32" and row["eval_split"] == "test"
    assert row["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert row["sec_per_epoch"] > 0 and row["epochs"] == 1
    assert any(line.startswith("epoch 1/1: ") for line in lines)  # progress per epoch
    ref = resolve_model_name(store, "cnn")
    meta = json.loads((ref.path / "model.json").read_text())
    assert meta["kind"] == "end_to_end" and len(meta["recipe"]["manifest_digest"]) == 64
    assert meta["threshold"] == result.threshold is not None  # recall floor chosen on val
    assert np.array(meta["metrics"]["confusion_matrix"]).sum() == meta["recipe"]["rows"]["test"]


def test_saved_model_reproduces_its_held_out_predictions_from_the_test_images(trained):
    import keras

    store, result, _ = trained
    ref = resolve_model_name(store, "images-32/cnn")
    held = pd.read_parquet(ref.path / HELDOUT_FILE)
    test = load_splits(Store(store, create=False), 32).splits["test"]
    with Store(store).manifest() as manifest:
        assert set(held["image_id"]) == set(manifest.images(split="test")["image_id"])
    model = keras.saving.load_model(ref.path / "model.keras", safe_mode=True)
    proba = model.predict(test.pixels.astype(np.float32), verbose=0)
    order = pd.Series(range(len(held)), index=held["image_id"])[test.image_ids].to_numpy()
    saved = held[[c for c in held if c.startswith("proba_")]].to_numpy()[order]
    np.testing.assert_allclose(proba, saved, atol=1e-5)


def test_resume_goes_on_from_the_best_checkpoint(trained):
    store, _, _ = trained
    lines = []
    result = run_train_cnn(TrainCnnConfig(store=store, positive_class="d1", min_recall=0.9,
                                          resume=True, **{**EPOCHS, "epochs": 2}),
                           echo=lines.append)
    assert any(line.startswith("Resuming after epoch 1 ") for line in lines)
    assert result.epochs == 2 and not any(line.startswith("epoch 1/") for line in lines)


def test_a_class_without_val_images_is_refused_before_training(tmp_path):
    store = digit_store(tmp_path, digits=(0, 1), per_class=20)
    with Store(store).manifest() as manifest:
        val = manifest.images(split="val", label="d1")
        with manifest.transaction():
            manifest.set_splits([(path, "train") for path in val["path"]])
    result = CliRunner().invoke(main, ["train-cnn", "--store", str(store), "--image-size", "32"])
    assert result.exit_code == 2, result.output
    assert "Error: Class(es) d1 have no val images" in result.output
    assert not Store(store).paths.training_of("images-32", "cnn").exists()  # nothing trained
    with pytest.raises(FeatureStoreError, match="image_size must be at least 16"):
        run_train_cnn(TrainCnnConfig(store=store, image_size=8))


def test_base_preset_is_the_users_augmentation():
    base = PRESETS["base"]
    assert (base.shift, base.max_shift_y, base.brightness) == (0.1, 0.05, (0.95, 1.05))
    assert base.horizontal_flip and not base.vertical_flip
    layers = [type(layer).__name__ for layer in augmenter(base, 0).layers]
    assert layers == ["RandomFlip", "RandomTranslation"]  # no rotation, no zoom


def test_explain_writes_grad_cam_overlays_of_the_cnn(trained, tmp_path):
    store, _, _ = trained
    with Store(store).manifest() as manifest:
        rows = manifest.images(split="test").head(3)
        paths = [manifest.absolute_path(row) for _, row in rows.iterrows()]
    result = CliRunner().invoke(main, ["explain", *map(str, paths), "--store", str(store),
                                       "--model", "images-32/cnn", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "grad-cam of images-32/cnn: 3 overlays" in result.output
    overlays = sorted(tmp_path.glob("*.heatmap.png"))
    assert [p.name for p in overlays] == sorted(p.stem + ".heatmap.png" for p in paths)


def test_report_shows_a_heatmap_beside_each_misclassified_thumbnail(trained, tmp_path):
    from pipelines.explain.gallery import GalleryHeatmaps
    from pipelines.report import ReportConfig, run_report

    store, _, _ = trained
    with Store(store).manifest() as manifest:
        rows = manifest.images(split="test").head(2)
        images = [(row.image_id, manifest.absolute_path(row)) for _, row in rows.iterrows()]
    written, note = GalleryHeatmaps(Store(store), tmp_path)("images-32/cnn", images)
    assert note.startswith("Heatmaps: grad-cam") and set(written) == {i for i, _ in images}
    assert all((tmp_path / relative).stat().st_size > 0 for relative in written.values())
    run_report(ReportConfig(store=store, out=tmp_path / "report", map="pca", heatmaps=True),
               echo=lambda line: None)
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count('class="thumb"') == page.count('class="heatmap"')


def test_predict_scores_new_files_with_the_cnn_as_fit_time_did(trained, tmp_path):
    store, _, _ = trained
    ref = resolve_model_name(store, "images-32/cnn")
    held = pd.read_parquet(ref.path / HELDOUT_FILE).set_index("image_id")
    with Store(store).manifest() as manifest:
        rows = manifest.images(split="test").head(4)
        paths = [manifest.absolute_path(row) for _, row in rows.iterrows()]
    out = tmp_path / "pred.parquet"
    result = CliRunner().invoke(main, ["predict", *map(str, paths), "--store", str(store),
                                       "--model", "images-32/cnn", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out).set_index("image_id")
    columns = [c for c in held if c.startswith("proba_")]
    assert (frame["source"] == "pixels").all() and len(frame) == 4
    np.testing.assert_allclose(frame[columns], held.loc[frame.index, columns], atol=1e-5)
    assert (frame["predicted"] == held.loc[frame.index, "predicted"]).all()


def test_ingest_scores_new_scans_with_the_cnn_from_their_pixels(trained, tmp_path):
    from pipelines.ingest.session import IngestSession

    store, _, _ = trained
    ref = resolve_model_name(store, "images-32/cnn")
    held = pd.read_parquet(ref.path / HELDOUT_FILE).set_index("image_id")
    with Store(store).manifest() as manifest:
        row = manifest.images(split="test").iloc[0]
        path = manifest.absolute_path(row)
    rescan = tmp_path / "rescan.png"  # same pixels, other bytes: a new image to the store
    _rescan(path, rescan, "new scanner")
    session = IngestSession(Store(store), [], [ref])  # no table: the CNN reads pixels
    [outcome] = session.ingest([(rescan, "rescan.png")])
    assert outcome.new and not outcome.error, outcome
    scores = Store(store).scores(model="images-32/cnn").set_index("image_id")
    columns = [c for c in held if c.startswith("proba_")]
    np.testing.assert_allclose(scores.loc[[outcome.image_id], columns].to_numpy(),
                               held.loc[[row["image_id"]], columns].to_numpy(), atol=1e-5)


def test_report_shows_the_cost_of_an_epoch_beside_a_head_fit_and_their_ratio(trained, tmp_path):
    import re
    import shutil

    from featurestore import Lineage
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
    from pipelines.report import ReportConfig, run_report

    store = tmp_path / "store"
    shutil.copytree(trained[0], store)
    # A head on the same images' pixels (8 x 8), fitted for real, beside the trained CNN.
    splits = load_splits(Store(store), 8)
    lin = Lineage(backbone="pixels", weights="none", pool="max", input_size=8,
                  preprocessing="none")
    with Store(store).writer(lin, formats=("hdf5",)) as writer:
        for split, images in splits.splits.items():
            writer.append(images.pixels.reshape(len(images.labels), -1).astype(np.float32),
                          image_id=images.image_ids, label=images.labels,
                          split=[split] * len(images.labels))
    run_fit_heads(FitHeadsConfig(store=store, table=lin.key, heads=["logreg"], search="none",
                                 cv=2), echo=lambda line: None)
    page = run_report(ReportConfig(store=store, out=tmp_path / "report", map="pca"),
                      echo=lambda line: None).read_text()
    grid = page.split('<section id="leaderboard">')[1].split("</table>")[0]
    header = re.findall(r'<th class="text">([^<]*)</th>', grid)
    rows = {cells[header.index("head")]: dict(zip(header, cells)) for cells in (
        re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in grid.split("<tr>")[2:])}
    board = read_leaderboard(store).set_index("head")
    fit_sec, epoch_sec = board.loc["logreg", "refit_sec"], board.loc["cnn", "sec_per_epoch"]
    assert float(rows["cnn"]["sec_per_epoch"]) == pytest.approx(epoch_sec, abs=1e-3)
    assert float(rows["logreg"]["refit_sec"]) == pytest.approx(fit_sec, abs=1e-3)
    assert float(rows["cnn"]["x fastest head fit"]) == pytest.approx(epoch_sec / fit_sec,
                                                                      abs=1e-3)
    assert float(rows["logreg"]["x fastest head fit"]) == 1.0
    assert rows["cnn"]["accuracy"] != "-" and rows["logreg"]["accuracy"] != "-"
    assert "<code>x fastest head fit</code> divides either by the fastest head fit" in page


def test_resume_from_a_checkpoint_cut_off_by_a_kill_is_refused_in_one_line(trained, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(trained[0], store)
    best = Store(store).paths.training_of("images-32", "cnn") / "best.keras"
    best.write_bytes(best.read_bytes()[:1000])  # what a kill while Keras saves leaves
    result = CliRunner().invoke(main, ["train-cnn", "--store", str(store), "--image-size", "32",
                                       "--epochs", "2", "--positive-class", "d1",
                                       "--min-recall", "0.9", "--resume"])
    assert result.exit_code == 2, result.output
    assert "cannot be read" in result.output and "rerun without --resume" in result.output
