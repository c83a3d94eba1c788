"""Heatmaps for the report's and the audit's galleries: one overlay per thumbnail, or why not."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featurestore import FeatureStoreError, Store
from pipelines.explain import heatmaps
from pipelines.extract.images import ImageDecodeError, load_image

HEATMAPS_DIR = "heatmaps"


class GalleryHeatmaps:
    """``writer(model name(s), [(image_id, path), ...])`` -> ``({image_id: relative png}, note)``.

    Given several names (the heads an audit averaged), the first that can be
    explained draws every heatmap.
    """

    def __init__(self, store: Store, out_dir: Path):
        self.store, self.out_dir = store, Path(out_dir)

    def __call__(self, names: str | Sequence[str],
                 images: list[tuple[str, Path]]) -> tuple[dict, str | None]:
        if not images:
            return {}, None
        explainer, why = self._explainer([names] if isinstance(names, str) else names)
        if explainer is None:
            return {}, f"No heatmaps: {why}"
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
            relative = f"{HEATMAPS_DIR}/{_slug(explainer.ref.name)}-{image_id[:16]}.png"
            heatmaps.overlay(image, heatmap, self.out_dir / relative)
            written[image_id] = relative
        return written, f"Heatmaps: {explainer.method} of {explainer.ref.name}'s predicted class."

    def _explainer(self, names: Sequence[str]):
        """``(Explainer, None)`` of the first name that can be explained, else ``(None, why)``."""
        from pipelines.explain.run import Explainer

        reasons = []
        for name in names:
            try:
                return Explainer(self.store, name), None
            except (FeatureStoreError, ValueError) as err:
                reasons.append(str(err))
        return None, " ".join(reasons) or "no model named."


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
