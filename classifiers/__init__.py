"""Classifier heads, their search spaces, cross-validation and metrics.

Knows nothing of files or images: everything here takes ``(X, y, groups)``.
"""
