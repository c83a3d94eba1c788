"""``featurestore fine-tune``: a table's backbone and its saved Keras head, trained end to end.

* :mod:`~pipelines.finetune.run`: the command and :func:`run_fine_tune`;
* :mod:`~pipelines.finetune.stack`: the stacked model, the reproduce check, unfreezing.
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "FineTuneConfig": "run",
    "FineTuneResult": "run",
    "run_fine_tune": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
