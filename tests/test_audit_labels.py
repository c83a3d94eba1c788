"""audit-labels and cleaned views on a tiny digits table with labels flipped on purpose:
flips found first, views stored beside (never in) the tables, held-out split untouched
unless said, drops and relabels honoured by fit-heads, bad review files refused."""

import csv
import hashlib
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits

from classifiers.label_issues import rank_label_issues
from featurestore import FeatureArrays, FeatureStoreError, Lineage, Store
from featurestore.views import ViewStore, apply_view
from pipelines.audit.run import AuditLabelsConfig, run_audit_labels
from pipelines.cli import main
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.models import model_dir

CLASSES = (0, 1, 3, 8)
QUIET = {"echo": lambda s: None}


def build_store(root, images_dir, *, n_per_class=70, flip_fraction=0.1, seed=0, names=None):
    """Digits of four classes (train/test), one noisy augmented copy of each train image,
    real PNG files, and ``flip_fraction`` of the train labels changed at random.

    Returns ``(lineage, flipped image ids, {image_id: true label})``; ``names`` maps a
    digit to its class name (default ``d<digit>``).
    """
    X, y = load_digits(return_X_y=True)
    keep = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in CLASSES])
    images = load_digits().images[keep]
    X, y = X[keep].astype(np.float32), y[keep]
    rng = np.random.default_rng(seed)
    split = np.where(rng.random(len(y)) < 0.7, "train", "test")
    ids = np.array([f"{i:064x}" for i in keep])
    names = names or {c: f"d{c}" for c in CLASSES}
    true = np.array([names[v] for v in y])
    given = true.copy()
    train = np.flatnonzero(split == "train")
    flips = rng.choice(train, size=int(round(flip_fraction * len(train))), replace=False)
    for i in flips:
        given[i] = rng.choice([names[c] for c in CLASSES if names[c] != true[i]])
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id, pixels in zip(ids, images):
        path = images_dir / f"{image_id[-6:]}.png"
        Image.fromarray((pixels * 15).astype(np.uint8)).resize((32, 32)).save(path)
        paths.append(str(path))
    lin = Lineage(backbone="digits", weights="none", pool="max", input_size=8,
                  preprocessing="none", augmentation={"preset": "noise", "views": 1})
    with Store(root).writer(lin, formats=("hdf5",)) as w:
        w.append(X, image_id=ids, label=given, split=split, path=paths)
        w.append(X[train] + rng.normal(0, 0.5, X[train].shape).astype(np.float32),
                 image_id=ids[train], aug_id=[1] * len(train), label=given[train],
                 split=["train"] * len(train), path=[paths[i] for i in train])
    return lin, set(ids[flips]), dict(zip(ids, true))


def fit(root, view=None, heads=("logreg", "knn")):
    return run_fit_heads(FitHeadsConfig(store=root, table="digits/max", heads=list(heads),
                                        search="none", cv=3, view=view), **QUIET)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A store whose heads are fitted on the flipped labels (shared, never changed)."""
    base = tmp_path_factory.mktemp("audit")
    root = base / "store"
    lin, flips, true = build_store(root, base / "images")
    fit(root)
    return root, lin, flips, true


@pytest.fixture
def store(fitted, tmp_path):
    """A private copy of the fitted store, for tests that add views or models."""
    import shutil

    root, lin, flips, true = fitted
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    return copy, lin, flips, true


def table_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "tables").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["cleanlab", "threshold"])
def test_injected_flips_are_ranked_ahead_of_clean_images(store, method):
    root, _, flips, _ = store
    result = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", method=method,
                                          neighbours=0), **QUIET)
    ranking = result.ranking
    k = len(flips)
    precision = ranking.head(k)["image_id"].isin(flips).mean()
    chance = k / len(ranking)
    assert chance < 0.15 and precision >= 0.75, (precision, chance)
    # Every flip sits in the top 2K of the ranking: clean images come after them.
    assert flips <= set(ranking.head(2 * k)["image_id"])
    assert set(result.heads) == {"logreg", "knn"}  # the ensemble by default
    suspects = pd.read_csv(result.run_dir / "suspects.csv", keep_default_na=False)
    assert list(suspects["rank"]) == sorted(suspects["rank"])
    assert suspects["score"].is_monotonic_increasing
    assert {"decision", "new_label", "reason", "path", "suggested_label"} <= set(suspects)
    assert (suspects["suggested_label"] != suspects["given_label"]).all()


def test_gallery_lists_suspects_worst_first_with_neighbour_thumbnails(store):
    root, _, _, _ = store
    result = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", top=5,
                                          neighbours=2, heads=["logreg"]), **QUIET)
    html = (result.run_dir / "index.html").read_text()
    ranks = [int(r) for r in re.findall(r'id="rank-(\d+)"', html)]
    assert ranks == [1, 2, 3, 4, 5]
    positions = [html.index(i[:12]) for i in result.suspects["image_id"]]
    assert positions == sorted(positions)  # worst first
    sources = re.findall(r'<img src="(thumbs/[^"]+)"', html)
    assert len(sources) == 5 * (1 + 2 + 2)  # each suspect and its 2 + 2 neighbours
    assert all((result.run_dir / s).is_file() for s in sources)
    for section, suspect in zip(html.split('<h2 id="rank-')[1:],
                                result.suspects.itertuples()):
        # Neighbours come from the suspect's own class and from the suggested class.
        assert re.findall(r"same label: (\w+)", section) == [suspect.given_label] * 2
        assert re.findall(r"suggested label: (\w+)", section) == [suspect.suggested_label] * 2


def test_accept_top_drops_images_keeps_tables_and_heldout_split(store):
    root, lin, flips, _ = store
    before = table_hashes(root)
    result = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", neighbours=0,
                                          view="clean", accept_top=len(flips),
                                          author="ana", reason="flip test"), **QUIET)
    view = result.view
    assert view.counts() == {"keep": 0, "relabel": 0, "drop": len(flips)}
    assert set(view.decisions["who"]) == {"ana"} and view.source["method"] == "cleanlab"
    dropped = view.dropped()
    plain = {h: model_dir(root, lin.key, h) for h in ("logreg", "knn")}
    viewed = fit(root, view="clean")
    assert table_hashes(root) == before  # views never touch the tables
    for head, folder in plain.items():
        oof = pd.read_parquet(viewed.heads[head].model_dir / "oof.parquet")
        old = pd.read_parquet(folder / "oof.parquet")
        assert viewed.heads[head].model_dir.name == f"{head}@clean"
        assert set(oof["image_id"]) == set(old["image_id"]) - dropped
        # The held-out split is evaluated on exactly the same rows and labels.
        new_held = pd.read_parquet(viewed.heads[head].model_dir / "heldout.parquet")
        old_held = pd.read_parquet(folder / "heldout.parquet")
        assert new_held[["image_id", "label"]].equals(old_held[["image_id", "label"]])
    board = pd.read_parquet(root / "leaderboard.parquet")
    assert sorted(board["view"]) == ["", "", "clean", "clean"]
    counts = board.set_index(["head", "view"])["train_aug_rows"]
    # Augmented rows follow their image out of the training set.
    assert counts[("logreg", "clean")] == counts[("logreg", "")] - len(dropped)


def test_a_view_and_each_revision_of_it_get_their_own_optuna_study(store):
    root, *_ = store
    ids = [f"{i:064x}" for i in range(2)]
    views = ViewStore(root)

    def study(view):
        return run_fit_heads(FitHeadsConfig(store=root, table="digits/max", heads=["logreg"],
                                            n_trials=1, cv=3, view=view),
                             **QUIET).heads["logreg"].search.study_name

    views.create("v", pd.DataFrame({"image_id": ids[:1], "action": "drop"}), author="a",
                 source={})
    first = study("v")
    assert first != study(None) and first == study("v")  # a rerun resumes its own study
    views.create("v", pd.DataFrame({"image_id": ids, "action": "drop"}), author="a",
                 source={}, replace=True)
    assert study("v") != first  # a changed view never resumes the stale study


def test_reviewed_relabels_and_drops_are_honoured_by_fit_heads(store):
    root, lin, flips, true = store
    audit = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", neighbours=0,
                                          heads=["logreg"]), **QUIET)
    review = audit.suspects.copy()
    relabel, drop = review.index[:2], review.index[2:4]
    review.loc[relabel, "decision"] = "relabel"
    review.loc[relabel, "new_label"] = [true[i] for i in review.loc[relabel, "image_id"]]
    review.loc[relabel, "reason"] = "checked the scan"
    review.loc[drop, "decision"] = "drop"
    review.loc[review.index[4], "decision"] = "keep"
    path = audit.run_dir / "suspects.csv"
    review.to_csv(path, index=False)
    view = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", apply=path,
                                        view="reviewed", author="bo"), **QUIET).view
    assert view.counts() == {"keep": 1, "relabel": 2, "drop": 2}
    assert view.source["audit_run"] == str(audit.run_dir)  # where the decisions came from
    assert set(view.decisions.loc[view.decisions.action == "relabel", "why"]) == \
        {"checked the scan"}
    result = fit(root, view="reviewed", heads=["logreg"])
    oof = pd.read_parquet(result.heads["logreg"].model_dir / "oof.parquet").set_index("image_id")
    for image_id in review.loc[relabel, "image_id"]:
        assert oof.loc[image_id, "label"] == true[image_id]
    assert not set(review.loc[drop, "image_id"]) & set(oof.index)


@pytest.mark.parametrize("edit, message", [
    ({"image_id": "f" * 64, "decision": "drop"}, "no image with this id"),
    ({"decision": "delete"}, "unknown decision 'delete'"),
    ({"decision": "relabel", "new_label": ""}, "relabel with no new_label"),
    ({"decision": "relabel", "new_label": "d7"}, "unknown class 'd7'"),
])
def test_bad_decisions_are_refused_naming_the_row(store, tmp_path, edit, message):
    root, *_ = store
    audit = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", neighbours=0,
                                          heads=["logreg"]), **QUIET)
    review = audit.suspects.head(3).copy()
    review.loc[review.index[0], "decision"] = "keep"
    for column, value in edit.items():
        review.loc[review.index[2], column] = value
    path = tmp_path / "review.csv"
    review.to_csv(path, index=False)
    with pytest.raises(FeatureStoreError, match=f"Row 3 .*{re.escape(message)}"):
        run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", apply=path, view="v"),
                         **QUIET)
    assert ViewStore(root).names() == []


def test_heldout_images_change_only_in_a_view_that_says_so(store, tmp_path):
    root, *_ = store
    with Store(root).open("digits/max") as reader:
        meta = reader.metadata()
    test_id = meta.loc[meta.split == "test", "image_id"].iloc[0]
    path = tmp_path / "review.csv"
    pd.DataFrame({"image_id": [test_id], "decision": ["drop"]}).to_csv(path, index=False)
    with pytest.raises(FeatureStoreError, match="held-out split 'test'.*--include-heldout"):
        run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", apply=path, view="t"),
                         **QUIET)
    with pytest.raises(FeatureStoreError, match="include_heldout"):
        run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", split="test"), **QUIET)
    # Even a view that names a held-out image (written through the storage API) leaves
    # the held-out split alone unless it says it covers it.
    ViewStore(root).create("quiet", pd.DataFrame({"image_id": [test_id], "action": ["drop"]}),
                           author="a", source={})
    held = pd.read_parquet(fit(root, view="quiet", heads=["logreg"]).heads["logreg"].model_dir
                           / "heldout.parquet")
    assert test_id in set(held["image_id"]) and len(held) == (meta.split == "test").sum()
    # The test labels are clean: flag every image (below=1) to have something to drop.
    audit = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", split="test",
                                         include_heldout=True, neighbours=0, top=3,
                                         method="threshold", below=1.0, view="t",
                                         accept_top=3), **QUIET)
    assert len(audit.view.dropped()) == 3
    assert audit.view.covers_heldout and set(audit.suspects["image_id"]) <= set(
        meta.loc[meta.split == "test", "image_id"])
    held = pd.read_parquet(fit(root, view="t", heads=["logreg"]).heads["logreg"].model_dir
                           / "heldout.parquet")
    assert not audit.view.dropped() & set(held["image_id"])
    assert len(held) == (meta.split == "test").sum() - 3


def test_view_names_are_unique_and_replacing_keeps_the_old_revision(store):
    root, *_ = store
    views = ViewStore(root)
    ids = [f"{i:064x}" for i in range(3)]
    first = views.create("v1", pd.DataFrame({"image_id": ids[:2], "action": "drop"}),
                         author="ana", source={"test": 1})
    with pytest.raises(FeatureStoreError, match="'v1' already exists"):
        views.create("v1", pd.DataFrame({"image_id": ids, "action": "drop"}), author="bo",
                     source={})
    with pytest.raises(FeatureStoreError, match="'v1' already exists"):  # before any audit
        run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", view="v1",
                                     accept_top=1), **QUIET)
    second = views.create("v1", pd.DataFrame({"image_id": ids, "action": "drop"}),
                          author="bo", source={}, replace=True)
    assert (second.revision, len(views.get("v1").dropped())) == (2, 3)
    assert views.get("v1", revision=1).dropped() == first.dropped() == set(ids[:2])
    assert second.digest != first.digest
    for bad in ("a/b", "", "x y", ".."):
        with pytest.raises(FeatureStoreError, match="View name must match"):
            views.create(bad, pd.DataFrame({"image_id": ids, "action": "drop"}),
                         author="a", source={})
    with pytest.raises(FeatureStoreError, match="Unknown view 'nope'.*Views: v1"):
        fit(root, view="nope")


def test_apply_view_drops_every_row_of_an_image_and_relabels_them():
    ids = np.rec.fromarrays([np.array(["a", "a", "b", "b", "c"]), np.array([0, 1, 0, 1, 0])],
                            names="image_id,aug_id")
    arrays = FeatureArrays(np.arange(10, dtype=np.float32).reshape(5, 2),
                           np.array(["x", "x", "y", "y", "x"]), ids, ids["image_id"])
    views = pd.DataFrame({"image_id": ["a", "b", "c"], "action": ["drop", "relabel", "keep"],
                          "new_label": [None, "x", None], "who": "t", "decided_at": "now",
                          "why": ""})
    from featurestore.views import View

    out, effect = apply_view(arrays, View("v", 1, "now", "t", False, {}, views))
    assert list(out.ids["image_id"]) == ["b", "b", "c"] and list(out.y) == ["x", "x", "x"]
    assert np.array_equal(out.X, arrays.X[2:])
    assert (effect.dropped_rows, effect.dropped_images, effect.relabelled_rows) == (2, 1, 2)
    assert list(arrays.y) == ["x", "x", "y", "y", "x"]  # the input is not modified


def test_missing_heads_are_named_with_the_available_ones(store):
    root, *_ = store
    with pytest.raises(FeatureStoreError, match="'xgboost'.*available: knn, logreg"):
        run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", heads=["xgboost"]),
                         **QUIET)


def test_rank_label_issues_threshold_rule():
    labels = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    issues = rank_label_issues(labels, proba, method="threshold", below=0.6)
    assert list(issues.flagged) == [False, True, True, False]
    assert list(issues.order[:2]) == [1, 2] and list(issues.suggested) == [1, 1, 0, 0]
    above = rank_label_issues(labels, proba, method="threshold", below=None, above=0.65)
    assert list(above.flagged) == [False, True, False, False]


def test_cli_accepts_top_k_and_lists_views(store):
    root, *_ = store
    runner = CliRunner()
    out = runner.invoke(main, ["audit-labels", "--store", str(root), "--table", "digits/max",
                               "--neighbours", "0", "--accept-top", "3", "--accept-as",
                               "relabel", "--view", "cli"])
    assert out.exit_code == 0, out.output
    assert "View 'cli' revision 1: 0 keep, 3 relabel, 0 drop" in out.output
    listing = runner.invoke(main, ["audit-labels", "--store", str(root), "--list-views"])
    assert "cli" in listing.output and listing.exit_code == 0
    again = runner.invoke(main, ["audit-labels", "--store", str(root), "--table",
                                 "digits/max", "--accept-top", "3", "--view", "cli"])
    assert again.exit_code != 0 and "already exists" in again.output


#: Class names a hostile colleague might give folders: formulas once a spreadsheet opens them.
FORMULA_NAMES = {0: "=cmd|' -C calc'!A0", 1: "@SUM(1+1)", 3: "+HYPERLINK(1)", 8: "-2+3"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_suspects_csv_cells_cannot_start_a_formula_and_relabels_read_back_raw(tmp_path):
    root = tmp_path / "store"
    _, flips, true = build_store(root, tmp_path / "images", n_per_class=30,
                                 names=FORMULA_NAMES)
    fit(root, heads=["logreg"])
    audit = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", neighbours=0),
                             **QUIET)
    with open(audit.run_dir / "suspects.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and not [c for row in rows for c in row.values() if c.startswith(FORMULA_STARTS)]
    raw = pd.read_parquet(audit.run_dir / "suspects.parquet")
    assert set(raw["given_label"]) <= set(FORMULA_NAMES.values())  # Parquet: the real names
    assert {row["given_label"] for row in rows} == {"'" + g for g in raw["given_label"]}
    first = rows[0]
    first["decision"], first["new_label"] = "relabel", "'" + true[first["image_id"]]
    edited = tmp_path / "reviewed.csv"  # as a spreadsheet saves it: the quote kept
    with open(edited, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(first))
        writer.writeheader()
        writer.writerows(rows)
    view = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", apply=edited,
                                              view="fixed"), **QUIET).view
    assert list(view.decisions["new_label"].dropna()) == [true[first["image_id"]]]


def test_a_grown_table_warns_that_its_new_images_are_not_audited(store):
    root, lin, _, _ = store
    with Store(root).open("digits/max") as reader:
        meta = reader.metadata()
        train = np.flatnonzero((meta["split"] == "train") & (meta["aug_id"] == 0))[:5]
        X = reader.read_features(train)
    with Store(root).writer(lin, formats=("hdf5",)) as w:  # five new train images
        w.append(X, image_id=[f"{i:064x}" for i in range(10_000, 10_005)],
                 label=meta["label"].iloc[train], split=["train"] * 5,
                 path=meta["path"].iloc[train])
    said = []
    audit = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", neighbours=0),
                             echo=said.append)
    warning = [line for line in said if line.startswith("Warning:")]
    assert warning == [f"Warning: 5 train image(s) of table {lin.key} are not scored by the "
                       f"heads (added after they were fitted, or dropped by their view) and "
                       f"are not audited; rerun `featurestore fit-heads --table {lin.key}` "
                       f"to cover them."]
    assert len(audit.ranking) == int(((meta["split"] == "train") & (meta["aug_id"] == 0)).sum())
