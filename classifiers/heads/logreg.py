"""``logreg``: standardised features, L2-regularised multinomial logistic regression.

The cheapest strong baseline on CNN features (well under a second per fit on
20,800 x 1,024); its probabilities are calibrated by construction.
"""

from __future__ import annotations

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from classifiers.heads.base import HeadBase
from classifiers.registry import register_head


def search_space(trial) -> dict:
    """Inverse regularisation strength on a log scale."""
    return {"C": trial.suggest_float("C", 1e-4, 10.0, log=True)}


@register_head(
    "logreg", search_space=search_space, test_params={"max_iter": 100},
    expected_failed_checks={
        "check_sample_weight_equivalence_on_dense_data":
            "features are cast to float32 (the store's dtype) and lbfgs stops at tol, so "
            "weighted and repeated fits agree to about 1e-5, not the check's rtol 1e-7",
    })
class LogRegHead(HeadBase):
    """Logistic regression on standardised features (lbfgs, multinomial).

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength.
    class_weight : None, "balanced" or dict
        See :mod:`classifiers.heads.base`.
    max_iter, tol : int, float
        lbfgs stopping rule.
    """

    def __init__(self, C=1.0, class_weight=None, max_iter=300, tol=1e-4):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y, groups=None, sample_weight=None):
        """Fit on ``X (n_samples, n_features)``, ``y (n_samples,)``; ``groups`` unused."""
        X, y_enc, weight = self._prepare_fit(X, y, sample_weight)
        self.pipeline_ = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol))
        # The scaler sees the caller's sample weights only: a row of weight 2
        # must act exactly like the row repeated (class weights are a loss choice).
        self.pipeline_.fit(X, y_enc, standardscaler__sample_weight=sample_weight,
                           logisticregression__sample_weight=weight)
        self.n_iter_ = int(self.pipeline_[-1].n_iter_.max())
        return self

    def _proba(self, X):
        return self.pipeline_.predict_proba(X)
