"""explain: heatmaps peak where the class is decided (exact CAM for logreg/avg, Grad-CAM through the stack)."""

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.explain import ExplainConfig, run_explain
from pipelines.extract import ExtractConfig, run_extract
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.scan import ScanConfig, run_scan

SIZE = 64  # DenseNet121's last feature map is 2 x 2 here: one cell per quadrant


def scan_image(rng, quadrant: tuple[int, int] | None) -> np.ndarray:
    """Noise, plus a bright cross in ``quadrant`` (None: no cross)."""
    image = rng.integers(0, 60, size=(SIZE, SIZE, 3)).astype(np.uint8)
    if quadrant is not None:
        half = SIZE // 2
        top, left = quadrant[0] * half + 6, quadrant[1] * half + 6
        image[top + 8: top + 12, left: left + 20] = 255
        image[top: top + 20, left + 8: left + 12] = 255
    return image


@pytest.fixture(scope="module")
def quadrant_store(tmp_path_factory):
    """Class ``marked`` has a cross in a random quadrant (in its file name), ``plain`` none."""
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    for i in range(24):
        quadrant = (int(rng.integers(2)), int(rng.integers(2)))
        for name, mark in (("marked", quadrant), ("plain", None)):
            path = root / "data" / name / f"q{quadrant[0]}{quadrant[1]}-{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(scan_image(rng, mark)).save(path)
    store = root / "store"
    run_scan(ScanConfig(dataset=root / "data", store=store, progress=False))
    tables = run_extract(ExtractConfig(dataset=root / "data", store=store, pool="both",
                                       weights="none", image_size=SIZE, workers=1,
                                       progress=False)).tables
    for pool in ("avg", "max"):
        run_fit_heads(FitHeadsConfig(store=store, table=tables[pool], heads=["logreg"],
                                     search="none", cv=2), echo=lambda line: None)
    run_fit_heads(FitHeadsConfig(store=store, table=tables["max"], heads=["knn"],
                                 search="none", cv=2), echo=lambda line: None)
    return store, sorted((root / "data" / "marked").glob("*.png")), root


@pytest.mark.parametrize("pool, method", [
    ("avg", "cam"),
    # Grad-CAM through the stacked DenseNet: ~30 s more; test_cnn covers Grad-CAM by default.
    pytest.param("max", "grad-cam", marks=pytest.mark.slow)])
def test_heatmap_peaks_in_the_quadrant_of_the_pattern_that_decides_the_class(
        quadrant_store, pool, method):
    store, marked, root = quadrant_store
    result = run_explain(ExplainConfig(store=store, model=f"densenet121/{pool}/logreg",
                                       images=marked, out=root / f"maps-{pool}",
                                       class_label="marked"), echo=lambda line: None)
    assert result.method == method
    where = [(int(p.name[1]), int(p.name[2])) for p in marked]
    peaks = list(zip(result.frame["peak_row"], result.frame["peak_col"]))
    assert sum(a == b for a, b in zip(where, peaks)) >= len(marked) - 1, (where, peaks)
    overlay = Image.open(result.frame["overlay"].iloc[0])
    assert overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"


def test_a_head_without_gradients_is_refused(quadrant_store):
    store, images, root = quadrant_store
    result = CliRunner().invoke(main, ["explain", str(images[0]), "--store", str(store),
                                       "--model", "densenet121/max/knn",
                                       "--out", str(root / "none")])
    assert result.exit_code == 2, result.output
    assert "is a 'knn' head, which has no gradient to follow" in result.output
    assert not (root / "none").exists()


@pytest.fixture
def audit_store(quadrant_store, tmp_path):
    """A private copy of the quadrant store, for audits (they write run folders and models)."""
    import shutil

    store, _, _ = quadrant_store
    shutil.copytree(store, tmp_path / "store")
    return tmp_path / "store"


def test_audit_gallery_shows_a_heatmap_beside_each_suspect(audit_store):
    from featurestore import Store
    from pipelines.audit.run import AuditLabelsConfig, run_audit_labels

    # above=0 flags every image: the labels are clean, and the gallery is what is tested.
    audit = dict(store=audit_store, method="threshold", above=0.0, top=4, neighbours=1)
    result = run_audit_labels(AuditLabelsConfig(table="densenet121/avg", heatmaps=True,
                                                **audit), echo=lambda line: None)
    html = (result.run_dir / "index.html").read_text()
    sections = html.split('<h2 id="rank-')[1:]
    assert len(sections) == 4 and f"Heatmaps: cam of {result.table_key}/logreg" in html
    for section, suspect in zip(sections, result.suspects.itertuples()):
        suspect_figure = section.split('<figure class="thumb neighbour">')[0]
        [thumb] = re.findall(r'<img src="(thumbs/[^"]+)"', suspect_figure)
        [heat] = re.findall(r'<img class="heatmap" src="(heatmaps/[^"]+)"', suspect_figure)
        assert suspect.image_id[:16] in heat
        with Image.open(result.run_dir / heat) as image:
            assert image.size == (SIZE, SIZE)
    # A head with no gradient to follow: the gallery says so and shows no heatmap.
    cli = CliRunner().invoke(main, ["audit-labels", "--store", str(audit_store), "--table",
                                    "densenet121/max", "--heads", "knn", "--heatmaps",
                                    "--method", "threshold", "--above", "0", "--top", "4",
                                    "--neighbours", "1", "--run", "knn"])
    assert cli.exit_code == 0, cli.output
    key = Store(audit_store).resolve("densenet121/max").key
    run_dir = Store(audit_store).paths.audits_of(key) / "knn"
    html = (run_dir / "index.html").read_text()
    assert f"No heatmaps: Model {key}/knn is a &#39;knn&#39; head" in html
    assert 'class="heatmap"' not in html and not (run_dir / "heatmaps").exists()


def test_held_out_audits_average_the_tables_heads_and_end_to_end_models_only_when_named(
        audit_store):
    from classifiers.metrics import make_objective
    from featurestore import Store
    from pipelines.audit.run import AuditLabelsConfig, run_audit_labels
    from pipelines.cnn import network, saved
    from pipelines.cnn.data import load_splits

    # A real end-to-end model ranked under the table's key, as fine-tune saves one.
    splits = load_splits(Store(audit_store), SIZE)
    model = network.build_cnn(SIZE, 2, filters=(4,), dense_units=4)
    objective = make_objective(None, splits.classes)
    evaluated = saved.evaluate(model, splits.classes, splits.splits["val"],
                               splits.splits["test"], objective)
    key = Store(audit_store).resolve("densenet121/avg").key
    saved.save_end_to_end(Store(audit_store), model, key=key, head="keras_dense+ft",
                          classes=splits.classes, test=splits.splits["test"], result=evaluated,
                          objective=objective, recipe={"table": "densenet121/avg", "rows": {
                              "train": len(splits.splits["train"].labels)}}, lineage=None,
                          timing={"train_sec": 1.0, "total_sec": 1.0, "sec_per_epoch": 1.0,
                                  "epochs": 1})
    audit = dict(store=audit_store, table="densenet121/avg", split="test",
                 include_heldout=True, neighbours=0)
    default = run_audit_labels(AuditLabelsConfig(**audit), echo=lambda line: None)
    assert default.heads == ["logreg"]
    # Equal weights: greedy weighting may give the untrained model no weight at all.
    named = run_audit_labels(AuditLabelsConfig(heads=["logreg", "keras_dense+ft"],
                                               weighting="equal", **audit),
                             echo=lambda line: None)
    assert named.heads == ["logreg", "keras_dense+ft"]
    assert not np.allclose(named.ranking["score"].sort_values(),
                           default.ranking["score"].sort_values())
