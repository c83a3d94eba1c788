"""``featurestore demo``: every stage end to end on scikit-learn's digit scans
(:mod:`~pipelines.demo.data` writes them, :mod:`~pipelines.demo.run` runs the stages)."""
