"""End-to-end models beside the heads: trained from the store's images, ranked on its leaderboard.

* :mod:`~pipelines.cnn.run`: ``featurestore train-cnn`` (a small CNN from scratch);
* :mod:`~pipelines.cnn.data`: the manifest's splits decoded, ``tf.data`` with preset augmentation;
* :mod:`~pipelines.cnn.network`: the network;
* :mod:`~pipelines.cnn.training`: early stopping, best-val_loss checkpoint, resume;
* :mod:`~pipelines.cnn.saved`: held-out evaluation, the model folder and its leaderboard row.
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "TrainCnnConfig": "run",
    "TrainCnnResult": "run",
    "run_train_cnn": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
