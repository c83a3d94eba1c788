"""``rbf_svm``: RBF-kernel SVM approximated by Nystroem features and a linear SVM.

An exact RBF ``SVC`` on 20,800 x 1,024 took over five minutes per fit (and
Platt calibration multiplies that), so the kernel is approximated: a Nystroem
map onto ``n_components`` landmark rows, then the calibrated linear SVM of
:mod:`classifiers.heads.calibration`. Cost grows linearly in rows instead of
quadratically.
"""

from __future__ import annotations

from sklearn.kernel_approximation import Nystroem
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from classifiers.heads.base import HeadBase
from classifiers.heads.calibration import (CALIBRATION_TYPES, fit_calibrated_linear_svc,
                                           svc_iterations)
from classifiers.registry import register_head


def search_space(trial) -> dict:
    """Kernel width relative to the feature count, landmark count and C."""
    return {
        "gamma_scale": trial.suggest_float("gamma_scale", 0.05, 5.0, log=True),
        "n_components": trial.suggest_categorical("n_components", [256, 512, 1024]),
        "C": trial.suggest_float("C", 1e-3, 10.0, log=True),
    }


@register_head(
    "rbf_svm", search_space=search_space, test_params={"n_components": 20, "max_iter": 200},
    expected_failed_checks={
        "check_sample_weight_equivalence_on_dense_data":
            "Nystroem landmarks and the calibration hold-out are drawn over rows, so a "
            "repeated row and a row of weight 2 give different landmarks and hold-outs",
    })
class RBFSVMHead(HeadBase):
    """RBF SVM via Nystroem kernel approximation, Platt-calibrated probabilities.

    Parameters
    ----------
    gamma_scale : float
        RBF width as a multiple of ``1 / n_features`` (features are
        standardised, so squared distances scale with ``n_features``).
    n_components : int
        Nystroem landmarks (capped at the training row count).
    C : float
        Inverse regularisation strength of the linear SVM.
    class_weight : None, "balanced" or dict
        See :mod:`classifiers.heads.base`.
    max_iter : int
        liblinear iterations.
    random_state : int
        Seed of the landmark draw and the calibration split.
    """

    trusted_types = CALIBRATION_TYPES

    def __init__(self, gamma_scale=1.0, n_components=512, C=1.0, class_weight=None,
                 max_iter=1000, random_state=0):
        self.gamma_scale = gamma_scale
        self.n_components = n_components
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y, groups=None, sample_weight=None):
        """Fit on ``X (n_samples, n_features)``; ``groups`` keep calibration folds grouped."""
        X, y_enc, weight = self._prepare_fit(X, y, sample_weight)
        self.features_ = make_pipeline(
            StandardScaler(),
            Nystroem(gamma=self.gamma_scale / X.shape[1],
                     n_components=min(self.n_components, X.shape[0]),
                     random_state=self.random_state))
        Z = self.features_.fit_transform(X)
        self.model_ = fit_calibrated_linear_svc(
            Z, y_enc, weight, groups, C=self.C, max_iter=self.max_iter, seed=self.random_state)
        self.n_iter_ = svc_iterations(self.model_)
        return self

    def _proba(self, X):
        return self.model_.predict_proba(self.features_.transform(X))
