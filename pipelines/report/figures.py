"""Matplotlib figures of the report, saved as PNG files.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot,
so no global figure registry grows while hundreds of figures are drawn), saves
it with :func:`save` and returns the path relative to the report folder.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (ConfusionMatrixDisplay, precision_recall_curve,  # noqa: E402
                             roc_curve)

from pipelines.html import FIGURES_DIR  # noqa: E402

DPI = 90
#: One-vs-rest curves drawn per panel at most; more classes would be unreadable.
MAX_CURVES = 10


def save(fig: Figure, out_dir: Path, name: str) -> str:
    """Write ``fig`` to ``out_dir/figures/<name>.png``; returns the relative path."""
    relative = f"{FIGURES_DIR}/{name}.png"
    path = Path(out_dir) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.clear()
    return relative


def class_counts(counts, out_dir: Path) -> str:
    """Bars of images per class, one bar group per class and one colour per split."""
    fig = Figure(figsize=(max(5.0, 0.5 * counts.shape[1] + 3), 3.2))
    ax = fig.add_subplot()
    width = 0.8 / max(len(counts.index), 1)
    x = np.arange(counts.shape[1])
    for k, split in enumerate(counts.index):
        ax.bar(x + k * width, counts.loc[split].to_numpy(), width, label=split)
    ax.set_xticks(x + width * (len(counts.index) - 1) / 2, [str(c) for c in counts.columns],
                  rotation=45 if counts.shape[1] > 8 else 0)
    ax.set_ylabel("images")
    ax.set_title("Images per class and split")
    ax.legend()
    return save(fig, out_dir, "dataset-counts")


def confusion(labels, y_true, y_pred, out_dir: Path, name: str, title: str) -> str:
    """Confusion matrix of held-out rows: rows true, columns predicted."""
    size = min(3.0 + 0.45 * len(labels), 12.0)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=ax,
                                            colorbar=False, xticks_rotation="vertical")
    ax.set_title(title, fontsize=9)
    return save(fig, out_dir, name)


def curves(y_true, proba, classes, predicted, out_dir: Path, name: str, title: str,
           positive: int | None, rule: str) -> str:
    """ROC, precision-recall and reliability curves side by side.

    Binary models draw the positive class; multi-class models one-vs-rest per
    class (at most :data:`MAX_CURVES`). The dot on each ROC/PR curve is where the
    saved decision rule (``rule``: threshold or argmax) operates on these rows.
    """
    fig = Figure(figsize=(13.5, 4.0))
    roc_ax, pr_ax, cal_ax = fig.subplots(1, 3)
    shown = [positive] if positive is not None and len(classes) == 2 else \
        list(range(min(len(classes), MAX_CURVES)))
    for k in shown:
        truth, score, decided = y_true == classes[k], proba[:, k], predicted == classes[k]
        if truth.all() or not truth.any():
            continue  # a curve needs both outcomes
        label = classes[k]
        fpr, tpr, _ = roc_curve(truth, score)
        line, = roc_ax.plot(fpr, tpr, label=label)
        roc_ax.plot([np.mean(decided[~truth])], [np.mean(decided[truth])], "o",
                    color=line.get_color(), markeredgecolor="black")
        precision, recall, _ = precision_recall_curve(truth, score)
        pr_ax.plot(recall, precision, color=line.get_color(), label=label)
        if decided.any():
            pr_ax.plot([np.mean(decided[truth])], [np.mean(truth[decided])], "o",
                       color=line.get_color(), markeredgecolor="black")
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    _labels(roc_ax, "False positive rate", "True positive rate", f"ROC ({rule} = dot)")
    _labels(pr_ax, "Recall", "Precision", f"Precision-recall ({rule} = dot)")
    _reliability(cal_ax, y_true, proba, classes, positive)
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
    fig.suptitle(title, fontsize=9)
    return save(fig, out_dir, name)


def _reliability(ax, y_true, proba, classes, positive: int | None) -> None:
    """Binary: calibration of the positive class; multi-class: of the top-label confidence."""
    if positive is not None and len(classes) == 2:
        hit, score = y_true == classes[positive], proba[:, positive]
        what = f"P({classes[positive]})"
    else:
        hit = np.asarray(classes)[proba.argmax(axis=1)] == y_true
        score, what = proba.max(axis=1), "top-label confidence"
    if len(np.unique(hit)) > 1:
        frac, mean = calibration_curve(hit, score, n_bins=10, strategy="quantile")
        ax.plot(mean, frac, "o-")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    _labels(ax, f"Predicted {what}", "Observed frequency", "Reliability (10 quantile bins)")


def _labels(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)


def optuna_study(numbers, values, importances: dict[str, float] | None, out_dir: Path,
                 name: str, title: str) -> str:
    """Optimisation history (every complete trial and the best so far) and importances."""
    fig = Figure(figsize=(10.0, 3.4))
    hist_ax, imp_ax = fig.subplots(1, 2)
    hist_ax.plot(numbers, values, "o", alpha=0.6, label="trial")
    hist_ax.plot(numbers, np.maximum.accumulate(values), "-", color="red", label="best so far")
    hist_ax.set_xlabel("trial")
    hist_ax.set_ylabel("objective value")
    hist_ax.set_title("Optimisation history", fontsize=9)
    hist_ax.legend(fontsize=7)
    if importances:
        names = list(importances)[::-1]
        imp_ax.barh(names, [importances[n] for n in names])
        imp_ax.set_xlabel("importance (optuna.importance default evaluator)")
        imp_ax.set_title("Parameter importances", fontsize=9)
    else:
        imp_ax.axis("off")
        imp_ax.text(0.5, 0.5, "importances need 2+ complete trials\nand a searched parameter",
                    ha="center", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save(fig, out_dir, name)


def comparison_points(groups, vary: str, metric: str, out_dir: Path, name: str,
                      title: str) -> str:
    """A CV metric's fold mean with ±1 std bars, variants side by side within each group.

    ``groups`` is ``[(label, [(variant, (mean, std, k) or None), ...]), ...]``.
    Points rather than bars: the y axis zooms on the values, where differences live.
    """
    variants = list(dict.fromkeys(v for _, items in groups for v, _ in items))
    fig = Figure(figsize=(min(3.0 + 1.3 * len(groups), 14.0), 3.8))
    ax = fig.add_subplot()
    step = 0.6 / max(len(variants), 1)
    for k, variant in enumerate(variants):
        found = [(g, dict(items).get(variant)) for g, (_, items) in enumerate(groups)]
        found = [(g, spread) for g, spread in found if spread]
        if found:
            ax.errorbar([g + (k - (len(variants) - 1) / 2) * step for g, _ in found],
                        [s[0] for _, s in found], yerr=[s[1] for _, s in found], fmt="o",
                        capsize=3, label=variant or "whole table")
    ax.set_xticks(np.arange(len(groups)), [_short(label) for label, _ in groups], fontsize=7,
                  rotation=20, ha="right")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel(f"CV {metric.replace('_', ' ')}\n(mean ± std over folds)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, title=vary)
    return save(fig, out_dir, name)


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def feature_map(panels, labels, errors, out_dir: Path, name: str, title: str) -> str:
    """Scatter plots of 2-D embeddings coloured by label; misclassified rows ringed in red.

    ``panels`` is ``[(subtitle, points (n, 2), row selection (n,) into labels/errors)]``.
    """
    classes = sorted(set(labels.tolist()))
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colour = {c: cmap(k % cmap.N) for k, c in enumerate(classes)}
    fig = Figure(figsize=(6.0 * len(panels), 5.2))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (subtitle, points, rows) in zip(axes, panels):
        size = 4 if len(rows) > 5000 else 10
        for c in classes:
            mine = labels[rows] == c
            ax.scatter(points[mine, 0], points[mine, 1], s=size, color=colour[c], label=c,
                       linewidths=0, alpha=0.7)
        bad = errors[rows]
        ax.scatter(points[bad, 0], points[bad, 1], s=size * 4, facecolors="none",
                   edgecolors="red", linewidths=0.8, label="misclassified")
        ax.set_title(subtitle, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5),
                    ncol=1 if len(classes) <= 20 else 2)
    fig.suptitle(title, fontsize=9)
    return save(fig, out_dir, name)
