"""A scanned store of real digit scans (scikit-learn's digits), for the end-to-end model tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.scan import ScanConfig, run_scan


def digit_store(root: Path, *, digits=(0, 1, 2), per_class: int = 100,
                size: int = 32) -> Path:
    """``root/data/d<digit>/NNNN.png`` scanned into ``root/store`` (20% val, 20% test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for digit in digits:
        index = np.flatnonzero(data.target == digit)[:per_class]
        for i in index:
            folder = root / "data" / f"d{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.rint(data.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).save(
                folder / f"{i:04d}.png")
    run_scan(ScanConfig(dataset=root / "data", store=root / "store", val_fraction=0.2,
                        test_fraction=0.2, progress=False))
    return root / "store"

