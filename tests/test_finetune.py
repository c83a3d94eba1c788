"""fine-tune: the table's backbone + its saved Keras head reproduce the head, then train without collapse."""

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from featurestore import Lineage, Store
from pipelines.backbones.registry import create_backbone
from pipelines.cli import main
from pipelines.extract import ExtractConfig, run_extract
from pipelines.finetune import FineTuneConfig, run_fine_tune
from pipelines.finetune import stack
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.leaderboard import read_leaderboard
from pipelines.heads.models import resolve_model_name
from tests.digit_store import digit_store


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    store = digit_store(root, digits=(0, 1), per_class=40)
    table = run_extract(ExtractConfig(dataset=root / "data", store=store, pool="max",
                                      weights="none", image_size=32, workers=1,
                                      progress=False)).tables["max"]
    run_fit_heads(FitHeadsConfig(store=store, table=table, heads=["keras_dense", "logreg"],
                                 search="none", cv=2), echo=lambda line: None)
    result = run_fine_tune(FineTuneConfig(store=store, model="keras_dense", epochs=1,
                                          unfreeze="conv5_block16"), echo=lambda line: None)
    return store, table, result


@pytest.mark.slow  # ~4 min on 2 loaded cores; benchmarks/bench_models.py runs the same path
def test_stack_reproduces_the_head_and_fine_tuning_does_not_collapse(tuned):
    store, table, result = tuned
    assert result.reproduce_diff <= stack.REPRODUCE_ATOL
    assert result.val_accuracy[0] >= result.head_val_accuracy - 0.02
    board = read_leaderboard(store)
    row = board[board["head"] == "keras_dense+ft"].iloc[0]
    assert row["table_key"] == table and row["eval_split"] == "test" and row["sec_per_epoch"] > 0
    assert resolve_model_name(store, "densenet121/max/keras_dense+ft").table_key == table


@pytest.mark.slow
def test_no_batch_normalization_layer_of_densenet_ran_in_training_mode(tuned):
    store, table, result = tuned
    backbone = next(layer for layer in result.model.layers if isinstance(layer, keras.Model)
                    and layer.name.startswith("densenet"))
    fresh = create_backbone("densenet121", input_size=32, seed=0)  # random:0, as extracted
    norms = [layer for layer in backbone.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:  # training mode would have moved the statistics
        original = fresh.get_layer(layer.name)
        np.testing.assert_array_equal(layer.moving_mean, original.moving_mean, layer.name)
        np.testing.assert_array_equal(layer.moving_variance, original.moving_variance)
    pixels = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    stack.check_inference_bn(backbone, pixels)
    norms[-1].trainable = True  # what training=True on an unfrozen block would do
    with pytest.raises(Exception, match="runs in training mode"):
        stack.check_inference_bn(backbone, pixels)


@pytest.mark.slow
def test_a_stack_that_does_not_reproduce_the_head_is_refused(tuned):
    store, _, result = tuned
    folder = resolve_model_name(store, "keras_dense+ft").path
    model = result.model
    held = pd.read_parquet(folder / "heldout.parquet")
    pixels = np.zeros((len(held), 32, 32, 3), np.float32)
    proba = model.predict(pixels, verbose=0)
    shifted = held.assign(proba_d0=proba[:, 0] + 1e-3, proba_d1=proba[:, 1] - 1e-3)
    with pytest.raises(Exception, match="does not reproduce the saved held-out"):
        stack.check_reproduces(model, pixels, held["image_id"].tolist(), shifted,
                               ["d0", "d1"], "m")


def _hand_table(store: Path, **lineage):
    lin = Lineage(backbone="densenet121", pool="max", preprocessing="torch", **lineage)
    rng = np.random.default_rng(0)
    with Store(store).writer(lin) as writer:
        writer.append(rng.normal(size=(20, 4)).astype(np.float32),
                      image_id=[f"{i:064x}" for i in range(20)], label=["a", "b"] * 10,
                      split=["train"] * 20)
    run_fit_heads(FitHeadsConfig(store=store, table=lin.key, heads=["logreg"], search="none",
                                 cv=2), echo=lambda line: None)
    return lin


@pytest.mark.parametrize("lineage, args, message", [
    ({"weights": "file:w.h5", "weights_sha256": "0" * 64, "input_size": 32}, [],
     "was computed with weights 'file:w.h5'; pass that file"),
    ({"weights": "file:w.h5", "weights_sha256": "0" * 64, "input_size": 32},
     ["--weights", "gone/w.h5"], "got 'gone/w.h5', which does not exist"),
    ({"weights": "random:0", "input_size": 16}, [], "image_size must be at least 32"),
])
def test_a_recipe_that_cannot_be_rebuilt_is_refused_before_training(tmp_path, lineage, args,
                                                                     message):
    lin = _hand_table(tmp_path, **lineage)
    result = CliRunner().invoke(main, ["fine-tune", "--store", str(tmp_path), "--model",
                                       f"{lin.key}/logreg", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not Store(tmp_path).paths.training.exists()  # nothing trained


def test_a_head_that_is_not_keras_is_refused(tmp_path):
    lin = _hand_table(tmp_path, weights="random:0", input_size=32)
    result = CliRunner().invoke(main, ["fine-tune", "--store", str(tmp_path), "--model",
                                       f"{lin.key}/logreg"])
    assert result.exit_code == 2, result.output
    assert "is a 'logreg' head, not a Keras head" in result.output


def test_unfreezing_a_block_keeps_its_batch_normalization_in_inference_mode():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv4_block1_conv")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv5_block1_conv")(x)
    backbone = keras.Model(inputs, keras.layers.BatchNormalization(name="conv5_block1_bn")(x))
    assert stack.unfreeze(backbone, "conv5") == 1
    assert [layer.name for layer in backbone.layers if layer.trainable] == ["conv5_block1_conv"]
    pixels = np.random.default_rng(0).normal(5, 3, size=(4, 8, 8, 3)).astype(np.float32)
    stack.check_inference_bn(backbone, pixels)
    backbone.get_layer("conv5_block1_bn").trainable = True
    with pytest.raises(Exception, match="runs in training mode .*trainable: conv5_block1_bn"):
        stack.check_inference_bn(backbone, pixels)
    with pytest.raises(Exception, match="No layer of .* starts with 'conv9'"):
        stack.unfreeze(backbone, "conv9")
