"""featurestore report on a tiny real store: sections, figures, gallery order, views, edge cases."""

import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits

from featurestore import FeatureStoreError, Lineage, Store
from featurestore.views import ViewStore
from pipelines.cli import main
from pipelines.similar.evaluate import EvalSearchConfig, run_eval_search
from pipelines.extract.errors import ErrorLog
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.leaderboard import read_leaderboard
from pipelines.heads.models import HELDOUT_FILE, model_dir
from pipelines.report.run import ReportConfig, run_report
from pipelines.report.folder import MARKER
from pipelines.scan import ScanConfig, run_scan

CLASSES = (3, 8)
#: Test images of an 8 filed under d3: the heads should get them wrong, confidently.
MISLABELLED = 3


def lineage(pool="max", augmentation=None):
    return Lineage(backbone="digits", weights="random:0", pool=pool, input_size=8,
                   preprocessing="none", augmentation=augmentation)


def write_dataset(root: Path) -> Path:
    """``root/{train,test}/d{3,8}/NNNN.png`` digits, three 8s filed as d3 in test, one
    corrupt file, one train image copied into test (leakage)."""
    digits = load_digits()
    for digit in CLASSES:
        index = np.flatnonzero(digits.target == digit)[:40]
        for k, i in enumerate(index):
            split = "train" if k < 28 else "test"
            folder = f"d{digit}"
            if digit == 8 and k >= 40 - MISLABELLED:
                folder = "d3"
            _png(digits.images[i], root / split / folder / f"{i:04d}.png")
    (root / "train" / "d3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    first = sorted((root / "train" / "d8").iterdir())[0]
    shutil.copy(first, root / "test" / "d8" / f"copy-{first.name}")
    return root


def _png(pixels, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.rint(pixels * 255 / 16).astype(np.uint8))
    buffer = io.BytesIO()
    image.resize((24, 24)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def write_tables(store_root: Path):
    """Tables max, avg and max+noise views from the manifest's images (digit pixels as features)."""
    images = Store(store_root).manifest().images().drop_duplicates("image_id")
    digits = load_digits()
    index = [int(Path(p).stem.split("-")[-1]) for p in images["path"]]
    X = digits.data[index].astype(np.float32)
    rng = np.random.default_rng(0)
    meta = dict(image_id=list(images.image_id), label=list(images.label),
                split=list(images.split), path=list(images.path))
    tables = {"max": lineage("max"), "avg": lineage("avg"),
              "aug": lineage("max", {"preset": "noise", "views": 1})}
    features = {"max": X, "avg": X * 0.5 + rng.normal(0, 1, X.shape).astype(np.float32),
                "aug": X}
    for name, lin in tables.items():
        with Store(store_root).writer(lin) as w:
            w.append(features[name], **meta)
            if name == "aug":
                train = np.flatnonzero(images.split.to_numpy() == "train")
                noisy = X[train] + rng.normal(0, 1, X[train].shape).astype(np.float32)
                w.append(noisy, aug_id=[1] * len(train),
                         **{k: [v[i] for i in train] for k, v in meta.items()})
    return tables


def clean_view(root: Path, lin: Lineage, view: str = "clean") -> None:
    """Relabel the three 8s filed under d3 (a reviewed audit) and refit logreg on that view."""
    images = Store(root).manifest().images()
    target = load_digits().target
    wrong = images[[label == "d3" and target[int(Path(path).stem.split("-")[-1])] == 8
                    for label, path in zip(images.label, images.path)]]
    assert len(wrong) == MISLABELLED
    decisions = pd.DataFrame({"image_id": wrong.image_id, "action": "relabel",
                              "new_label": "d8"})
    ViewStore(root).create(view, decisions, author="test", source={}, covers_heldout=True)
    run_fit_heads(FitHeadsConfig(store=root, table=lin.key, heads=["logreg"], search="none",
                                 cv=3, view=view), echo=lambda s: None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    root = base / "store"
    run_scan(ScanConfig(dataset=write_dataset(base / "digits"), store=root, progress=False))
    tables = write_tables(root)
    quiet = lambda s: None  # noqa: E731
    run_fit_heads(FitHeadsConfig(store=root, table=tables["max"].key, heads=["logreg", "knn"],
                                 n_trials=3, cv=3), echo=quiet)
    run_fit_heads(FitHeadsConfig(store=root, table=tables["aug"].key, heads=["logreg", "knn"],
                                 search="none", cv=3), echo=quiet)
    run_fit_heads(FitHeadsConfig(store=root, table=tables["avg"].key, heads=["logreg"],
                                 search="none", cv=3), echo=quiet)
    # A recall-floor head: its threshold is the operating point marked on its curves.
    run_fit_heads(FitHeadsConfig(store=root, table=tables["avg"].key, heads=["knn"],
                                 search="none", cv=3, positive_class="d8", min_recall=0.9),
                  echo=quiet)
    clean_view(root, tables["max"])
    run_eval_search(EvalSearchConfig(store=root, ks=(5,), queries=(32,)))
    with ErrorLog(root, [tables["max"].key]) as log:
        log.record([("train/d3/unreadable.png", "0" * 64, "truncated image")])
    return root, tables


class Page(HTMLParser):
    """The parts of the report the tests look at: ids, images, gallery figures, text."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.images, self.thumbs, self.missing, self.text = set(), [], [], 0, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "figure" and "data-image-id" in attrs:
            self.thumbs.append(attrs)
        if tag == "div" and attrs.get("class") == "missing":
            self.missing += 1

    def handle_data(self, data):
        self.text.append(data)


def build(root, out, **kwargs):
    path = run_report(ReportConfig(store=root, out=out, map_sample=200, **kwargs),
                      echo=lambda s: None)
    assert path == out / "index.html"
    return Page(path.read_text())


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    root, _ = store
    out = tmp_path_factory.mktemp("out") / "report"
    return out, build(root, out)


def test_report_has_every_section_and_valid_figures(report, store):
    out, page = report
    _, tables = store
    assert {"dataset", "leaderboard", "comparisons", "search", "models", "maps",
            "rejected", "conflicts", "extract_errors"} <= page.ids
    for image in page.images:
        with Image.open(out / image) as img:  # exists and decodes as PNG or JPEG
            assert img.format in ("PNG", "JPEG")
            img.verify()
    figures = {Path(src).name for src in page.images if src.startswith("figures/")}
    slugs = {f"{key}_{head}" for key in (t.key for t in tables.values())
             for head in ("logreg", "knn")} | {f"{tables['max'].key}_logreg_clean"}
    expected = {"dataset-counts.png"} | {f"{kind}-{slug}.png" for slug in slugs
                                         for kind in ("confusion", "curves")}
    expected |= {f"map-{t.key}.png" for t in tables.values()}
    expected |= {f"optuna-{tables['max'].key}_{head}.png" for head in ("logreg", "knn")}
    expected |= {f"compare-{name}.png" for name in ("pooling", "augmentation", "heads", "views")}
    assert figures == expected
    summary = json.loads((out / "report.json").read_text())
    assert len(summary["models"]) == 7 and "maps: tsne" in summary["seconds"]


def test_models_show_their_decision_rule(report, store):
    out, _ = report
    _, tables = store
    html = (out / "index.html").read_text()
    threshold = json.loads((model_dir(store[0], tables["avg"].key, "knn") / "model.json")
                           .read_text())["threshold"]
    knn = html[html.index(f'id="model-{tables["avg"].key}_knn"'):]
    assert f"decision: threshold {threshold:.3f} on P(d8)" in knn[:knn.index("</article>")]
    logreg = html[html.index(f'id="model-{tables["max"].key}_logreg"'):]
    assert "decision: argmax" in logreg[:logreg.index("</article>")]


def test_dataset_section_lists_rejected_leaked_and_failed_files(report):
    _, page = report
    text = " ".join(page.text)
    assert "train/d3/broken.png" in text  # rejected by the scan
    assert "leakage" in text and "copy-" in text  # the train image copied into test
    assert "train/d3/unreadable.png" in text and "truncated image" in text


def test_gallery_lists_misclassified_held_out_images_worst_first(report, store):
    out, page = report
    root, tables = store
    held = pd.read_parquet(model_dir(root, tables["max"].key, "logreg") / HELDOUT_FILE)
    wrong = held[held.label != held.predicted]
    p_true = np.where(wrong.label == "d3", wrong.proba_d3, wrong.proba_d8)
    expected = list(wrong.image_id.to_numpy()[np.lexsort((wrong.image_id, p_true))])
    slug = f"{tables['max'].key}_logreg"
    html = (out / "index.html").read_text()
    start = html.index(f'id="gallery-{slug}"')
    gallery = Page(html[start: html.index("</article>", start)])
    assert [t["data-image-id"] for t in gallery.thumbs] == expected
    # The three 8s filed under d3 are among the errors, with their given and predicted labels.
    mislabelled = [t for t in gallery.thumbs if (t["data-label"], t["data-predicted"])
                   == ("d3", "d8")]
    assert len(mislabelled) >= MISLABELLED
    assert all((out / src).exists() for src in gallery.images)
    assert len(gallery.images) == len(expected)  # every error has its thumbnail


def test_before_after_view_and_pairs_sit_side_by_side(report, store):
    out, _ = report
    _, tables = store
    html = (out / "index.html").read_text()
    views = html[html.index('id="compare-views"'): html.index('id="search"')]
    assert '>whole table<' in views and ">clean<" in views
    assert views.index('>whole table<') < views.index(">clean<")  # before, then after
    board = read_leaderboard(store[0]).set_index(["table_key", "head", "objective", "view"])
    before = board.loc[(tables["max"].key, "logreg", "balanced_accuracy", ""), "accuracy"]
    after = board.loc[(tables["max"].key, "logreg", "balanced_accuracy", "clean"), "accuracy"]
    assert after > before  # the relabelled 8s are no longer errors
    assert f"{after:.3f}" in views and f"{before:.3f}" in views
    pooling = html[html.index('id="compare-pooling"'): html.index('id="compare-augmentation"')]
    assert ">avg<" in pooling and ">max<" in pooling and "± " in pooling
    augmentation = html[html.index('id="compare-augmentation"'): html.index('id="compare-heads"')]
    assert augmentation.index(">none<") < augmentation.index(">noise x1<")
    search = html[html.index('id="search"'): html.index('id="models"')]
    assert all(f"digits/{pool}/8 @5" in search for pool in ("max", "avg"))


def test_a_store_without_models_gets_a_dataset_only_report(tmp_path):
    root = tmp_path / "store"
    run_scan(ScanConfig(dataset=write_dataset(tmp_path / "digits"), store=root,
                        progress=False))
    page = build(root, root / "report", map="pca")
    text = " ".join(page.text)
    assert {"dataset", "models", "maps"} <= page.ids
    assert "No saved models yet" in text and "No heads fitted yet" in text
    assert [Path(src).name for src in page.images] == ["dataset-counts.png"]


def test_missing_image_file_shows_a_placeholder(store, tmp_path):
    root, tables = store
    held = pd.read_parquet(model_dir(root, tables["max"].key, "knn") / HELDOUT_FILE)
    wrong = held[held.label != held.predicted].image_id
    images = Store(root).manifest().images()
    victim = images[images.image_id == wrong.iloc[0]].path.iloc[0]
    source = Store(root).manifest().absolute_path(victim)
    saved = source.read_bytes()
    source.unlink()
    try:
        page = build(root, tmp_path / "report", map="pca")
    finally:
        source.write_bytes(saved)
    assert page.missing >= 1


def test_a_rebuilt_report_replaces_the_old_one_and_foreign_folders_are_refused(store,
                                                                               tmp_path):
    root, _ = store
    out = tmp_path / "report"
    stale = tmp_path / ".report.building-999999999"  # left by a killed build (no such pid)
    (stale / "figures").mkdir(parents=True)
    (stale / MARKER).write_text(json.dumps({"store": str(root), "files": None}))
    build(root, out, map="pca")
    assert not stale.exists()
    assert any((out / "thumbs").iterdir())
    build(root, out, map="pca", gallery_size=0)
    assert not (out / "thumbs").exists()  # nothing of the first build is left
    assert not list(tmp_path.glob(".report.*"))  # no build or old folder left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FeatureStoreError, match="holds no earlier report"):
        build(root, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.fixture(scope="module")
def bare_store(tmp_path_factory):
    """A scanned store without tables or models: the quickest report to build."""
    base = tmp_path_factory.mktemp("bare")
    run_scan(ScanConfig(dataset=write_dataset(base / "digits"), store=base / "store",
                        progress=False))
    return base / "store"


def test_cli_refuses_a_users_folder_that_merely_holds_a_report_json(bare_store, tmp_path):
    victim = tmp_path / "victim"
    (victim / "src").mkdir(parents=True)
    (victim / "report.json").write_text("{}")
    (victim / "src" / "thesis.tex").write_text("x")
    result = CliRunner().invoke(main, ["report", "--store", str(bare_store), "--out",
                                       str(victim), "--map", "pca"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: out {victim} is not empty and holds no earlier report (no "
        f".featurestore-report.json); choose an empty or new folder."]
    assert (victim / "src" / "thesis.tex").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # no build folder left


def test_a_report_folder_with_a_users_file_or_of_another_store_is_kept(bare_store, tmp_path):
    out = tmp_path / "r"
    build(bare_store, out, map="pca")
    marker = json.loads((out / MARKER).read_text())
    assert marker["store"] == str(bare_store.resolve())
    assert {"index.html", "report.json", "figures/dataset-counts.png"} <= set(marker["files"])
    assert sorted(marker["files"]) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
        and p.name != MARKER)
    (out / "figures" / "mine.png").write_bytes(b"a user's figure")
    with pytest.raises(FeatureStoreError, match=r"files the report did not write "
                                                r"\(figures/mine.png\)"):
        build(bare_store, out, map="pca")
    assert (out / "figures" / "mine.png").read_bytes() == b"a user's figure"
    (out / "figures" / "mine.png").unlink()
    other = tmp_path / "other"
    shutil.copytree(bare_store, other)
    with pytest.raises(FeatureStoreError, match=f"report of store {bare_store.resolve()}"):
        build(other, out, map="pca")
    (out / ".tmp-0123abcd-index.html").write_text("killed mid-write")  # ours: cleaned
    build(bare_store, out, map="pca")
    assert not list(out.glob(".tmp-*")) and not list(tmp_path.glob(".r.*"))


def test_the_stores_own_report_is_rebuilt_even_from_a_copy_or_an_older_version(bare_store,
                                                                              tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bare_store, copy)
    build(copy, copy / "report", map="pca")
    moved = tmp_path / "moved"
    copy.rename(moved)  # the marker names the old path; STORE/report is still the store's
    build(moved, moved / "report", map="pca")
    own = moved / "report"
    (own / MARKER).unlink()  # as written before markers: only report.json said "report"
    build(moved, own, map="pca")
    assert (own / MARKER).exists()
    assert not list(moved.glob(".report.*"))  # the older report's files went, none kept aside
    (own / MARKER).unlink()
    (own / "notes.txt").write_text("keep")
    with pytest.raises(FeatureStoreError, match="holds no earlier report"):
        build(moved, own, map="pca")
    assert (own / "notes.txt").read_text() == "keep"


def test_only_our_marked_build_folders_of_dead_runs_are_removed(bare_store, tmp_path):
    out = tmp_path / "r"
    dead = 999999999
    ours = tmp_path / f".r.building-{dead}"
    (ours / "figures").mkdir(parents=True)
    (ours / MARKER).write_text(json.dumps({"store": "x", "files": None}))
    unmarked = tmp_path / f".r.building-{dead - 1}"  # right name, no marker: not ours
    unmarked.mkdir()
    (unmarked / "data.txt").write_text("keep")
    old = tmp_path / f".r.old-{dead}"  # an old report parked by a killed swap
    old.mkdir()
    (old / "index.html").write_text("old")
    (old / "extra.txt").write_text("appeared later")
    (old / MARKER).write_text(json.dumps({"store": "x", "files": ["index.html"]}))
    build(bare_store, out, map="pca")
    assert not ours.exists() and (unmarked / "data.txt").read_text() == "keep"
    assert sorted(p.name for p in old.iterdir()) == ["extra.txt"]  # only listed files go


def test_bad_options_fail_early_with_the_choices(store, tmp_path):
    root, _ = store
    with pytest.raises(FeatureStoreError, match="map must be one of pca, tsne, umap"):
        build(root, tmp_path / "r", map="mds")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(FeatureStoreError, match="umap-learn"):
            build(root, tmp_path / "r", map="umap")
    assert not (tmp_path / "r").exists()


def test_cli_report(store, tmp_path):
    root, _ = store
    result = CliRunner().invoke(main, ["report", "--store", str(root), "--out",
                                       str(tmp_path / "r"), "--map", "pca",
                                       "--gallery-size", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "index.html").exists() and "Report:" in result.output


def test_compare_shows_each_table_by_its_lineage_name_even_from_an_older_leaderboard():
    from pipelines.report.compare import enrich_leaderboard

    raw = lineage()
    noisy = lineage(augmentation={"preset": "noise", "views": 1, "seed": 0, "splits": ["train"]})
    board = pd.DataFrame({"table_key": [raw.key, noisy.key, "gone-key"], "head": ["logreg"] * 3,
                          "objective": ["accuracy"] * 3, "view": [""] * 3,
                          "table": ["digits/max", "digits/max/8+noise", None]})  # old spellings
    rows = enrich_leaderboard(board, {raw.key: raw, noisy.key: noisy}, [])
    assert rows["table"].tolist() == ["digits/max/8", "digits/max/8+noise", "gone-key"]
    assert rows["augmentation"].tolist() == ["none", "noise x1", "none"]
