"""Backbones: the timm-style registry (:mod:`~pipelines.backbones.registry`) and the
resolution and checking of their weights (:mod:`~pipelines.backbones.weights`)."""
