"""What a method was fitted on top of, and the warning when that changes.

A method is fitted on the model *as it runs*, with the methods already attached active: Key Space Detection
fitted after Neuron Adjust describes the adjusted model's key vectors. Remove that Neuron Adjust afterwards, fit
another one after the detection, attach the detection to a model without it, or fit it inside
``disable_unlearning("na")``, and the hypercube no longer describes what the model computes: forget queries are
answered, with nothing to say so. So every fit records the methods that changed activations while it probed
(:attr:`UnlearningMethod.fitted_with`: the digests of their fitted tensors, saved with the method), and the model
checks that record against the methods attached (switched off or not: ``disable_unlearning`` is for a block of
calls) after every change of its methods (attach, remove, fit, load) and logs a warning, once per situation,
naming the method to refit. Methods fitted on top of a method (their own record names it) are expected to run with
it: stacking Neuron Adjust on Neuron Adjust, then a detection on both, warns nowhere.

A digest covers a method's type and fitted tensors, not its config: the same statistics under another seed or in
deterministic mode are the same method here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

from .context import disabled_for

logger = logging.getLogger(__name__)


def method_digest(method: Any) -> str:
    """sha256 of a fitted method's type and tensors (names, dtypes, shapes, bytes), cached on the method (fitted
    methods are immutable)."""
    digest = method.__dict__.get("_fit_digest")
    if digest is None:
        from .persistence.config_schema import tensor_bytes

        h = hashlib.sha256(method.method_type.encode())
        for name, tensor in sorted(method.state.items()):
            h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            h.update(tensor_bytes(tensor))
        digest = method.__dict__["_fit_digest"] = h.hexdigest()
    return digest


def active_changers(model: Any, excluding: Any = None, *, in_context: bool = False) -> dict[str, str]:
    """``{digest: name}`` of the attached methods of ``model`` that change activations (not abstaining ones),
    ``excluding`` one method object; ``in_context``: only those running here (not switched off by
    ``disable_unlearning``)."""
    disabled = disabled_for(model) if in_context else frozenset()
    if disabled is None:
        return {}
    return {
        method_digest(m): n
        for n, m in model.methods.items()
        if not m.abstains and n not in disabled and m is not excluding
    }


def record_fit_context(model: Any, method: Any) -> None:
    """Record on a just-fitted ``method`` the activation-changing methods ``model`` ran with while it probed."""
    method.fitted_with = tuple(sorted(active_changers(model, excluding=method, in_context=True)))


@contextlib.contextmanager
def checks_paused(model: Any) -> Iterator[None]:
    """Change several methods at once (a load, a re-attach): the record is checked once, at the end."""
    model._unlearn_checks_paused += 1
    try:
        yield
    finally:
        model._unlearn_checks_paused -= 1
    if not model._unlearn_checks_paused:
        check_fit_context(model)


def check_fit_context(model: Any) -> None:
    """Warn (once per situation) for every attached method whose fit saw other activation-changing methods than
    the ones attached now. Methods without a record (loaded from an older save) are not checked."""
    if model._unlearn_checks_paused:
        return
    for name, method in model.methods.items():
        recorded = getattr(method, "fitted_with", None)
        if recorded is None:
            continue
        mine = method_digest(method)
        now = {  # a method fitted on top of this one (its record names this one) is expected to run with it
            d: n
            for d, n in active_changers(model, excluding=method).items()
            if mine not in (model.methods[n].fitted_with or ())
        }
        if set(recorded) == set(now):
            continue
        key = (name, recorded, tuple(sorted(now)))
        if key in model._unlearn_context_warned:
            continue
        model._unlearn_context_warned.add(key)
        added = sorted(now[d] for d in set(now) - set(recorded))
        gone = len(set(recorded) - set(now))
        what = []
        if gone:
            what.append(f"{gone} method(s) it was fitted after are no longer attached (removed or refitted)")
        if added:
            what.append(f"{added} are attached but did not run when it was fitted")
        logger.warning(
            "%s %r no longer describes the model it runs in: %s. Its statistics describe the activations it was "
            "fitted on, so %s; refit it after the methods it should run with.",
            type(method).__name__,
            name,
            "; ".join(what),
            "it may answer forget queries" if method.abstains else "it may not forget as fitted",
        )
