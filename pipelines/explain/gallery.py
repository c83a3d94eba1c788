"""Heatmaps for the report's galleries: one overlay per thumbnail, or a note saying why not."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore import FeatureStoreError, Store
from pipelines.explain import heatmaps
from pipelines.extract.images import ImageDecodeError, load_image

HEATMAPS_DIR = "heatmaps"


class GalleryHeatmaps:
    """``writer(model_name, [(image_id, path), ...])`` -> ``({image_id: relative png}, note)``."""

    def __init__(self, store: Store, out_dir: Path):
        self.store, self.out_dir = store, Path(out_dir)

    def __call__(self, name: str, images: list[tuple[str, Path]]) -> tuple[dict, str | None]:
        from pipelines.explain.run import Explainer

        if not images:
            return {}, None
        try:
            explainer = Explainer(self.store, name)
        except (FeatureStoreError, ValueError) as err:
            return {}, f"No heatmaps: {err}"
        pixels, kept = [], []
        for image_id, path in images:
            try:
                pixels.append(load_image(str(path), (explainer.size, explainer.size)))
                kept.append(image_id)
            except ImageDecodeError:
                continue  # the thumbnail shows a placeholder already
        if not pixels:
            return {}, None
        maps, _ = explainer.explain(np.stack(pixels), None)
        folder = self.out_dir / HEATMAPS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for image_id, image, heatmap in zip(kept, pixels, maps):
            relative = f"{HEATMAPS_DIR}/{_slug(name)}-{image_id[:16]}.png"
            heatmaps.overlay(image, heatmap, self.out_dir / relative)
            written[image_id] = relative
        return written, f"Heatmaps: {explainer.method} of the predicted class."


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
