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
    python benchmarks/bench_models.py --size 150       # the users' size
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.backbones.registry import get_spec  # noqa: E402
from pipelines.backbones.weights import KERAS_CACHE_SUBDIR, keras_cache_dir  # noqa: E402
from pipelines.cnn import TrainCnnConfig, run_train_cnn  # noqa: E402
from pipelines.extract import ExtractConfig, run_extract  # noqa: E402
from pipelines.finetune import FineTuneConfig, run_fine_tune  # noqa: E402
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
    started = time.perf_counter()
    tables = run_extract(ExtractConfig(dataset=root / "data", store=store, pool="both",
                                       weights=weights, image_size=size, progress=False)).tables
    extract_sec = time.perf_counter() - started
    for pool in ("max", "avg"):
        run_fit_heads(FitHeadsConfig(store=store, table=tables[pool],
                                     heads=["logreg", "keras_dense"], search="none", cv=3),
                      echo=quiet)
    run_train_cnn(TrainCnnConfig(store=store, image_size=size, epochs=epochs, patience=epochs),
                  echo=print)
    run_fine_tune(FineTuneConfig(store=store, model=f"{tables['max']}/keras_dense",
                                 epochs=epochs, patience=epochs), echo=print)
    board = read_leaderboard(store)
    return {"weights": weights, "extract_sec": extract_sec, "images": per_class * 3,
            "board": board}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--per-class", type=int, default=170)
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
