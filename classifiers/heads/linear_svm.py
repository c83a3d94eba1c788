"""``svm``: linear SVM on standardised features, probabilities by sigmoid calibration."""

from __future__ import annotations

from sklearn.preprocessing import StandardScaler

from classifiers.heads.base import HeadBase
from classifiers.heads.calibration import (CALIBRATION_TYPES, fit_calibrated_linear_svc,
                                           svc_iterations)
from classifiers.registry import register_head


def search_space(trial) -> dict:
    """Hinge-loss regularisation on a log scale."""
    return {"C": trial.suggest_float("C", 1e-5, 1.0, log=True)}


@register_head(
    "svm", search_space=search_space, test_params={"max_iter": 200},
    expected_failed_checks={
        "check_sample_weight_equivalence_on_dense_data":
            "the calibration hold-out is drawn over rows, so a repeated row and a row of "
            "weight 2 fall on different sides of it",
    })
class LinearSVMHead(HeadBase):
    """Linear SVM (liblinear, primal) with Platt-calibrated probabilities.

    Parameters
    ----------
    C : float
        Inverse regularisation strength.
    class_weight : None, "balanced" or dict
        See :mod:`classifiers.heads.base`.
    max_iter : int
        liblinear iterations.
    random_state : int
        Seed of the calibration split.
    """

    trusted_types = CALIBRATION_TYPES

    def __init__(self, C=0.01, class_weight=None, max_iter=1000, random_state=0):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y, groups=None, sample_weight=None):
        """Fit on ``X (n_samples, n_features)``; ``groups`` keep calibration folds grouped."""
        X, y_enc, weight = self._prepare_fit(X, y, sample_weight)
        self.scaler_ = StandardScaler().fit(X)
        self.model_ = fit_calibrated_linear_svc(
            self.scaler_.transform(X), y_enc, weight, groups, C=self.C,
            max_iter=self.max_iter, seed=self.random_state)
        self.n_iter_ = svc_iterations(self.model_)
        return self

    def _proba(self, X):
        return self.model_.predict_proba(self.scaler_.transform(X))
