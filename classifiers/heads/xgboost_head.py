"""``xgboost``: gradient-boosted trees (hist) with early stopping on a grouped hold-out.

200 rounds at XGBoost's defaults cost about 70 s per fit on 20,800 x 1,024, so
the head is made affordable the usual way: the ``hist`` method with 32 bins
(64 bins measured 2x slower per round here for the same accuracy), column
subsampling per tree (most CNN features are redundant), a generous learning
rate with at most 200 rounds, and early stopping on a grouped 15 % hold-out of
the training rows. The booster is kept as trained on the other 85 % at its
best round.

The booster is saved in XGBoost's own UBJSON format, not pickled.
"""

from __future__ import annotations

import os
from pathlib import Path

from classifiers.errors import ClassifierError
from classifiers.heads.base import HeadBase, expect_file, inner_split
from classifiers.registry import register_head


def _xgb():
    # Imported on use: xgboost comes from the `cpu` (xgboost-cpu) or `gpu` (xgboost)
    # extra, so a bare install still lists and fits every other head.
    try:
        import xgboost
    except ImportError as err:
        raise ClassifierError("The xgboost head needs XGBoost: pip install -e \".[cpu]\" "
                              "(or \".[gpu]\" on a GPU machine).") from err
    return xgboost

UBJ_FILE = "model.ubj"


def search_space(trial) -> dict:
    """Tree shape, learning rate, subsampling and regularisation."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.1, 0.5, log=True),
        "max_depth": trial.suggest_int("max_depth", 2, 6),
        "min_child_weight": trial.suggest_float("min_child_weight", 0.5, 20.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.03, 0.2, log=True),
        "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        "reg_alpha": trial.suggest_float("reg_alpha", 1e-3, 1.0, log=True),
    }


@register_head(
    "xgboost", search_space=search_space,
    test_params={"n_estimators": 10, "early_stopping_rounds": 3, "n_jobs": 1},
    expected_failed_checks={
        "check_sample_weight_equivalence_on_dense_data":
            "the early-stopping hold-out is drawn over rows and hist bins are weighted "
            "quantiles, so a repeated row and a row of weight 2 differ slightly",
    })
class XGBoostHead(HeadBase):
    """Gradient-boosted trees (XGBoost hist), early-stopped on a grouped hold-out.

    Parameters
    ----------
    n_estimators : int
        Maximum boosting rounds.
    learning_rate, max_depth, min_child_weight, subsample, colsample_bytree,
    reg_lambda, reg_alpha, max_bin :
        XGBoost's parameters of the same names.
    early_stopping_rounds : int
        Rounds without improvement of the hold-out log loss before stopping.
    validation_fraction : float
        Share of training rows (whole groups) held out for early stopping.
    class_weight : None, "balanced" or dict
        See :mod:`classifiers.heads.base`.
    n_jobs : int or None
        Threads; ``None`` uses every core.
    random_state : int
        Seed of the hold-out split and the subsampling.
    """

    def __init__(self, n_estimators=200, learning_rate=0.2, max_depth=4, min_child_weight=1.0,
                 subsample=0.8, colsample_bytree=0.15, reg_lambda=1.0, reg_alpha=0.0,
                 max_bin=32, early_stopping_rounds=15, validation_fraction=0.15,
                 class_weight=None, n_jobs=None, random_state=0):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.min_child_weight = min_child_weight
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.reg_alpha = reg_alpha
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _booster_params(self) -> dict:
        n_classes = len(self.classes_)
        params = {
            "tree_method": "hist", "max_bin": self.max_bin, "eta": self.learning_rate,
            "max_depth": self.max_depth, "min_child_weight": self.min_child_weight,
            "subsample": self.subsample, "colsample_bytree": self.colsample_bytree,
            "lambda": self.reg_lambda, "alpha": self.reg_alpha, "seed": self.random_state,
            "nthread": self.n_jobs or os.cpu_count() or 1, "verbosity": 0,
        }
        if n_classes == 2:
            params.update(objective="binary:logistic", eval_metric="logloss")
        else:
            params.update(objective="multi:softprob", num_class=n_classes,
                          eval_metric="mlogloss")
        return params

    def fit(self, X, y, groups=None, sample_weight=None):
        """Fit on ``X (n_samples, n_features)``; ``groups`` keep the hold-out grouped."""
        X, y_enc, weight = self._prepare_fit(X, y, sample_weight)
        xgb = _xgb()
        split = inner_split(y_enc, groups, self.validation_fraction, self.random_state)
        if split is None:
            dtrain = xgb.QuantileDMatrix(X, y_enc, weight=weight, max_bin=self.max_bin)
            booster = xgb.train(self._booster_params(), dtrain, self.n_estimators)
            self.best_iteration_ = booster.num_boosted_rounds() - 1
        else:
            tr, va = split
            dtrain = xgb.QuantileDMatrix(X[tr], y_enc[tr], weight=weight[tr],
                                         max_bin=self.max_bin)
            dvalid = xgb.QuantileDMatrix(X[va], y_enc[va], weight=weight[va], ref=dtrain,
                                         max_bin=self.max_bin)
            booster = xgb.train(self._booster_params(), dtrain, self.n_estimators,
                                evals=[(dvalid, "valid")],
                                early_stopping_rounds=self.early_stopping_rounds,
                                verbose_eval=False)
            self.best_iteration_ = int(booster.best_iteration)
        self.booster_ = booster
        return self

    def _proba(self, X):
        return self.booster_.predict(_xgb().DMatrix(X),
                                     iteration_range=(0, self.best_iteration_ + 1))

    def save(self, folder: Path) -> list[str]:
        """The booster in XGBoost's own UBJSON format (``model.ubj``), never a pickle."""
        self.booster_.save_model(str(folder / UBJ_FILE))
        return [UBJ_FILE]

    def fitted_state(self) -> dict:
        return {**super().fitted_state(), "best_iteration_": int(self.best_iteration_)}

    @classmethod
    def load(cls, folder: Path, files: list[str], state, params) -> XGBoostHead:
        head = cls(**params)
        head._restore_state(state)
        head.booster_ = _xgb().Booster()
        head.booster_.load_model(str(folder / expect_file(cls, files, UBJ_FILE)))
        head.best_iteration_ = int(state["best_iteration_"])
        return head
