"""A learned embedding (fit-embedding) against its parent table, on real digit scans.

Prints (issue #17), each figure beside the parent's own measured in the same run:

* seen classes: precision@10 of ``eval-search`` (test-split queries) on the derived
  table and on its parent, trained on every digit;
* unseen classes: trained on digits 0-6 only, then on the images of 7, 8 and 9
  (never seen in training): precision@10 among them and the ROC AUC of
  "same digit?" from pair distances, derived table against the parent's raw
  features (cosine, i.e. the distance of L2-normalised rows);
* seconds per training epoch, against the seconds of one CNN pass over the images.

Parent features: DenseNet121 with seeded random weights (``--weights none``) at
32 px, average pooling, one mild augmented view per train image. ImageNet weights
cannot be downloaded on the offline development machine; with them, pass
``--weights imagenet`` (or a file) and the parent is the users' real starting point.

    python benchmarks/bench_embedding.py [--epochs 20] [--dim 128] [--weights none]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from classifiers.embedding.verifier import pair_distances, sample_pairs
from featurestore import Store
from featurestore.similarity import exact_search, normalize_rows
from pipelines.demo.data import write_digits_dataset
from pipelines.embedding import FitEmbeddingConfig, run_fit_embedding
from pipelines.extract import ExtractConfig, run_extract
from pipelines.scan import ScanConfig, run_scan
from pipelines.similar.evaluate import EvalSearchConfig, run_eval_search

UNSEEN = ("7", "8", "9")


def unseen_scores(store: Store, table, labels=UNSEEN) -> tuple[float, float]:
    """``(precision@10, pair ROC AUC)`` among the raw rows of ``labels``."""
    with store.open(table) as reader:
        X, y, _, groups = reader.to_numpy(label=list(labels), aug="raw")
    X = normalize_rows(X)
    codes = np.unique(groups, return_inverse=True)[1]
    found = exact_search(X, X, 10, query_groups=codes, base_groups=codes)
    precision = float((y[found.index] == y[:, None]).mean())
    i, j, same = sample_pairs(y, groups, n_pairs=20000, seed=0)
    return precision, float(roc_auc_score(same, -pair_distances(X[i], X[j])))


def seen_precision(store: Store, tables) -> dict[str, float]:
    frame = run_eval_search(EvalSearchConfig(store=store.root, tables=list(tables), ks=(10,),
                                             queries=(10_000,), split="test"))
    overall = frame[frame["label"] == "all"]
    return dict(zip(overall["table"], overall["precision"]))


def main() -> None:  # run as a script: extract's worker processes re-import this module
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--loss", default="triplet", choices=("triplet", "contrastive"))
    parser.add_argument("--mining", default="semi-hard", choices=("semi-hard", "hard"))
    args = parser.parse_args()
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_digits_dataset(Path(tmp) / "digits", size=32)
        store = Store(Path(tmp) / "store")
        run_scan(ScanConfig(dataset=dataset, store=store.root, progress=False))
        start = time.perf_counter()
        run_extract(ExtractConfig(dataset=dataset, store=store.root, pool="avg",
                                  weights=args.weights, image_size=32, augment=1,
                                  progress=False))
        cnn_seconds = time.perf_counter() - start
        parent = store.lineages()[0]
        fit = dict(dim=args.dim, epochs=args.epochs, loss=args.loss, mining=args.mining,
                   learning_rate=args.learning_rate)
        seen = run_fit_embedding(FitEmbeddingConfig(store=store.root, table=parent.key, **fit),
                                 echo=quiet)
        unseen = run_fit_embedding(FitEmbeddingConfig(
            store=store.root, table=parent.key, labels=tuple("0123456"), **fit), echo=quiet)
        precision = seen_precision(store, [parent.key, seen.lineage.key])
        rows = [("seen classes: precision@10 (eval-search, test queries)",
                 precision[parent.key], precision[seen.lineage.key])]
        parent_unseen, derived_unseen = unseen_scores(store, parent), \
            unseen_scores(store, unseen.lineage)
        rows += [("unseen 7/8/9: precision@10", parent_unseen[0], derived_unseen[0]),
                 ("unseen 7/8/9: pair ROC AUC", parent_unseen[1], derived_unseen[1])]
        print(f"parent {parent.name} ({args.weights} weights), {len(store.open(parent))} rows; "
              f"{args.loss} loss, {args.mining} mining, dim {args.dim}, {args.epochs} epochs")
        print(f"{'':58s} {'parent':>8s} {'derived':>8s} {'ratio':>7s}")
        for name, base, derived in rows:
            print(f"{name:58s} {base:8.3f} {derived:8.3f} {derived / base:6.2f}x")
        epoch = float(np.median(seen.seconds_per_epoch[1:] or seen.seconds_per_epoch))
        print(f"seconds per epoch (median): {epoch:.2f}; one CNN pass over the images "
              f"(extract, incl. model build): {cnn_seconds:.1f} s = {cnn_seconds / epoch:.0f} "
              f"epochs")
        print(f"verifier (seen): threshold {seen.verifier['threshold']:.3f}, val ROC AUC "
              f"{seen.verifier['roc_auc']:.3f}")


if __name__ == "__main__":
    main()
