"""Recipe <-> Lineage: one mapping both ways, for every registered backbone (pure data, no model)."""

import dataclasses
import itertools

import pytest

from featurestore import Lineage, LineageMismatchError
from pipelines.backbones.registry import POOLS, get_spec, list_backbones
from pipelines.extract.augment import PRESETS
from pipelines.extract.engine import PRECISIONS
from pipelines.extract.images import DEFAULT_MAX_PIXELS
from pipelines.extract.recipe import Augmentation, Recipe, library_versions
from pipelines.extract.run import ExtractConfig

AUGMENTATIONS = [None] + sorted(PRESETS)
CASES = list(itertools.product(list_backbones(), POOLS, PRECISIONS, AUGMENTATIONS))


def recipe_for(backbone, pool, precision, preset, **overrides):
    spec = get_spec(backbone)
    fields = dict(backbone=backbone, weights="random:3", pools=(pool,),
                  input_size=spec.min_input_size + 1, precision=precision,
                  augmentation=Augmentation(preset, views=2, seed=3, splits=("val", "train"))
                  if preset else None)
    return Recipe(**{**fields, **overrides})


@pytest.mark.parametrize("backbone, pool, precision, preset", CASES)
def test_recipe_lineage_recipe_is_identity_and_the_key_is_stable(backbone, pool, precision,
                                                                  preset):
    recipe = recipe_for(backbone, pool, precision, preset)
    versions = library_versions(precision, preset is not None)
    lineage = recipe.to_lineage(pool, versions=versions)
    stored = Lineage.from_dict(lineage.to_dict())  # as lineage.json is read back
    again = Recipe.from_lineage(stored)
    assert again == recipe
    assert again.to_lineage(pool, versions=versions).key == lineage.key == stored.key
    assert Lineage.from_json(lineage.to_json()) == lineage  # as each part file carries it
    assert (lineage.precision, lineage.runtime) == (precision, "keras")
    assert lineage.name.startswith(f"{backbone}/{pool}/{recipe.input_size}")
    assert (f"+{preset}" in lineage.name) == bool(preset)
    assert ("@" in lineage.name) == (precision != "float32")


def test_engine_settings_come_from_the_lineage_alone():
    recipe = recipe_for("densenet121", "avg", "bfloat16", "strong", max_pixels=5_000)
    lineage = recipe.to_lineage("avg")
    assert lineage.key == dataclasses.replace(recipe, max_pixels=DEFAULT_MAX_PIXELS) \
        .to_lineage("avg").key  # the file-size limit is recorded, never hashed
    settings = Recipe.from_lineage(Lineage.from_dict(lineage.to_dict())).engine_settings(4)
    assert (settings.seed, settings.precision, settings.pools) == (3, "bfloat16", ("avg",))
    assert settings.recipe.max_pixels == 5_000
    assert settings.recipe.interpolation == get_spec("densenet121").interpolation
    assert (settings.input_size, settings.recipe.size) == (recipe.input_size,) * 2


def test_a_bfloat16_lineage_from_before_precision_was_a_field_runs_in_bfloat16():
    old = Lineage(backbone="densenet121", weights="random:0", pool="max", input_size=32,
                  preprocessing="torch", library_versions={"compute_dtype": "bfloat16"})
    assert Recipe.from_lineage(old).engine_settings().precision == "bfloat16"


def test_config_becomes_the_recipe_and_bad_settings_fail_before_weights_are_resolved(tmp_path):
    config = ExtractConfig(dataset=tmp_path, store=tmp_path / "s", weights="none", seed=4,
                           augment=2, augment_preset="mild", augment_splits=("train",))
    recipe = Recipe.from_config(config)
    assert (recipe.weights, recipe.weights_seed, recipe.input_size) == ("random:4", 4, 224)
    assert recipe.augmentation == Augmentation("mild", 2, 4, ("train",))
    assert set(recipe.lineages()) == set(POOLS)
    too_small = dataclasses.replace(config, backbone="xception", image_size=32,
                                    weights="imagenet")  # not cached here: would fail later
    with pytest.raises(ValueError, match="at least 71"):
        Recipe.from_config(too_small)
    with pytest.raises(ValueError, match="precision must be one of"):
        Recipe.from_config(dataclasses.replace(config, precision="float16"))


def test_a_file_recipe_needs_its_file_and_cannot_run_unresolved():
    lineage = Lineage(backbone="densenet121", weights="file:scanner.h5", pool="max",
                      input_size=32, preprocessing="torch", weights_sha256="ab" * 32)
    recipe = Recipe.from_lineage(lineage)
    with pytest.raises(LineageMismatchError, match="pass that file"):
        recipe.with_weights_file(None)
    with pytest.raises(LineageMismatchError, match="not resolved"):
        recipe.engine_settings()
