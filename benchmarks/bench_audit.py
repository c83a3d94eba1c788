"""Quality of ``audit-labels`` on real labelled images with labels flipped at random.

scikit-learn's digits (1,797 real 8x8 scans) go through the real pipeline:
written as 64x64 PNGs, scanned (70/15/15 train/val/test split per class) and
extracted with DenseNet121 (max pooling). ``--features pixels`` skips
extraction and uses the 64 pixel values as the feature table instead.
``--features lookalike`` is the hard case that real X-ray classes pose: only
the confusable digits 3, 5, 8 and 9, their pixels degraded by Gaussian noise
(sigma 8 grey levels of 16, seeded) until a plain logistic regression reaches
about 0.72 held-out accuracy.

Every audit is printed beside the plain ranking a user could write in three
lines: scikit-learn's ``cross_val_predict`` of ``LogisticRegression`` (5
folds) on the same features, ranked by the probability of the given label;
and beside the project's audit without its recalibration and neighbour vote
(``--calibration none --no-neighbour-vote``, the audit before issue 18). For
each ranking, a plain logistic regression is refitted without its top K and
scored on the test split.

For each flip rate (5% and 10% of the train labels, changed to another class
at random, seeded) the script fits heads on the noisy labels (``fit-heads``:
out-of-fold probabilities), audits them with cleanlab and with the threshold
rule, and prints precision and recall of the suspects list at K = number of
flips against chance (K / n train images). Then it accepts the top K suspects
into a view (dropped, and in a second view relabelled to the suggestion),
refits on each view, and prints held-out test accuracy before vs after, with
the heads fitted on the true labels as the ceiling. The held-out labels are
never flipped or changed.

    python benchmarks/bench_audit.py                     # DenseNet121 features, random weights
    python benchmarks/bench_audit.py --features pixels   # seconds, no TensorFlow
    python benchmarks/bench_audit.py --features lookalike --heads logreg --trials 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore import Lineage, Store  # noqa: E402
from pipelines.audit.run import AuditLabelsConfig, run_audit_labels  # noqa: E402
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads  # noqa: E402

QUIET = {"echo": lambda s: None}
#: ``(X, labels, split, image ids)`` of one noisy store.
Table = tuple
#: The audit as it was before out-of-fold recalibration and the neighbour vote.
UNCALIBRATED = {"calibration": "none", "neighbour_vote": False}


def densenet_table(workdir: Path, weights: str):
    """Digits through scan + extract; ``(X, labels, splits, image ids, lineage)``."""
    from pipelines.demo.data import write_digits_dataset
    from pipelines.extract.run import ExtractConfig, run_extract
    from pipelines.scan import ScanConfig, run_scan

    dataset, store = workdir / "digits", workdir / "extracted"
    write_digits_dataset(dataset, size=64)
    run_scan(ScanConfig(dataset=dataset, store=store, progress=False))
    started = time.perf_counter()
    result = run_extract(ExtractConfig(dataset=dataset, store=store, pool="max", weights=weights,
                                       image_size=64, progress=False))
    print(f"extract: {result.images} images in {time.perf_counter() - started:.0f} s")
    with Store(store).open(result.tables["max"]) as reader:
        meta = reader.metadata()
        X = reader.read_features()
        return X, meta["label"].to_numpy(), meta["split"].to_numpy(), \
            meta["image_id"].to_numpy(), reader.lineage


def pixel_table():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    index = np.arange(len(y))
    train, rest = train_test_split(index, test_size=0.3, stratify=y, random_state=0)
    val, _ = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    split = np.full(len(y), "test", dtype=object)
    split[train], split[val] = "train", "val"
    lineage = Lineage(backbone="pixels", weights="none", pool="none", input_size=8,
                      preprocessing="none")
    return X.astype(np.float32), y.astype(str), split.astype(str), \
        np.array([f"{i:064x}" for i in index]), lineage


def lookalike_table(sigma: float = 8.0, seed: int = 0):
    """Digits 3/5/8/9 with noisy pixels: look-alike classes, logreg about 0.7 held out."""
    X, labels, split, ids, lineage = pixel_table()
    keep = np.isin(labels, ["3", "5", "8", "9"])
    noisy = X[keep] + np.random.default_rng(seed).normal(0, sigma, X[keep].shape)
    return noisy.astype(np.float32), labels[keep], split[keep], ids[keep], lineage


def write_store(root: Path, X, labels, split, ids, lineage) -> None:
    with Store(root).writer(lineage, formats=("hdf5",)) as w:
        w.append(X, image_id=ids, label=labels, split=split)


def flip(labels, split, rate: float, seed: int):
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(split == "train")
    chosen = rng.choice(train, size=int(round(rate * len(train))), replace=False)
    noisy = labels.copy()
    classes = np.unique(labels)
    for i in chosen:
        noisy[i] = rng.choice(classes[classes != labels[i]])
    return noisy, chosen


def accuracy(root: Path, key: str, heads, trials: int, view=None) -> dict:
    result = run_fit_heads(FitHeadsConfig(
        store=root, table=key, heads=heads, search="optuna" if trials else "none",
        n_trials=max(trials, 1), cv=5, view=view, eval_split="test"), **QUIET)
    return {h: r.metrics["accuracy"] for h, r in result.heads.items()}


def audit_figures(root: Path, key: str, flipped: set, n_train: int, method: str,
                  table: Table, **options):
    k = len(flipped)
    name = "-".join([method, *(f"{v}" for v in options.values())])
    audit = run_audit_labels(AuditLabelsConfig(store=root, table=key, method=method, neighbours=0,
                                               run=f"bench-{name}", **options), **QUIET)
    top = audit.suspects.head(k)
    hits = int(top["image_id"].isin(flipped).sum())
    return {"method": name, "flagged": int(audit.ranking["flagged"].sum()), "K": k,
            "precision@K": hits / max(len(top), 1), "recall@K": hits / k,
            "chance": k / n_train, "logreg acc after drop": drop_accuracy(table, top["image_id"])}


def plain_figures(table: Table, flipped: set, n_train: int, seed: int) -> dict:
    """The plain ranking: 5-fold ``cross_val_predict`` logreg, lowest given-label probability first."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    X, labels, split, ids = table
    train = split == "train"
    classes, y = np.unique(labels[train], return_inverse=True)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    proba = cross_val_predict(LogisticRegression(max_iter=1000), X[train], y, cv=folds,
                              method="predict_proba")
    k = len(flipped)
    top = ids[train][np.argsort(proba[np.arange(len(y)), y], kind="stable")[:k]]
    hits = int(np.isin(top, list(flipped)).sum())
    return {"method": "plain cross_val_predict", "flagged": k, "K": k, "precision@K": hits / k,
            "recall@K": hits / k, "chance": k / n_train,
            "logreg acc after drop": drop_accuracy(table, top)}


def drop_accuracy(table: Table, dropped) -> float:
    """Test accuracy of a plain logreg trained on the noisy train split without ``dropped``."""
    from sklearn.linear_model import LogisticRegression

    X, labels, split, ids = table
    train = (split == "train") & ~np.isin(ids, np.asarray(dropped))
    model = LogisticRegression(max_iter=1000).fit(X[train], labels[train])
    return float(model.score(X[split == "test"], labels[split == "test"]))


def run(args) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-audit-"))
    started = time.perf_counter()
    X, labels, split, ids, lineage = {
        "densenet": lambda: densenet_table(workdir, args.weights), "pixels": pixel_table,
        "lookalike": lookalike_table}[args.features]()
    n_train = int((split == "train").sum())
    print(f"features: {args.features}, {X.shape[1]} per image; {n_train} train, "
          f"{int((split == 'test').sum())} test images; heads {', '.join(args.heads)}")
    write_store(workdir / "clean", X, labels, split, ids, lineage)
    ceiling = accuracy(workdir / "clean", lineage.key, args.heads, args.trials)
    audits, accuracies = [], []
    for rate in args.rates:
        root = workdir / f"flip{int(rate * 100):02d}"
        noisy, chosen = flip(labels, split, rate, args.seed)
        write_store(root, X, noisy, split, ids, lineage)
        flipped = set(ids[chosen])
        before = accuracy(root, lineage.key, args.heads, args.trials)
        table = (X, noisy, split, ids)
        audits.append({"flip_rate": rate, **plain_figures(table, flipped, n_train, args.seed)})
        for method, options in (("cleanlab", UNCALIBRATED), ("cleanlab", {}),
                                ("threshold", {})):
            audits.append({"flip_rate": rate, **audit_figures(
                root, lineage.key, flipped, n_train, method, table, **options)})
        row = {"flip_rate": rate, "flips": len(chosen)}
        for accept_as in ("drop", "relabel"):
            name = f"top{len(chosen)}-{accept_as}"
            run_audit_labels(AuditLabelsConfig(store=root, table=lineage.key, neighbours=0,
                                         view=name, accept_top=len(chosen),
                                         accept_as=accept_as, run=f"bench-{name}"), **QUIET)
            after = accuracy(root, lineage.key, args.heads, args.trials, view=name)
            for head in args.heads:
                row[f"{head} after {accept_as}"] = after[head]
        for head in args.heads:
            row[f"{head} before"] = before[head]
            row[f"{head} clean labels"] = ceiling[head]
        accuracies.append(row)
    print("\nAudit of the train labels (suspects list, K = number of flips):")
    print(pd.DataFrame(audits).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nHeld-out test accuracy (test labels never changed):")
    table = pd.DataFrame(accuracies).set_index(["flip_rate", "flips"]).T.sort_index()
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; stores in {workdir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", choices=("densenet", "pixels", "lookalike"), default="densenet")
    parser.add_argument("--weights", default="none",
                        help="DenseNet weights: none (seeded random, offline) or imagenet.")
    parser.add_argument("--heads", nargs="+", default=["logreg", "knn"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.10])
    parser.add_argument("--trials", type=int, default=0,
                        help="Optuna trials per head (0: each head's defaults, no search).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Keep the stores here.")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
