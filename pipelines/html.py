"""Static HTML pages (report, label-audit gallery): Jinja2 templates and image thumbnails.

Pages are self-contained folders that open from disk in any browser::

    OUT/index.html      the page (CSS inline, no scripts, no server)
    OUT/figures/*.png   matplotlib figures
    OUT/thumbs/*.jpg    image thumbnails, named by image id

Shared templates (``base.html``) live in ``pipelines/templates``; a stage keeps its
own page in its folder (``pipelines/report/templates/report.html``) and names its
package when it renders.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from jinja2 import ChoiceLoader, Environment, PackageLoader, select_autoescape
from PIL import Image, ImageOps

from featurestore._io import atomic_write_text

THUMBS_DIR = "thumbs"
FIGURES_DIR = "figures"

_envs: dict[str, Environment] = {}


def environment(package: str) -> Environment:
    """The Jinja2 environment of ``package``'s templates over the shared ones (HTML autoescaped)."""
    if package not in _envs:
        loader = ChoiceLoader([PackageLoader(package, "templates"),
                               PackageLoader("pipelines", "templates")])
        env = Environment(loader=loader, autoescape=select_autoescape(["html"]),
                          trim_blocks=True, lstrip_blocks=True)
        env.filters["fmt"] = _fmt
        _envs[package] = env
    return _envs[package]


def render_page(out_dir: str | Path, package: str, template: str, **context) -> Path:
    """Render ``package``'s ``template`` with ``context`` into ``out_dir/index.html`` (atomically)."""
    path = Path(out_dir) / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, environment(package).get_template(template).render(**context))
    return path


def thumbnail(source: str | os.PathLike, out_dir: str | Path, name: str, *,
              size: int = 160) -> str | None:
    """Write a JPEG thumbnail of ``source`` to ``out_dir/thumbs/<name>.jpg``.

    Returns the path relative to ``out_dir`` (for ``<img src>``), or None when
    the file is missing or cannot be decoded (the page then says so instead
    of failing). An existing thumbnail is reused. 16-bit scans are scaled to
    8 bits over their own range, so a dim X-ray stays visible.
    """
    relative = f"{THUMBS_DIR}/{name}.jpg"
    target = Path(out_dir) / relative
    if target.exists():
        return relative
    try:
        with Image.open(source) as img:
            img.draft("RGB", (size, size))
            img = ImageOps.exif_transpose(img)
            img = _eight_bit(img)
            img.thumbnail((size, size))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{target.name}")
            img.save(tmp, "JPEG", quality=85)
            os.replace(tmp, target)
    except Exception:  # Pillow raises many types; a bad file only loses its thumbnail
        return None
    return relative


def _eight_bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(img, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / max(high - low, 1e-6))
        return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), mode="L")
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def _fmt(value, digits: int = 3) -> str:
    """Numbers for tables: fixed decimals, '-' for missing."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)
