"""The built-in heads: importing this package registers every one of them.

Adding a head: write ``classifiers/heads/<name>.py`` with an estimator class
decorated by :func:`classifiers.registry.register_head`, and import it here.
"""

from classifiers.heads import ensemble, keras_dense, knn, linear_svm, logreg, rbf_svm, xgboost_head

__all__ = ["ensemble", "keras_dense", "knn", "linear_svm", "logreg", "rbf_svm", "xgboost_head"]
