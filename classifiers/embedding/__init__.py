"""Metric learning on feature rows: a projection whose distances mean "same class".

* :mod:`~classifiers.embedding.sampler`: P classes x K rows per batch, positives spread
  over distinct source images (augmented views are extra positives of theirs);
* :mod:`~classifiers.embedding.losses`: triplet (semi-hard or hard online mining) and
  contrastive losses in ``keras.ops``, so they run on every Keras backend;
* :mod:`~classifiers.embedding.projection`: the projection network and its training;
* :mod:`~classifiers.embedding.verifier`: "same class?" probabilities from a distance.

Like the rest of ``classifiers``, nothing here knows of files or images; Keras is
imported only by the modules that need it.
"""
