"""lm-evaluation-harness support: the ``unlearn_hf`` model (:class:`~.model.UnlearnedLM`), how abstained requests
are scored (:mod:`.scoring`), a launcher with lm-eval's own command line (``python -m
unlearn_hf.integrations.lm_eval``) and :func:`~.run.evaluate_with_lm_eval` for the ``unlearn-hf evaluate`` command.

``import unlearn_hf`` registers the name ``unlearn_hf`` in lm-eval's model registry (lazily: lm-eval's model code is
imported when the model is first asked for), so ``simple_evaluate(model="unlearn_hf", ...)`` works.
"""

from __future__ import annotations

from importlib.util import find_spec

MODEL_NAME = "unlearn_hf"
TARGET = "unlearn_hf.integrations.lm_eval.model:UnlearnedLM"


def register() -> bool:
    """Register :data:`MODEL_NAME` in lm-eval's model registry when lm-eval is installed (idempotent); returns
    whether it is registered."""
    if find_spec("lm_eval") is None:
        return False
    import lm_eval.models  # noqa: F401 - lm-eval fills its registry on first use only while it is empty
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)
    return True
