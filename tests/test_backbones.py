"""Backbone registry conformance: every registered backbone, random weights, tiny inputs."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.backbones.registry import (create_backbone, get_spec, list_backbones, pooled_model,
                                 preprocess)
from pipelines.backbones.weights import WeightsError, resolve_weights

# Keras' TensorFlow backend converts variables with np.array(x) (numpy 2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
ALL = list_backbones()


def tiny_batch(spec, n=2, seed=0):
    size = spec.min_input_size
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_registry_lists_the_keras_applications():
    assert ALL == ["densenet121", "densenet169", "densenet201", "efficientnetb0",
                   "resnet50", "xception"]


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match=r"Unknown backbone 'densenet12'\. Available: densenet121, "):
        get_spec("densenet12")


@pytest.mark.parametrize("name", ALL)
def test_feature_width_and_both_pools(name):
    spec = get_spec(name)
    model = pooled_model(create_backbone(name, input_size=spec.min_input_size), ("max", "avg"))
    x = preprocess(tiny_batch(spec), spec.preprocessing)
    maxed, mean = model.predict_on_batch(x)
    assert maxed.shape == mean.shape == (2, spec.feature_dim)
    assert maxed.dtype == np.float32
    assert np.all(maxed >= mean - 1e-5)  # max of a set is never below its mean


@pytest.mark.parametrize("name", ALL)
def test_preprocessing_matches_keras(name):
    from keras.applications import imagenet_utils

    spec = get_spec(name)
    x = tiny_batch(spec)
    ours = preprocess(x.copy(), spec.preprocessing)
    if spec.preprocessing == "raw":
        expected = x  # the model rescales its own input
    else:
        expected = imagenet_utils.preprocess_input(x.copy(), mode=spec.preprocessing)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)


def test_below_minimum_input_size_is_refused():
    with pytest.raises(ValueError, match="image_size must be at least 71 for backbone 'xception'; got 32"):
        create_backbone("xception", input_size=32)


def test_one_pass_pools_equal_keras_pooling_models():
    import keras

    base = create_backbone("densenet121", input_size=32, seed=3)
    both = pooled_model(base, ("max", "avg")).predict_on_batch(tiny_batch(get_spec("densenet121")))
    for pool, got in zip(("max", "avg"), both):
        reference = keras.applications.DenseNet121(
            include_top=False, weights=None, input_shape=(32, 32, 3), pooling=pool)
        reference.set_weights(base.get_weights())
        np.testing.assert_allclose(
            got, reference.predict_on_batch(tiny_batch(get_spec("densenet121"))), rtol=1e-5, atol=1e-6)


def weights_digest(model):
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()


def test_random_init_is_seeded_and_leaves_global_rngs_alone():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = create_backbone("resnet50", input_size=32, seed=0)
    assert np.random.rand() == expected_next
    assert weights_digest(a) == weights_digest(create_backbone("resnet50", input_size=32, seed=0))
    assert weights_digest(a) != weights_digest(create_backbone("resnet50", input_size=32, seed=1))


def test_weights_none_is_random_with_seed():
    resolved = resolve_weights(get_spec("densenet121"), "none", seed=4)
    assert (resolved.identity, resolved.path, resolved.sha256) == ("random:4", None, None)


def test_weights_file_round_trip_and_sha(tmp_path):
    source = create_backbone("efficientnetb0", input_size=32, seed=7)
    path = tmp_path / "b0.weights.h5"
    source.save_weights(path)
    resolved = resolve_weights(get_spec("efficientnetb0"), str(path))
    assert resolved.identity == "file:b0.weights.h5"
    assert resolved.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = create_backbone("efficientnetb0", input_size=32, seed=0, weights_path=resolved.path)
    assert weights_digest(loaded) == weights_digest(source)


def test_weights_of_another_architecture_fail_clearly(tmp_path):
    path = tmp_path / "resnet.weights.h5"
    create_backbone("resnet50", input_size=32).save_weights(path)
    with pytest.raises(WeightsError, match=r"resnet\.weights\.h5' does not fit backbone 'densenet121'"):
        create_backbone("densenet121", input_size=32, weights_path=str(path))


def test_weights_with_classification_top_are_named_as_such(tmp_path):
    import keras

    path = tmp_path / "top.weights.h5"
    keras.applications.ResNet50(weights=None, include_top=True, input_shape=(32, 32, 3),
                                classes=3).save_weights(path)
    with pytest.raises(WeightsError, match="look like a classification top"):
        create_backbone("resnet50", input_size=32, weights_path=str(path))


@pytest.mark.parametrize("value, message", [
    ("imagenett", "weights must be 'imagenet', 'none' or a path"),
    ("missing.weights.h5", "which does not exist"),
])
def test_bad_weights_value_names_what_is_allowed(value, message):
    with pytest.raises(WeightsError, match=message):
        resolve_weights(get_spec("densenet121"), value)


def test_imagenet_offline_and_uncached_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = get_spec("densenet121")
    # Port 9 on localhost refuses at once: offline whatever this machine's network.
    offline = dataclasses.replace(spec, weights_url="http://127.0.0.1:9/" + spec.weights_file)
    with pytest.raises(WeightsError) as info:
        resolve_weights(offline, "imagenet")
    text = str(info.value)
    assert "--weights PATH" in text and offline.weights_url in text
    assert str(tmp_path / "keras" / "models" / spec.weights_file) in text


def test_imagenet_uses_the_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = get_spec("resnet50")
    cached = tmp_path / "keras" / "models" / spec.weights_file
    cached.parent.mkdir(parents=True)
    create_backbone("resnet50", input_size=32).save_weights(tmp_path / "w.weights.h5")
    cached.write_bytes((tmp_path / "w.weights.h5").read_bytes())
    md5 = hashlib.md5(cached.read_bytes()).hexdigest()
    offline_spec = dataclasses.replace(spec, weights_url="http://offline.invalid/" + spec.weights_file,
                                       weights_md5=md5)
    resolved = resolve_weights(offline_spec, "imagenet")
    assert resolved.path == str(cached) and resolved.identity == "imagenet"


def test_backbones_import_without_keras():
    code = "import sys, pipelines.backbones.registry, pipelines.extract.loader; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'jax'))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []

