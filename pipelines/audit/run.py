"""``featurestore audit-labels``: find likely label errors, review them, store a cleaned view.

1. **Audit**: the out-of-fold probabilities that ``fit-heads`` saved for each
   head (``oof.parquet``; an ensemble of the chosen heads and a neighbour vote,
   weighted by greedy selection) score every training image; cleanlab's
   confident learning (default) or the threshold rule flags and ranks the
   suspects. Written to
   ``STORE/audits/<table_key>/<run>/``: ``suspects.parquet``, ``suspects.csv``
   (with empty ``decision``, ``new_label`` and ``reason`` columns for the
   reviewer), ``run.json`` and ``index.html``, a gallery of suspects worst
   first beside their nearest images of the same and the suggested label.
2. **Review**: ``--apply FILE --view NAME`` stores the reviewed decisions
   (keep / relabel / drop) as a named view; ``--accept-top K --view NAME``
   drops (or, with ``--accept-as relabel``, relabels) the top K suspects.
   Views live in ``STORE/views.sqlite`` (:mod:`featurestore.views`); no image
   or table is ever moved, rewritten or deleted.
3. ``featurestore fit-heads --view NAME`` trains on the cleaned view.

The held-out split is audited only when asked explicitly (``--split test
--include-heldout``, scored by the refitted heads' ``heldout.parquet``), and
only such a view changes the held-out rows that heads are evaluated on.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import pandas as pd

from classifiers.errors import ClassifierError
from classifiers.label_issues import CALIBRATIONS, METHODS, neighbour_vote, rank_label_issues
from featurestore import FeatureStoreError, Store
from featurestore._io import atomic_write, atomic_write_text, utc_now, write_csv
from featurestore.views import View, ViewStore, check_view_name
from pipelines.audit.gallery import write_gallery
from pipelines.audit.review import ACCEPT_AS, accept_top, check_decisions, read_decisions
from pipelines.audit.scores import WEIGHTINGS, load_scores

SUSPECT_COLUMNS = ("rank", "image_id", "path", "given_label", "suggested_label", "score",
                   "decision", "new_label", "reason")


@dataclass
class AuditLabelsConfig:
    store: Path
    """Store folder holding the table and its fitted heads."""
    table: str
    """Lineage query or key of the table, e.g. ``densenet121/max``."""
    heads: Sequence[str] | None = None
    """Fitted heads whose probabilities are combined (``logreg``, ``knn@clean``, ...);
    None: every head fitted on the whole table."""
    method: str = "cleanlab"
    """``cleanlab`` (confident learning) or ``threshold`` (see ``below``/``above``)."""
    calibration: str = "temperature"
    """Out-of-fold recalibration of each head before combining: ``temperature``,
    ``isotonic`` or ``none`` (train split only)."""
    weighting: str = "greedy"
    """How the members (heads, neighbour vote) are weighted: ``greedy`` (ensemble
    selection on their log-loss against the given labels) or ``equal``."""
    tta: bool = False
    """Average each train image's out-of-fold probabilities over its augmented views,
    where the table has views (test-time augmentation; off by default: on the
    look-alike benchmark it ranked flips worse at 5%, no better at 10%)."""
    neighbour_vote: bool = True
    """Add the out-of-fold vote of each image's nearest neighbours in feature space
    as one more ensemble member (train split, unless a ``knn`` head is audited)."""
    top: int | None = None
    """Keep at most this many suspects (worst first); None: every flagged image."""
    below: float | None = 0.5
    """threshold method: flag images whose probability of their own label is below this."""
    above: float | None = None
    """threshold method: flag images whose probability of another label is above this."""
    split: str = "train"
    """Split to audit; ``val``/``test`` need ``include_heldout``."""
    include_heldout: bool = False
    """Say explicitly that held-out images are audited and may change in the view."""
    neighbours: int = 4
    """Nearest images shown per suspect and label in the gallery (0: no gallery)."""
    heatmaps: bool = False
    """Draw a heatmap (``featurestore explain``) beside each suspect's thumbnail, by the
    first audited head that can be explained; it builds that head's backbone, so it is
    opt-in."""
    run: str | None = None
    """Name of the audit run folder; default ``<UTC time>-<method>``."""
    view: str | None = None
    """Name of the view that ``accept_top`` or ``apply`` creates."""
    accept_top: int | None = None
    """Accept the top K suspects of this audit into ``view``."""
    accept_as: str = "drop"
    """What accepting does: ``drop`` the image, or ``relabel`` it to the suggested label."""
    apply: Path | None = None
    """A reviewed suspects file (CSV/Parquet) to store as ``view``; no audit is run."""
    author: str | None = None
    """Who decided (default: the login name)."""
    reason: str | None = None
    """Why, for decisions that give no reason of their own."""
    replace: bool = False
    """Allow ``view`` to exist already: a new revision is added, the old one kept."""


@dataclass
class AuditResult:
    table_key: str
    method: str | None = None
    heads: list[str] = field(default_factory=list)
    ranking: pd.DataFrame | None = None
    """Every audited image, flagged first and worst first (columns as suspects plus
    ``flagged``)."""
    suspects: pd.DataFrame | None = None
    run_dir: Path | None = None
    view: View | None = None


def _check_config(config: AuditLabelsConfig) -> None:
    if config.calibration not in CALIBRATIONS:
        raise FeatureStoreError(f"calibration must be one of {', '.join(CALIBRATIONS)}; "
                                f"got {config.calibration!r}.")
    if config.weighting not in WEIGHTINGS:
        raise FeatureStoreError(f"weighting must be one of {', '.join(WEIGHTINGS)}; "
                                f"got {config.weighting!r}.")
    if config.method not in METHODS:
        raise FeatureStoreError(f"method must be one of {', '.join(METHODS)}; "
                                f"got {config.method!r}.")
    if config.split not in ("train", "val", "test"):
        raise FeatureStoreError(f"split must be train, val or test; got {config.split!r}.")
    if config.split != "train" and not config.include_heldout:
        raise FeatureStoreError(f"split {config.split!r} is held out: audit it only with "
                                f"include_heldout (--include-heldout), which lets the view "
                                f"change the images heads are evaluated on.")
    if (config.accept_top is not None or config.apply is not None) and not config.view:
        raise FeatureStoreError("accept_top and apply store a view: give its name (--view).")
    if config.accept_top is not None and config.apply is not None:
        raise FeatureStoreError("Give accept_top or apply, not both.")
    if config.accept_as not in ACCEPT_AS:
        raise FeatureStoreError(f"accept_as must be one of {', '.join(ACCEPT_AS)}; "
                                f"got {config.accept_as!r}.")
    if config.view:
        check_view_name(config.view)
    if config.top is not None and config.top < 1:
        raise FeatureStoreError(f"top must be >= 1; got {config.top}.")


def run_audit_labels(config: AuditLabelsConfig, echo: Callable[[str], None] = print) -> AuditResult:
    """Audit the table's labels, or store reviewed decisions (``config.apply``) as a view."""
    _check_config(config)
    store = Store(config.store, create=False)
    with store.open(config.table) as reader:
        key = reader.key
        meta = reader.metadata()
    images = meta[meta["aug_id"] == 0]
    author = config.author or getpass.getuser()
    if config.view and not config.replace:
        ViewStore(store).refuse_existing(config.view)  # before the audit's work
    if config.apply is not None:
        return _apply_file(store, key, images, config, author, echo)
    result = _audit(store, key, images, config, echo)
    if config.accept_top is not None:
        decisions = accept_top(result.suspects, config.accept_top, accept_as=config.accept_as,
                               author=author, why=config.reason or f"audit {result.run_dir.name}")
        if len(decisions) < config.accept_top:
            echo(f"Only {len(decisions)} suspects to accept (asked for {config.accept_top}).")
        source = {"audit_run": str(result.run_dir), "table_key": key, "heads": result.heads,
                  "method": config.method, "accept_top": config.accept_top,
                  "accept_as": config.accept_as, "split": config.split}
        result.view = _create_view(store, config, decisions, source, author, echo)
    return result


def _audit(store: Store, key: str, images: pd.DataFrame, config: AuditLabelsConfig,
           echo) -> AuditResult:
    scores = load_scores(store, key, config.heads, config.split, config.calibration,
                         tta=config.tta)
    _warn_unscored(images, scores.image_id, key, config.split, echo)
    X = None
    if _wants_vote(config, scores):
        X = _features(store, key, scores.image_id)
        _add_neighbour_vote(scores, X, config.calibration)
    scores.combine(config.weighting)
    issues = rank_label_issues(scores.labels, scores.proba, method=config.method,
                               below=config.below, above=config.above)
    classes = np.asarray(scores.classes)
    path_of = dict(zip(images["image_id"], images["path"]))
    ranking = _ranking(scores, issues, path_of)
    suspects = ranking[ranking["flagged"]].head(config.top)[list(SUSPECT_COLUMNS)]
    run_dir = _new_run_dir(store, key, config)
    atomic_write(run_dir / "suspects.parquet", lambda t: suspects.to_parquet(t, index=False))
    write_csv(suspects, run_dir / "suspects.csv")  # formula-safe; the Parquet keeps raw text
    context = {"table_key": key, "split": config.split, "method": config.method,
               "heads": scores.heads,
               "weights": dict(zip(scores.heads, np.round(scores.weights, 3).tolist())),
               "n_flagged": int(issues.flagged.sum()),
               "n_rows": len(ranking)}
    atomic_write_text(run_dir / "run.json", json.dumps(
        {**context, "config": asdict(config), "created_at": utc_now()}, indent=2, default=str))
    members = ", ".join(f"{h} {w:.2f}" for h, w in context["weights"].items())
    echo(f"Audit of {key} ({config.split}, {len(ranking)} images, weights {members}): "
         f"{context['n_flagged']} flagged by {config.method}, "
         f"{len(suspects)} written to {run_dir / 'suspects.csv'}")
    if config.neighbours > 0 and len(suspects):
        X = _features(store, key, scores.image_id) if X is None else X
        rows = pd.DataFrame({"image_id": scores.image_id, "path": [
            path_of.get(i, "") for i in scores.image_id],
            "given_label": classes[scores.labels]})
        page = write_gallery(run_dir, store, suspects, rows, X, k=config.neighbours,
                             context=context, heatmaps=_heatmaps(store, key, scores.heads,
                                                                 run_dir, config))
        echo(f"Gallery: {page}")
    return AuditResult(key, config.method, scores.heads, ranking, suspects, run_dir)


def _heatmaps(store: Store, key: str, heads: list[str], run_dir: Path, config):
    """The gallery's heatmap writer for the audited heads; linear heads first (exact, cheapest)."""
    if not config.heatmaps:
        return None
    from pipelines.explain.gallery import GalleryHeatmaps
    from pipelines.explain.run import LINEAR_HEADS

    names = sorted(heads, key=lambda h: h.partition("@")[0] not in LINEAR_HEADS)
    writer = GalleryHeatmaps(store, run_dir)
    return lambda images: writer([f"{key}/{h}" for h in names if h != "neighbours"], images)


def _wants_vote(config: AuditLabelsConfig, scores) -> bool:
    # A knn head already is a neighbour vote; held-out scores have no folds.
    return (config.neighbour_vote and scores.fold is not None
            and not any(h.partition("@")[0] == "knn" for h in scores.heads))


def _add_neighbour_vote(scores, X: np.ndarray, calibration: str) -> None:
    """Add the neighbours' out-of-fold vote to ``scores`` as one member among the heads.

    Why: on look-alike classes a weak linear head and a neighbour vote err on
    different images, and together they rank flipped labels better than either;
    next to a strong head the greedy weights give the vote little say
    (``benchmarks/bench_audit.py --features lookalike``).
    """
    from classifiers.calibration import calibrate_out_of_fold  # scikit-learn's calibration

    votes = neighbour_vote(X, scores.labels, scores.fold, len(scores.classes))
    scores.add_member("neighbours", calibrate_out_of_fold(scores.labels, votes, scores.fold,
                                                          method=calibration))


def _warn_unscored(images: pd.DataFrame, scored: np.ndarray, key: str, split: str,
                   echo) -> None:
    """Say how many ``split`` images of the table the heads' predictions do not cover."""
    wanted = images.loc[images["split"] == split, "image_id"]
    missing = int((~wanted.isin(set(scored))).sum())
    if missing:
        echo(f"Warning: {missing} {split} image(s) of table {key} are not scored by the heads "
             f"(added after they were fitted, or dropped by their view) and are not audited; "
             f"rerun `featurestore fit-heads --table {key}` to cover them.")


def _ranking(scores, issues, path_of: dict) -> pd.DataFrame:
    """Every audited image, flagged first and worst first, with empty review columns."""
    classes, order = np.asarray(scores.classes), issues.order
    return pd.DataFrame({
        "rank": np.arange(1, len(order) + 1), "image_id": scores.image_id[order],
        "path": [path_of.get(i, "") for i in scores.image_id[order]],
        "given_label": classes[scores.labels[order]],
        "suggested_label": classes[issues.suggested[order]],
        "score": issues.score[order], "decision": "", "new_label": "", "reason": "",
        "flagged": issues.flagged[order]})


def _features(store: Store, key: str, image_id: np.ndarray) -> np.ndarray:
    """Raw features of ``image_id`` rows, in that order."""
    with store.open(key) as reader:
        ids = reader.column("image_id")
        raw = np.flatnonzero(reader.column("aug_id") == 0)
        position = pd.Series(raw, index=ids[raw])
        missing = ~pd.Index(image_id).isin(position.index)
        if missing.any():
            raise FeatureStoreError(
                f"{int(missing.sum())} images scored by the heads are not in table {key} "
                f"(e.g. {image_id[missing][0]}); refit the heads on the table as it is now.")
        rows = position.loc[image_id].to_numpy()
        order = np.argsort(rows)
        X = np.empty((len(rows), reader.dimension), dtype=np.float32)
        X[order] = reader.read_features(rows[order])
    return X


def _apply_file(store, key, images, config: AuditLabelsConfig, author, echo) -> AuditResult:
    frame = read_decisions(config.apply)
    classes = sorted(images.loc[images["split"] == "train", "label"].unique())
    decisions = check_decisions(frame, images, classes, include_heldout=config.include_heldout,
                                author=author, reason=config.reason)
    source = {"decisions_file": str(Path(config.apply).resolve()), "table_key": key}
    run_json = Path(config.apply).parent / "run.json"
    if run_json.exists():  # the file was edited in place inside its audit run folder
        run = json.loads(run_json.read_text())
        source.update(audit_run=str(run_json.parent), heads=run.get("heads"),
                      method=run.get("method"), split=run.get("split"))
    view = _create_view(store, config, decisions, source, author, echo)
    return AuditResult(key, view=view)


def _create_view(store, config: AuditLabelsConfig, decisions, source, author, echo) -> View:
    view = ViewStore(store).create(config.view, decisions, author=author, source=source,
                                        covers_heldout=config.include_heldout,
                                        replace=config.replace)
    counts = ", ".join(f"{n} {a}" for a, n in view.counts().items())
    held = "; covers held-out images" if view.covers_heldout else ""
    echo(f"View {view.name!r} revision {view.revision}: {counts}{held}. Train on it with "
         f"`featurestore fit-heads --table {source['table_key']} --view {view.name}`.")
    return view


def _new_run_dir(store: Store, key: str, config: AuditLabelsConfig) -> Path:
    base = config.run or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{config.method}"
    check_view_name(base)  # same rules: it is a folder name
    parent = store.paths.audits_of(key)
    for n in range(1, 1000):
        run_dir = parent / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise FeatureStoreError(f"Too many audit runs named {base!r} in {parent}.")


def format_views(store: str | Path | Store) -> str:
    views = ViewStore(store).list()
    if views.empty:
        return "(no views yet)"
    return views.to_string(index=False)


@click.command("audit-labels")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--table", default=None, help="Lineage query or key, e.g. densenet121/max.")
@click.option("--heads", default=None,
              help="Comma-separated fitted heads to average [default: all on the table].")
@click.option("--method", type=click.Choice(METHODS), default="cleanlab", show_default=True)
@click.option("--calibration", type=click.Choice(CALIBRATIONS), default="temperature",
              show_default=True, help="Out-of-fold recalibration of each head before averaging.")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default="greedy", show_default=True,
              help="Member weights: greedy selection on log-loss, or equal.")
@click.option("--tta/--no-tta", default=False, show_default=True,
              help="Average each image over its augmented views' out-of-fold probabilities.")
@click.option("--neighbour-vote/--no-neighbour-vote", default=True, show_default=True,
              help="Add the out-of-fold vote of nearest neighbours in feature space.")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="Keep the K worst suspects [default: every flagged image].")
@click.option("--below", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="threshold method: own-label probability below this is suspect.")
@click.option("--above", type=click.FloatRange(0, 1), default=None,
              help="threshold method: another label's probability above this is suspect.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train",
              show_default=True)
@click.option("--include-heldout", is_flag=True,
              help="Allow auditing and changing held-out images (val/test) explicitly.")
@click.option("--neighbours", type=click.IntRange(min=0), default=4, show_default=True,
              help="Neighbours per suspect and label in the gallery (0: no gallery).")
@click.option("--heatmaps", is_flag=True,
              help="Heatmap beside each suspect's thumbnail (builds the head's backbone).")
@click.option("--run", default=None, help="Audit run folder name [default: time-method].")
@click.option("--view", default=None, help="Name of the view to create.")
@click.option("--accept-top", type=click.IntRange(min=1), default=None,
              help="Accept the top K suspects into --view.")
@click.option("--accept-as", type=click.Choice(ACCEPT_AS), default="drop", show_default=True)
@click.option("--apply", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Reviewed suspects CSV/Parquet to store as --view.")
@click.option("--author", default=None, help="Who decided [default: login name].")
@click.option("--reason", default=None, help="Why, where a decision gives no reason.")
@click.option("--replace", is_flag=True, help="Add a new revision of an existing view.")
@click.option("--list-views", is_flag=True, help="List the store's views and exit.")
def command(store, table, heads, list_views, **options):
    """Find likely label errors, review them, and store the decisions as a cleaned view."""
    if list_views:
        try:
            click.echo(format_views(store))
        except FeatureStoreError as err:
            raise click.ClickException(str(err)) from err
        return
    if not table:
        raise click.UsageError("Missing option '--table' (needed unless --list-views).")
    names = None if heads is None else [h.strip() for h in heads.split(",") if h.strip()]
    try:
        run_audit_labels(AuditLabelsConfig(store=store, table=table, heads=names, **options),
                         echo=click.echo)
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise click.ClickException(str(err)) from err
