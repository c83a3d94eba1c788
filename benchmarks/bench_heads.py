"""Benchmark the classifier heads at the container-scan training size.

On a synthetic 20,800 x 1,024 float32 table with a learnable signal (a linear
and an interaction term of a 16-dimensional latent, seen through ReLU
features, like pooled CNN features), plus a quarter as many held-out rows,
this measures:

1. per head: seconds per trial (one 5-fold cross-validation of the head's
   default parameters) with its out-of-fold balanced accuracy and ROC AUC, and
   seconds of one fit on all rows; keras_dense at 1 and 16 training steps per
   TensorFlow call;
2. Keras memory from trial to trial (resident set size after each trial of a
   resumed study);
3. the whole search through ``fit-heads`` (every head but the ensemble, 20
   trials each, 5 folds, refits and held-out scores included) as it was
   ("before": one process, median pruning) and as it runs now on two cores
   ("after": ``--workers 2`` on one SQLite storage, one thread each, successive
   halving), in the same run: per-head cost per trial, trials, best
   cross-validation score and held-out accuracy, and before / after (target
   28.3 -> 10 min, 2.83x, best scores no worse);
4. one epoch of end-to-end DenseNet121 training on 224 x 224 images of the
   same count, extrapolated from a few timed training steps, and its ratio to
   each head's fit.

``--quick`` runs everything at a tenth of the rows, 3 trials per head, and
2 DenseNet steps; use it to check the script, not for the numbers.
``--bounded`` runs section 3 only, on a fifth of the rows with 10 trials per
head (about 5 min on 2 quiet cores), and prints the same before/after lines.

    python benchmarks/bench_heads.py --quick
    python benchmarks/bench_heads.py --bounded     # section 3, a fifth of the size
    python benchmarks/bench_heads.py --skip-memory --skip-densenet   # full size, ~40 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifiers import create_head, list_heads  # noqa: E402
from classifiers.cv import grouped_folds  # noqa: E402
from classifiers.metrics import make_objective, roc_auc  # noqa: E402
from classifiers.tuning import tune_head  # noqa: E402

def make_table(n_rows: int, n_features: int, seed: int = 0):
    """``X (n_rows, n_features)`` float32, binary labels, one group per row."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_rows, 16)).astype(np.float32)
    mixing = rng.standard_normal((16, n_features)).astype(np.float32) / 4
    X = np.maximum(latent @ mixing + rng.standard_normal((n_rows, n_features),
                                                         dtype=np.float32), 0)
    signal = latent[:, 0] + 0.8 * latent[:, 1] * latent[:, 2] + 0.5 * rng.standard_normal(n_rows)
    y = np.where(signal > 0, "loaded", "empty")
    return X, y, np.array([f"img{i:06d}" for i in range(n_rows)])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_trials(heads, X, y, groups, folds, objective) -> dict:
    """One default-params trial (a full CV) and one full fit per head."""
    classes = np.unique(y)
    y_enc = np.searchsorted(classes, y)
    rows = {}
    for head in heads:
        started = time.perf_counter()
        result = tune_head(head, X, y, groups, folds, objective=objective, search=False,
                            fixed_params={"n_jobs": 2})
        trial = time.perf_counter() - started
        started = time.perf_counter()
        create_head(head, **result.params).fit(X, y, groups=groups)
        fit = time.perf_counter() - started
        pred = np.argmax(result.oof, axis=1)
        bal = float(np.mean([np.mean(pred[y_enc == k] == k) for k in range(len(classes))]))
        rows[head] = {"sec_per_trial": trial, "sec_per_fit": fit, "balanced_accuracy": bal,
                      "roc_auc": roc_auc(y_enc, result.oof)}
        print(f"  {head:12s} trial {trial:8.1f} s   fit {fit:7.1f} s   "
              f"OOF balanced acc {bal:.3f}   AUC {rows[head]['roc_auc']:.3f}", flush=True)
    return rows


def bench_keras_memory(X, y, groups, folds, objective, n_trials: int) -> list[float]:
    """RSS (MB) of this process after each Keras trial; the study is resumed one trial at a time."""
    import optuna

    storage = optuna.storages.InMemoryStorage()
    sizes = []
    for n in range(1, n_trials + 1):
        tune_head("keras_dense", X, y, groups, folds, objective=objective, n_trials=n,
                   storage=storage, study_name="memory", fixed_params={"max_epochs": 5})
        sizes.append(rss_mb())
    return sizes


def write_store(root: Path, X, y, n_train: int):
    """A store holding the table: its first ``n_train`` rows train, the rest test."""
    from featurestore import Lineage, Store

    lineage = Lineage(backbone="synthetic", weights="none", pool="max", input_size=1,
                      preprocessing="none")
    split = np.where(np.arange(len(y)) < n_train, "train", "test")
    with Store(root).writer(lineage, formats=("hdf5",)) as writer:
        writer.append(X, image_id=[f"{i:064x}" for i in range(len(y))], label=y,
                      split=list(split))
    return lineage.key


#: The search as it was (one process, median pruning) and as fit-heads now runs it on
#: two cores (two workers on one storage, one thread each, successive halving).
PLANS = {"before": {"workers": 1, "pruner": "median", "n_jobs": 2},
         "after": {"workers": 2, "pruner": "halving", "n_jobs": None}}


def bench_search(root: Path, table: str, heads, n_trials: int, folds: int) -> dict:
    """Wall time, per-head trial cost and best score of ``fit-heads`` under each plan."""
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

    out = {}
    for plan, settings in PLANS.items():
        config = FitHeadsConfig(store=root, table=table, heads=list(heads), n_trials=n_trials,
                                cv=folds, storage=f"sqlite:///{root / f'{plan}.sqlite'}",
                                **settings)
        started = time.perf_counter()
        result = run_fit_heads(config, echo=lambda line: None)
        board = result.leaderboard.set_index("head")
        out[plan] = {"seconds": time.perf_counter() - started, "heads": {
            head: {"best": float(board.loc[head, "cv_score"]),
                   "accuracy": float(board.loc[head, "accuracy"]),
                   "trials": int(board.loc[head, "trials"]),
                   "pruned": int(board.loc[head, "pruned"]),
                   "sec_per_trial": float(board.loc[head, "sec_per_trial"] or np.nan)}
            for head in heads}}
        print(f"  {plan} ({settings}): {out[plan]['seconds'] / 60:.1f} min", flush=True)
    print(f"  {'head':12s} {'s/complete trial':>17s} {'complete+pruned':>16s} "
          f"{'best cv':>15s} {'held-out acc':>15s}   (before -> after)")
    for head in heads:
        b, a = out["before"]["heads"][head], out["after"]["heads"][head]
        print(f"  {head:12s} {b['sec_per_trial']:7.1f} -> {a['sec_per_trial']:5.1f}   "
              f"{b['trials']:2d}+{b['pruned']:<2d} -> {a['trials']:2d}+{a['pruned']:<2d}   "
              f"{b['best']:.4f} -> {a['best']:.4f}  {b['accuracy']:.4f} -> {a['accuracy']:.4f}")
    ratio = out["before"]["seconds"] / out["after"]["seconds"]
    worst = min(out["after"]["heads"][h]["best"] - out["before"]["heads"][h]["best"]
                for h in heads)
    print(f"  whole search: before / after = {ratio:.2f}x (target >= 2.83x: 28.3 -> 10 min); "
          f"worst best-score change {worst:+.4f} (target >= 0)", flush=True)
    out["ratio"], out["worst_best_change"] = ratio, worst
    return out


def bench_keras_steps(X, y, groups, folds, objective) -> dict:
    """One keras_dense trial at one training step per TensorFlow call, and at the default."""
    out = {}
    for steps in (1, 16):
        started = time.perf_counter()
        tune_head("keras_dense", X, y, groups, folds, objective=objective, search=False,
                  fixed_params={"steps_per_execution": steps})
        out[steps] = time.perf_counter() - started
    print(f"  keras_dense trial: 1 step per call {out[1]:.1f} s, 16 steps {out[16]:.1f} s "
          f"({out[1] / out[16]:.2f}x)", flush=True)
    return out


def bench_densenet(n_images: int, steps: int, batch: int) -> dict:
    """Seconds per training step of DenseNet121 at 224 x 224, extrapolated to one epoch."""
    import keras

    model = keras.applications.DenseNet121(weights=None, input_shape=(224, 224, 3), classes=2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.random((batch, 224, 224, 3), dtype=np.float32)
    labels = rng.integers(0, 2, batch)
    model.train_on_batch(images, labels)  # builds and traces: not timed
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    per_step = (time.perf_counter() - started) / steps
    epoch = per_step * int(np.ceil(n_images / batch))
    print(f"  DenseNet121 224x224 batch {batch}: {per_step:.2f} s/step -> one epoch of "
          f"{n_images} images ~ {epoch / 60:.1f} min", flush=True)
    return {"sec_per_step": per_step, "batch": batch, "epoch_seconds": epoch}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows, 3 trials")
    parser.add_argument("--bounded", action="store_true",
                        help="the search only, on a fifth of the rows with 10 trials")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--heads", default=",".join(h for h in list_heads() if h != "ensemble"))
    parser.add_argument("--skip-trials", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-densenet", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.bounded:
        args.skip_trials = args.skip_memory = args.skip_densenet = True
    rows = args.rows or (2080 if args.quick else 4160 if args.bounded else 20800)
    trials = args.trials or (3 if args.quick else 10 if args.bounded else 20)
    heads = args.heads.split(",")
    print(f"Table {rows} x {args.features}, {args.folds} folds, {os.cpu_count()} cores",
          flush=True)
    X, y, groups = make_table(rows + rows // 4, args.features)  # the extra quarter: held out
    folds = grouped_folds(y[:rows], groups[:rows], np.ones(rows, bool), n_splits=args.folds)
    objective = make_objective("balanced_accuracy", np.unique(y))
    report = {"rows": rows, "features": args.features, "folds": args.folds}
    train = X[:rows], y[:rows], groups[:rows], folds, objective

    if not args.skip_trials:
        print("\n1. One trial (default params, full CV) and one full fit per head:")
        report["heads"] = bench_trials(heads, *train)
        if "keras_dense" in heads:
            report["keras_steps"] = bench_keras_steps(*train)
        projected = sum(20 * r["sec_per_trial"] for r in report["heads"].values())
        print(f"  20 trials per head without pruning would take {projected / 60:.1f} min "
              f"(sum of 20 x the per-trial times above)")

    if "keras_dense" in heads and not args.skip_memory:
        print("\n2. Keras memory after each trial (RSS, MB):")
        report["keras_rss_mb"] = bench_keras_memory(*train, 4)
        print("  " + ", ".join(f"{v:.0f}" for v in report["keras_rss_mb"]))

    if not args.skip_search:
        print(f"\n3. Whole search, fit-heads before and after: {len(heads)} heads x {trials} "
              f"trials x {args.folds} folds, refits and held-out scores included:")
        with tempfile.TemporaryDirectory() as tmp:
            table = write_store(Path(tmp) / "store", X, y, rows)
            report["search"] = bench_search(Path(tmp) / "store", table, heads, trials,
                                            args.folds)

    if args.skip_densenet or "heads" not in report:
        return _write(report, args.json)
    print("\n4. End-to-end DenseNet121 vs heads on stored features:")
    report["densenet"] = bench_densenet(rows, steps=2 if args.quick else 4,
                                        batch=8 if args.quick else 16)
    epoch = report["densenet"]["epoch_seconds"]
    for head, r in report["heads"].items():
        print(f"  one DenseNet121 epoch / one {head} fit = {epoch / r['sec_per_fit']:8.0f} x")
    return _write(report, args.json)


def _write(report: dict, path: Path | None) -> dict:
    if path:
        path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":  # workers are spawned: they import this file, never run it
    main()
