"""``featurestore explain IMAGE... --model M``: overlay PNGs of where a saved model looks.

A ``logreg`` head on an avg-pooled table gets its exact class activation map;
a ``keras_dense`` head (or ``logreg`` on max pooling) is stacked on the
table's backbone recipe and explained with Grad-CAM, as are end-to-end models
(``train-cnn``, ``fine-tune``). Each image is explained for the class the
model predicts (argmax) unless ``--class`` names one. Other heads (SVMs,
XGBoost, k-NN) have no gradient to follow and are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from pipelines.explain import heatmaps
from pipelines.extract.images import ImageDecodeError, load_image
from pipelines.heads.model_folder import read_record
from pipelines.heads.models import load_model, record_lineage, resolve_model_name

#: Heads explained exactly (avg pooling) or through a Keras stand-in (max pooling).
LINEAR_HEADS = ("logreg",)
KERAS_HEADS = ("keras_dense",)
SUFFIX = ".heatmap.png"
EAGER_MAX_IMAGES = 256


@dataclass
class ExplainConfig:
    store: Path
    model: str
    """Any name ``predict --model`` takes, or an end-to-end model (``images-150/cnn``)."""
    images: Sequence[Path] = ()
    out: Path = Path("heatmaps")
    """Folder for ``<image stem>.heatmap.png``; created if missing."""
    class_label: str | None = None
    """Explain this class for every image (default: each image's predicted class)."""
    weights: str | None = None
    """Weights file of a table computed from ``file:<name>`` weights."""


@dataclass
class ExplainResult:
    method: str
    """``cam`` (exact, linear head on avg pooling) or ``grad-cam``."""
    frame: pd.DataFrame
    """One row per image: path, explained class, its probability, peak_row, peak_col, overlay."""
    maps: list[np.ndarray] = field(default_factory=list)
    """``(h, w)`` heatmap per explained image, at the feature map's resolution."""


class Explainer:
    """A saved model ready to explain images: input recipe plus the map function."""

    def __init__(self, store: Store, name: str, weights: str | None = None):
        from pipelines.cnn.saved import END_TO_END, load_end_to_end

        self.ref = resolve_model_name(store, name)
        meta = read_record(self.ref.path)
        self.classes = [str(c) for c in meta.get("classes") or []]
        self.size, self.recipe = meta.get("recipe", {}).get("params", {}).get("image_size"), None
        if meta.get("lineage"):
            self.lineage = record_lineage(self.ref.path, meta)
            self.recipe = _recipe(self.lineage, weights)
            self.size = self.recipe.input_size
        if meta.get("kind") == END_TO_END:
            self.method, self.model = "grad-cam", load_end_to_end(self.ref.path, meta)
            return
        head = load_model(store, self.ref.table_key, self.ref.head, view=self.ref.view)
        self.classes = [str(c) for c in head.classes]
        self._from_head(meta["head"], head)

    def _from_head(self, name: str, head) -> None:
        from pipelines.finetune.stack import stack

        if name in LINEAR_HEADS:
            W, b = heatmaps.linear_weights(head.estimator)
            if self.lineage.pool == "avg":
                from pipelines.backbones.registry import create_backbone

                self.method, self.W, self.b = "cam", W, b
                self.model = create_backbone(self.recipe.backbone, input_size=self.size,
                                             weights_path=self.recipe.weights_path,
                                             seed=self.recipe.weights_seed)
                return
            keras_head = heatmaps.linear_as_keras(W, b)
        elif name in KERAS_HEADS:
            keras_head = head.estimator.model_
        else:
            raise FeatureStoreError(
                f"Model {self.ref.name} is a {name!r} head, which has no gradient to follow; "
                f"explain takes {', '.join(LINEAR_HEADS + KERAS_HEADS)} heads, train-cnn and "
                f"fine-tune models.")
        self.method, self.model = "grad-cam", stack(self.recipe, self.lineage, keras_head)[0]

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """What the model takes: preprocessed pixels for a table's recipe, else 0..255."""
        from pipelines.backbones.registry import preprocess

        return preprocess(pixels.copy(), self.recipe.preprocessing) if self.recipe else pixels

    def explain(self, pixels: np.ndarray, class_index: int | None):
        """``(maps (n, h, w), probabilities (n, n_classes))`` of ``pixels (n, s, s, 3)`` 0..255."""
        x = self.inputs(pixels)
        if self.method == "grad-cam":
            chosen = None if class_index is None else np.full(len(x), class_index)
            return heatmaps.grad_cam(self.model, x, chosen)
        fmaps = _feature_maps(self.model, x)
        logits = fmaps.mean(axis=(1, 2)) @ self.W.T + self.b
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba /= proba.sum(axis=1, keepdims=True)
        chosen = proba.argmax(1) if class_index is None else np.full(len(x), class_index)
        return heatmaps.linear_cam(fmaps, self.W, chosen), proba


def _feature_maps(backbone, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """``(n, h, w, d)`` backbone outputs of ``x``.

    A gallery's few dozen images are called eagerly: ``predict`` first traces
    a graph (~10 s for DenseNet121 on 2 busy cores, 5x the eager call of 8
    images), which pays off only for a few hundred images.
    """
    import keras

    if len(x) > EAGER_MAX_IMAGES:
        return keras.ops.convert_to_numpy(backbone.predict(x, verbose=0))
    return np.concatenate([keras.ops.convert_to_numpy(backbone(x[i:i + batch_size],
                                                               training=False))
                           for i in range(0, len(x), batch_size)])


def _recipe(lineage, weights):
    from pipelines.finetune.run import _recipe_of

    return _recipe_of(lineage, weights)


def run_explain(config: ExplainConfig, echo: Callable[[str], None] = print) -> ExplainResult:
    """Heatmaps of ``config.images`` under ``config.model``, written as overlay PNGs."""
    if not config.images:
        raise FeatureStoreError("explain needs at least one image file.")
    explainer = Explainer(Store(config.store, create=False), config.model, config.weights)
    class_index = None
    if config.class_label is not None:
        if config.class_label not in explainer.classes:
            raise FeatureStoreError(f"class {config.class_label!r} is not a class of "
                                    f"{explainer.ref.name}: {', '.join(explainer.classes)}.")
        class_index = explainer.classes.index(config.class_label)
    pixels, paths = [], []
    for path in config.images:
        try:
            pixels.append(load_image(str(path), (explainer.size, explainer.size)))
            paths.append(Path(path))
        except ImageDecodeError as err:
            echo(f"skipped {path}: {err.reason}")
    if not pixels:
        raise FeatureStoreError("None of the images could be read.")
    maps, proba = explainer.explain(np.stack(pixels), class_index)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (path, image, heatmap) in enumerate(zip(paths, pixels, maps)):
        target = out / (path.stem + SUFFIX)
        heatmaps.overlay(image, heatmap, target)
        shown = class_index if class_index is not None else int(proba[k].argmax())
        row, col = heatmaps.peak_quadrant(heatmap)
        rows.append({"path": str(path), "class": explainer.classes[shown],
                     "probability": float(proba[k, shown]), "peak_row": row, "peak_col": col,
                     "overlay": str(target)})
    echo(f"{explainer.method} of {explainer.ref.name}: {len(rows)} overlays in {out}.")
    return ExplainResult(explainer.method, pd.DataFrame(rows), list(maps))


class _CommandFailed(click.ClickException):
    exit_code = 2


@click.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False,
                                                                    path_type=Path))
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", required=True, help="Saved model, e.g. densenet121/avg/logreg.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="heatmaps",
              show_default=True, help="Folder for the overlay PNGs.")
@click.option("--class", "class_label", default=None,
              help="Class to explain [default: each image's predicted class].")
@click.option("--weights", default=None, help="Weights file of a table computed from a file.")
def command(images, store, model, out, class_label, weights):
    """Write heatmaps of where a saved model looks in each image."""
    try:
        result = run_explain(ExplainConfig(store=store, model=model, images=images, out=out,
                                           class_label=class_label, weights=weights),
                             echo=click.echo)
    except (FeatureStoreError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
    click.echo(result.frame.drop(columns=["overlay"]).to_string(index=False))
