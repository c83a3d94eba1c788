"""The extraction runtimes: openvino computes keras' features, its converted model is cached
in the store and trusted only after a hash check, and the runtime is recorded, never keyed.

One OpenVINO conversion (DenseNet121 at 32 px, about 20 s) is shared by the module; the
cache mechanics are checked on that entry's real files. Every other backbone is checked by
the ``slow`` test and ``benchmarks/bench_extract.py zoo``.
"""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore import Store
from pipelines.backbones.registry import get_spec, list_backbones
from pipelines.extract import runtimes
from pipelines.extract.recipe import Recipe
from pipelines.extract.run import ExtractConfig, command, run_extract
from pipelines.extract.runtimes import TOLERANCE, model_cache
from pipelines.scan import ScanConfig, run_scan
from tests.image_zoo import gradient_rgb, image_folder, save

pytest.importorskip("openvino")
TINY = dict(weights="none", image_size=32, batch_size=8, progress=False, workers=1)


def sorted_table(store, pool):
    reader = Store(store).open(f"densenet121/{pool}")
    X, _, ids, _ = reader.to_numpy()
    order = np.argsort(ids, order=["image_id", "aug_id"])
    return reader.lineage, ids[order], X[order]


def max_relative_l2(a, b):
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtimes")
    image_folder(root / "images", n_per_class=4)
    out = {}
    for runtime in ("keras", "openvino"):
        out[runtime] = root / runtime
        result = run_extract(ExtractConfig(dataset=root / "images", store=out[runtime],
                                           runtime=runtime, **TINY))
        assert result.exit_code == 0 and result.views_written == 8
    return root, out


def openvino_settings(store):
    lineage = Store(store).open("densenet121/max").lineage
    return Recipe.from_lineage(lineage).engine_settings(8, Store(store).paths.openvino_cache)


def test_openvino_features_equal_keras_in_the_same_table_with_the_runtime_recorded(stores):
    _, paths = stores
    for pool in ("max", "avg"):
        lin_k, ids_k, X_k = sorted_table(paths["keras"], pool)
        lin_o, ids_o, X_o = sorted_table(paths["openvino"], pool)
        assert lin_o.key == lin_k.key  # the runtime is not part of the key
        assert (lin_k.runtime, lin_o.runtime) == ("keras", "openvino")
        assert json.loads((Store(paths["openvino"]).table_dir(lin_o) / "lineage.json")
                          .read_text())["runtime"] == "openvino"
        np.testing.assert_array_equal(ids_o, ids_k)
        assert max_relative_l2(X_o, X_k) <= TOLERANCE


def test_a_table_begun_by_keras_is_extended_by_openvino(stores, tmp_path):
    root, paths = stores
    store = tmp_path / "store"
    shutil.copytree(paths["keras"], store)
    shutil.copytree(Store(paths["openvino"]).paths.cache, Store(store).paths.cache)
    new = [save(root / "images" / name / "new.png", gradient_rgb(seed=900 + i))
           for i, name in enumerate(("cat_a", "cat_b"))]
    try:
        run_scan(ScanConfig(dataset=root / "images", store=store, progress=False))
        result = run_extract(ExtractConfig(dataset=root / "images", store=store,
                                           runtime="openvino", **TINY))
    finally:
        for path in new:
            path.unlink()
    assert (result.views_skipped, result.views_written) == (8, 2)  # the same table, extended
    lineage, ids, _ = sorted_table(store, "max")
    assert lineage.runtime == "keras" and len(ids) == 10


def test_the_converted_model_is_cached_checked_and_rebuilt_when_corrupt(stores):
    _, paths = stores
    settings = openvino_settings(paths["openvino"])
    fields = runtimes.get_runtime("openvino").cache_fields(settings)
    entry = model_cache.entry_dir(settings.cache_dir, fields)
    assert model_cache.verified(entry, fields)
    pristine = entry.parent / "pristine"
    shutil.copytree(entry, pristine)
    calls = []

    def rebuild(folder):  # what a conversion writes, without converting again
        calls.append(folder)
        for name in ("model.xml", "model.bin"):
            shutil.copy(pristine / name, folder / name)

    assert model_cache.cached(settings.cache_dir, fields, rebuild) == (entry, True)
    assert calls == []  # a hit reads the entry, it does not convert
    with open(entry / "model.bin", "r+b") as f:  # flip bytes in the weights
        f.seek(1000)
        f.write(b"\xff" * 64)
    assert not model_cache.verified(entry, fields)
    assert model_cache.cached(settings.cache_dir, fields, rebuild) == (entry, False)
    assert len(calls) == 1 and model_cache.verified(entry, fields)
    (entry / "entry.json").write_text("{not json")
    assert model_cache.cached(settings.cache_dir, fields, rebuild)[1] is False
    shutil.rmtree(pristine)


def test_another_weights_file_input_size_or_version_is_another_cache_entry(stores):
    _, paths = stores
    settings = openvino_settings(paths["openvino"])
    ov = runtimes.get_runtime("openvino")
    fields = ov.cache_fields(settings)
    entries = {model_cache.entry_dir(settings.cache_dir, fields)}
    for change in ({"weights": "ab" * 32}, {"input_size": 64}, {"openvino": "2099.1"}):
        entries.add(model_cache.entry_dir(settings.cache_dir, {**fields, **change}))
    assert len(entries) == 4
    import dataclasses
    other = dataclasses.replace(settings, weights_sha256="cd" * 32, seed=0)
    assert ov.cache_fields(other)["weights"] == "cd" * 32 != fields["weights"]


def test_openvino_features_of_a_view_do_not_depend_on_its_batch(stores):
    """The openvino runtime computes each view alone over its streams: reordering the
    batch, or padding it, changes no row by a single bit, and padding is not computed."""
    from pipelines.extract.engine import FeatureEngine

    _, paths = stores
    engine = FeatureEngine(openvino_settings(paths["openvino"]))
    pixels = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    full, reordered, padded = (engine.embed(pixels, 8), engine.embed(pixels[::-1].copy(), 8),
                               engine.embed(pixels, 5))
    for pool in engine.settings.pools:
        assert full[pool].shape == (8, 1024) and padded[pool].shape == (5, 1024)
        np.testing.assert_array_equal(reordered[pool][::-1], full[pool])
        np.testing.assert_array_equal(padded[pool], full[pool][:5])
    assert engine.embed(pixels, 0)["max"].shape == (0, 1024)
    assert runtimes.get_runtime("openvino").STREAMS  # so extract runs one process for it


def test_default_runtime_is_openvino_on_cpu_and_keras_for_bfloat16(monkeypatch):
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    assert runtimes.default_runtime("densenet121", "float32") == "openvino"
    assert runtimes.default_runtime("densenet121", "bfloat16") == "keras"
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "keras")
    assert runtimes.default_runtime("densenet121", "float32") == "keras"


def test_openvino_refuses_bfloat16_in_one_line(tmp_path):
    image_folder(tmp_path / "images", n_per_class=1)
    out = CliRunner().invoke(command, [str(tmp_path / "images"), "--store", str(tmp_path / "s"),
                                       "--weights", "none", "--precision", "bfloat16",
                                       "--runtime", "openvino", "--quiet"])
    assert out.exit_code == 2
    assert out.output.startswith("Error: runtime 'openvino' cannot run backbone "
                                 "'densenet121' at bfloat16: it computes float32 only")
    assert len(out.output.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list_backbones())
def test_every_backbone_converts_and_matches_keras_or_is_refused(backbone, tmp_path):
    reason = runtimes.why_not("openvino", backbone, "float32")
    if reason:
        pytest.skip(f"refused: {reason}")
    size = max(32, get_spec(backbone).min_input_size)
    image_folder(tmp_path / "images", n_per_class=2)
    tables = {}
    for runtime in ("keras", "openvino"):
        run_extract(ExtractConfig(dataset=tmp_path / "images", store=tmp_path / runtime,
                                  backbone=backbone, runtime=runtime,
                                  **{**TINY, "image_size": size}))
        reader = Store(tmp_path / runtime).open(f"{backbone}/avg")
        X, _, ids, _ = reader.to_numpy()
        tables[runtime] = X[np.argsort(ids, order=["image_id", "aug_id"])]
    assert max_relative_l2(tables["openvino"], tables["keras"]) <= TOLERANCE
