"""Where a model looks: class activation maps and Grad-CAM, ``(n, h, w)`` per image.

* :func:`linear_cam`: a linear head (``logreg``) on avg-pooled features is
  exact. Its logit for class c is ``sum_k w_ck (mean_ij A_k(i, j) - mu_k) / s_k
  + b_c``, so ``M_c(i, j) = sum_k (w_ck / s_k) A_k(i, j)`` averages to the
  logit up to a constant: the map is the head's own decision, spread over the
  backbone's last feature map ``A``.
* :func:`grad_cam`: everything else that is differentiable (a ``keras_dense``
  head or a linear head on max pooling stacked on the backbone, a CNN, a
  fine-tuned model): the feature map weighted by the mean gradient of the
  class's log-probability, ReLU (Selvaraju et al., 2017).
"""

from __future__ import annotations

import numpy as np


def linear_weights(estimator) -> tuple[np.ndarray, np.ndarray]:
    """``(W (n_classes, d), b (n_classes,))`` of a logreg head on *raw* features.

    The standardisation is folded in: ``logit = W @ x + b``. Binary logistic
    regression has one row ``z`` (class 1); the classes get ``-z/2`` and
    ``z/2``, since ``softmax([-z/2, z/2]) = sigmoid(z)``, so each class's map
    is the evidence for it against the other.
    """
    scaler, linear = estimator.pipeline_[0], estimator.pipeline_[-1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    W = linear.coef_ / scale
    b = linear.intercept_ - W @ scaler.mean_
    if W.shape[0] == 1:
        W, b = np.vstack([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
    return W, b


def linear_cam(feature_maps: np.ndarray, W: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` maps of ``feature_maps (n, h, w, d)`` for class index ``classes (n,)``."""
    return np.einsum("nhwd,nd->nhw", feature_maps, W[classes])


def linear_as_keras(W: np.ndarray, b: np.ndarray):
    """The linear head as a Keras softmax layer on raw features (for Grad-CAM)."""
    import keras

    layer = keras.layers.Dense(W.shape[0], activation="softmax", name="linear_head")
    layer.build((None, W.shape[1]))
    layer.set_weights([W.T.astype(np.float32), b.astype(np.float32)])
    return keras.Sequential([keras.Input((W.shape[1],)), layer])


def grad_cam_probe(model):
    """``pixels -> [feature map, probabilities]``: a nested backbone's map, else the last conv's.

    A nested backbone's ``output`` belongs to its own graph, so a stacked model
    (``pixels -> backbone -> pooling -> head``, a chain) is called again, layer
    by layer, to get its map in the outer graph.
    """
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)
              and len(layer.output.shape) == 4]
    if nested:
        fmap = out = nested[0](model.inputs[0])
        for layer in model.layers[model.layers.index(nested[0]) + 1:]:
            out = layer(out)
        return keras.Model(model.inputs, [fmap, out])
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise ValueError(f"Model {model.name} has no convolutional feature map to explain.")
    return keras.Model(model.inputs, [convs[-1].output, model.output])


def grad_cam(model, pixels: np.ndarray, classes: np.ndarray | None = None,
             batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(maps (n, h, w), probabilities (n, n_classes))``; ``classes`` default: the predicted."""
    import tensorflow as tf

    probe = grad_cam_probe(model)
    maps, probas = [], []
    for start in range(0, len(pixels), batch_size):
        x = tf.convert_to_tensor(pixels[start:start + batch_size], tf.float32)
        with tf.GradientTape() as tape:
            fmap, proba = probe(x, training=False)
            chosen = tf.argmax(proba, axis=1) if classes is None else \
                tf.constant(classes[start:start + batch_size], tf.int64)
            score = tf.math.log(tf.gather(proba, chosen, axis=1, batch_dims=1) + 1e-12)
        grads = tape.gradient(score, fmap)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        maps.append(tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1)).numpy())
        probas.append(proba.numpy())
    return np.concatenate(maps), np.concatenate(probas)


def peak_quadrant(heatmap: np.ndarray) -> tuple[int, int]:
    """``(row half, column half)`` of the map's maximum: (0, 0) is the top-left quadrant."""
    h, w = heatmap.shape
    i, j = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    return int(2 * i >= h), int(2 * j >= w)


def overlay(image: np.ndarray, heatmap: np.ndarray, path, alpha: float = 0.45) -> None:
    """Write ``image (h, w, 3)`` 0..255 with ``heatmap`` (any size) on top, as a PNG."""
    from matplotlib import colormaps
    from PIL import Image

    span = float(heatmap.max() - heatmap.min())
    scaled = (heatmap - heatmap.min()) / span if span > 0 else np.zeros_like(heatmap)
    h, w = image.shape[:2]
    resized = np.asarray(Image.fromarray((scaled * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    colour = colormaps["jet"](resized)[..., :3] * 255.0
    blend = (1 - alpha) * np.asarray(image, np.float32) + alpha * colour
    Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8)).save(path)
