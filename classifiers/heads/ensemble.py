"""``ensemble``: greedy ensemble selection with replacement over other heads (Caruana et al., 2004).

Start from nothing; ``n_iter`` times add the member (repeats allowed) whose
probabilities, averaged with those already chosen, give the lowest log-loss
on out-of-fold predictions; a member's weight is how often it was chosen by
the best round. This is AutoGluon's weighted ensemble: its out-of-fold
log-loss is never worse than its best member's, and its weights are
non-negative and sum to 1.

Standalone, ``fit`` draws its own grouped inner folds (``cv``) to get the
members' out-of-fold probabilities. ``fit-heads --heads logreg,xgboost,ensemble``
instead passes the other heads' tuned parameters (``member_params``) and the
weights selected on their outer out-of-fold predictions (``weights``), and
builds the ensemble with :meth:`EnsembleHead.fit_members` from the members it
has just refitted itself, so no member is fitted twice. Each member is saved
in its own format (skops, ``.ubj``, ``.keras``) under a ``m<i>-`` file
prefix; the weights travel in ``model.json``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from classifiers.errors import ClassifierError
from classifiers.heads.base import HeadBase
from classifiers.registry import create_head, get_head_spec, register_head


def search_space(trial) -> dict:
    """Selection rounds (finer weights with more)."""
    return {"n_iter": trial.suggest_int("n_iter", 10, 50, log=True)}


def greedy_selection(probas: list[np.ndarray], y_enc: np.ndarray, n_iter: int = 25) -> np.ndarray:
    """Weights ``(n_members,)`` (sum 1) chosen greedily with replacement to minimise log-loss.

    ``probas`` are ``(n_rows, n_classes)`` out-of-fold probabilities per member;
    ``y_enc (n_rows,)`` the labels as column indices. The weights are those of
    the best round, so the ensemble's log-loss is at most its best member's.
    """
    stacked = np.clip(np.stack([np.asarray(p, dtype=np.float64) for p in probas]), 1e-15, 1)
    given = stacked[:, np.arange(len(y_enc)), y_enc]  # (n_members, n_rows): all log-loss needs
    counts, total = np.zeros(len(stacked)), np.zeros(len(y_enc))
    best_loss, best_counts = np.inf, None
    for step in range(1, n_iter + 1):
        losses = -np.log((total[None, :] + given) / step).mean(axis=1)
        pick = int(np.argmin(losses))
        counts[pick] += 1
        total += given[pick]
        if losses[pick] < best_loss - 1e-12:
            best_loss, best_counts = losses[pick], counts.copy()
    return best_counts / best_counts.sum()


@register_head(
    "ensemble", search_space=search_space, test_params={"member_params": {"logreg": {
        "max_iter": 100}, "knn": {}}},
    expected_failed_checks={
        "check_sample_weight_equivalence_on_dense_data":
            "members are fitted without sample weights (knn has none); class weights "
            "reach the members that take them",
        "check_methods_subset_invariance":
            "the members' float32 arithmetic (scaler, PCA) rounds a batch and its rows one "
            "at a time differently: relative differences of ~6e-7, above the check's 1e-7",
    })
class EnsembleHead(HeadBase):
    """Greedy weighted ensemble of other heads (Caruana selection, as AutoGluon does).

    Parameters
    ----------
    member_params : dict or None
        ``{head name: constructor parameters}`` of the members (None: logreg and
        knn at their defaults). ``class_weight``, ``n_jobs`` and ``random_state``
        reach the members that accept them.
    weights : list of float or None
        Member weights in the order of ``member_params``; None: selected in ``fit``
        on inner out-of-fold predictions.
    n_iter : int
        Greedy selection rounds.
    cv : int
        Inner folds when ``weights`` is None.
    class_weight, n_jobs, random_state
        Passed on to the members.
    """

    def __init__(self, member_params=None, weights=None, n_iter=25, cv=3, class_weight=None,
                 n_jobs=None, random_state=0):
        self.member_params = member_params
        self.weights = weights
        self.n_iter = n_iter
        self.cv = cv
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _members(self) -> dict[str, dict]:
        members = self.member_params or {"logreg": {}, "knn": {}}
        for name in members:
            if name == "ensemble":
                raise ClassifierError("An ensemble cannot be a member of itself.")
            get_head_spec(name)  # unknown names fail with the list of known ones
        shared = {"class_weight": self._encoded_class_weight(), "n_jobs": self.n_jobs,
                  "random_state": self.random_state}
        return {name: {**_accepted(name, shared), **dict(params or {})}
                for name, params in members.items()}

    def _encoded_class_weight(self):
        # Members learn encoded labels 0..n-1, so a {label: weight} map is re-keyed.
        if not isinstance(self.class_weight, Mapping):
            return self.class_weight
        by_name = {str(k): v for k, v in self.class_weight.items()}
        return {str(i): by_name[str(c)] for i, c in enumerate(self.classes_) if str(c) in by_name}

    def fit(self, X, y, groups=None):
        """Fit on ``X (n_samples, n_features)``; ``groups`` keep the inner folds grouped."""
        X, y_enc, _ = self._prepare_fit(X, y)
        members = self._members()
        weights = (self._given_weights(members) if self.weights is not None else
                   greedy_selection(self._inner_oof(X, y_enc, groups, members), y_enc,
                                    self.n_iter))
        self._keep(members, weights)
        # Members see the encoded labels, so every member's columns follow classes_.
        self.members_ = [create_head(n, **members[n]).fit(X, y_enc, groups=groups)
                         for n in self.member_names_]
        self.members_on_labels_ = False
        return self

    def fit_members(self, fitted: Mapping[str, HeadBase], X, y, groups=None):
        """Build the ensemble of given ``weights`` from members already fitted on ``(X, y)``.

        ``fitted`` maps member names to heads fitted on these rows and labels with
        their ``member_params`` (fit-heads' refits); a chosen member missing
        there (refitted by another worker) is fitted here.
        """
        X, _, _ = self._prepare_fit(X, y)
        members = self._members()
        self._keep(members, self._given_weights(members))
        self.members_ = [fitted[n] if n in fitted else
                         create_head(n, **members[n]).fit(X, y, groups=groups)
                         for n in self.member_names_]
        for name, member in zip(self.member_names_, self.members_):
            if not np.array_equal(member.classes_.astype(str), self.classes_.astype(str)):
                raise ClassifierError(f"Member {name!r} was fitted on labels "
                                      f"{list(member.classes_)}, not {list(self.classes_)}.")
        self.members_on_labels_ = True  # their columns are labels, not encoded indices
        return self

    def _given_weights(self, members) -> np.ndarray:
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.shape != (len(members),) or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(members)} non-negative numbers, one "
                             f"per member; got {self.weights!r}.")
        return weights

    def _keep(self, members, weights: np.ndarray) -> None:
        self.member_names_ = [n for n, w in zip(members, weights) if w > 0]
        self.weights_ = weights[weights > 0] / weights[weights > 0].sum()

    def _inner_oof(self, X, y_enc, groups, members) -> list[np.ndarray]:
        from classifiers.cv import cross_val_proba, grouped_folds

        groups = np.arange(len(y_enc)) if groups is None else np.asarray(groups)
        n_splits = int(min(self.cv, np.bincount(y_enc).min(), len(np.unique(groups))))
        if n_splits < 2:  # too few rows for inner folds: every member counts the same
            return [np.full((len(y_enc), len(self.classes_)), 1 / len(self.classes_))] * len(
                members)
        folds = grouped_folds(y_enc, groups, np.ones(len(y_enc), bool), n_splits=n_splits,
                              seed=self.random_state or 0)
        classes = np.arange(len(self.classes_))
        return [cross_val_proba(lambda n=name: create_head(n, **members[n]), X, y_enc, groups,
                                folds, classes) for name in members]

    def _proba(self, X):
        total = np.zeros((len(X), len(self.classes_)))
        for weight, member in zip(self.weights_, self.members_):
            columns = (np.searchsorted(self.classes_, member.classes_)
                       if self.members_on_labels_ else member.classes_)
            total[:, columns] += weight * member.predict_proba(X)
        return total

    # -- saving: each member in its own format, under a file prefix -----------------
    def save(self, folder: Path) -> list[str]:
        check_is_fitted(self)
        files = []
        for i, member in enumerate(self.members_):
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                for name in member.save(Path(tmp)):
                    shutil.move(Path(tmp) / name, folder / f"m{i}-{name}")
                    files.append(f"m{i}-{name}")
        return files

    def fitted_state(self) -> dict[str, Any]:
        return {**super().fitted_state(), "member_names_": list(self.member_names_),
                "weights_": [float(w) for w in self.weights_],
                "members_on_labels_": bool(self.members_on_labels_),
                "members": [{"state": m.fitted_state(), "params": m.get_params()}
                            for m in self.members_]}

    @classmethod
    def load(cls, folder: Path, files: list[str], state: Mapping[str, Any],
             params: Mapping[str, Any]) -> EnsembleHead:
        head = cls(**dict(params))
        head._restore_state(state)
        head.member_names_ = list(state["member_names_"])
        head.weights_ = np.asarray(state["weights_"], dtype=np.float64)
        head.members_on_labels_ = bool(state.get("members_on_labels_", False))
        head.members_ = []
        for i, (name, member) in enumerate(zip(head.member_names_, state["members"])):
            prefix = f"m{i}-"
            own = [f for f in files if f.startswith(prefix)]
            with tempfile.TemporaryDirectory() as tmp:
                for f in own:  # each member loads its files under their own names
                    shutil.copyfile(Path(folder) / f, Path(tmp) / f[len(prefix):])
                head.members_.append(get_head_spec(name).cls.load(
                    Path(tmp), [f[len(prefix):] for f in own], member["state"],
                    member["params"]))
        return head

    @classmethod
    def clear_backend(cls) -> None:
        if "keras" in sys.modules:  # a keras_dense member ran in this process
            get_head_spec("keras_dense").cls.clear_backend()


def _accepted(name: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    accepted = set(get_head_spec(name).cls().get_params())
    return {k: v for k, v in shared.items() if k in accepted}
