"""Cost and accuracy of the three ways to a classifier, from real runs on the same images.

On scikit-learn's digit scans (3 classes by default, upscaled to ``--size``
px), in one fresh store, this runs:

1. ``extract`` (DenseNet121, max + avg, ImageNet weights when Keras has them
   cached, else seeded random weights: the run says which), then ``fit-heads``
   with ``logreg`` and ``keras_dense`` (defaults, ``--search none``);
2. ``train-cnn`` for ``--epochs`` epochs (``base`` augmentation);
3. ``fine-tune`` of the ``keras_dense`` head (``--unfreeze conv5``, lr 1e-5).

and prints, per model, its held-out (test) accuracy and its training cost:
seconds per epoch for the end-to-end models, seconds of one head fit on the
stored features, and their ratio (the users' "features + head are hundreds
of times faster"). Extraction runs once per table and is shown apart. Ratios
are within this one run, so a loaded machine shifts both sides alike.

    python benchmarks/bench_models.py --quick          # 32 px, 1 epoch: checks the script
    python benchmarks/bench_models.py --size 150       # the users' size, bounded (~4.5 min)

The first epoch of each end-to-end model includes Keras' graph tracing
(~20 s for DenseNet121 on 2 cores), so one epoch overstates seconds per
epoch; the default 3 epochs spread it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.backbones.registry import get_spec  # noqa: E402
from pipelines.backbones.weights import KERAS_CACHE_SUBDIR, keras_cache_dir  # noqa: E402
from pipelines.cnn import TrainCnnConfig, run_train_cnn  # noqa: E402
from pipelines.extract import ExtractConfig, run_extract  # noqa: E402
from pipelines.finetune import FineTuneConfig, run_fine_tune  # noqa: E402
from pipelines.finetune.stack import REPRODUCE_ATOL  # noqa: E402
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads  # noqa: E402
from pipelines.heads.leaderboard import read_leaderboard  # noqa: E402
from tests.digit_store import digit_store  # noqa: E402


def weights_available() -> str:
    """``imagenet`` when Keras' cache holds DenseNet121's weights, else ``none`` (no download)."""
    import os

    spec = get_spec("densenet121")
    cached = os.path.join(keras_cache_dir(), KERAS_CACHE_SUBDIR, spec.weights_file)
    return "imagenet" if os.path.isfile(cached) else "none"


def run(root: Path, size: int, per_class: int, epochs: int) -> dict:
    quiet = lambda line: None  # noqa: E731
    store = digit_store(root, per_class=per_class, size=size)
    weights = weights_available()
    print(f"{per_class * 3} digit scans at {size} px (60/20/20 train/val/test), {epochs} "
          f"epoch(s) of train-cnn and fine-tune, DenseNet121 weights {weights}.", flush=True)
    seconds: dict[str, float] = {}  # wall seconds per stage: where a bounded run's minutes went

    @contextmanager
    def stage(name):
        started = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - started

    with stage("extract"):
        tables = run_extract(ExtractConfig(dataset=root / "data", store=store, pool="both",
                                           weights=weights, image_size=size,
                                           progress=False)).tables
    with stage("fit-heads"):
        for pool in ("max", "avg"):
            run_fit_heads(FitHeadsConfig(store=store, table=tables[pool],
                                         heads=["logreg", "keras_dense"], search="none", cv=3),
                          echo=quiet)
    with stage("train-cnn"):
        run_train_cnn(TrainCnnConfig(store=store, image_size=size, epochs=epochs,
                                     patience=epochs), echo=print)
    with stage("fine-tune"):
        tuned = run_fine_tune(FineTuneConfig(store=store, model=f"{tables['max']}/keras_dense",
                                             epochs=epochs, patience=epochs), echo=print)
    return {"weights": weights, "extract_sec": seconds["extract"], "images": per_class * 3,
            "stages": seconds, "board": read_leaderboard(store),
            "collapse": (tuned.reproduce_diff, tuned.head_val_accuracy, tuned.val_accuracy[0])}


def show(facts: dict, size: int) -> None:
    board = facts["board"]
    heads = board[board["sec_per_epoch"].isna()] if "sec_per_epoch" in board else board
    fastest = float(heads["refit_sec"].min())
    print(f"\n{facts['images']} digit scans at {size} px, DenseNet121 weights "
          f"{facts['weights']}; extraction (both pools, one pass): {facts['extract_sec']:.1f} s.")
    print(f"{'model':48} {'test acc':>8} {'s/epoch':>8} {'s/fit':>8} {'x head fit':>10}")
    for row in board.sort_values("accuracy", ascending=False).to_dict("records"):
        per_epoch = row.get("sec_per_epoch")
        end_to_end = per_epoch is not None and per_epoch == per_epoch
        cost = per_epoch if end_to_end else row["refit_sec"]
        epoch_text = f"{per_epoch:8.2f}" if end_to_end else f"{'-':>8}"
        fit_text = f"{'-':>8}" if end_to_end else f"{row['refit_sec']:8.2f}"
        print(f"{row['table'] + '/' + row['head']:48} {row['accuracy']:8.3f} {epoch_text} "
              f"{fit_text} {cost / fastest:10.1f}")
    print("x head fit: seconds per epoch (end to end) or per fit (heads), over the fastest "
          "head fit of this run.")
    diff, head_val, first = facts["collapse"]
    print(f"fine-tune: stack reproduces the head within {diff:.1e} (limit {REPRODUCE_ATOL:g}); "
          f"val accuracy {head_val:.3f} (head) -> {first:.3f} after epoch 1 (no collapse: "
          f"drop {head_val - first:+.3f} <= 0.02: {'yes' if head_val - first <= 0.02 else 'NO'})")
    stages = facts["stages"]
    print("stages (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"; total {sum(stages.values()):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=150)
    # 360 scans, 3 epochs at 150 px: ~4.5 min on 2 quiet cores (DenseNet121 ~9 img/s there);
    # fine-tune is most of it. The last line prints each stage's wall seconds.
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 px, 60 per class, 1 epoch")
    parser.add_argument("--json", type=Path, default=None, help="Also write the board here.")
    args = parser.parse_args()
    if args.quick:
        args.size, args.per_class, args.epochs = 32, 60, 1
    with tempfile.TemporaryDirectory() as tmp:
        facts = run(Path(tmp), args.size, args.per_class, args.epochs)
    show(facts, args.size)
    if args.json:
        args.json.write_text(json.dumps({**facts, "board": facts["board"].to_dict("records")},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
