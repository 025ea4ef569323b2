"""What a method was fitted on top of, and the warning when that changes.

A method is fitted on the model *as it runs*, with the methods already attached active: Key Space Detection
fitted after Neuron Adjust describes the adjusted model's key vectors. Remove that Neuron Adjust afterwards, fit
another one after the detection, attach the detection to a model without it, or fit it inside
``disable_unlearning("neuron_adjust")``, and the hypercube no longer describes what the model computes: forget
queries are answered, with nothing to say so. So every fit records the methods that changed activations while it probed
(:attr:`UnlearningMethod.fitted_with`: the digests of their fitted tensors, saved with the method), and the model
checks that record against the methods attached (switched off or not: ``disable_unlearning`` is for a block of
calls) after every change of its methods (attach, remove, fit, load) and logs a warning, once per situation,
naming the method to refit. Only methods that change an activation the fit read count (a method changes the
activations from its first changed site on, a fit reads up to the last site it probes: ``changed_sites`` and
``probe_sites``, as :mod:`unlearn_hf.methods.fit_many` shares passes), each attachment once (the same statistics
attached twice run twice), in the order they ran.

What warns: a method it was fitted after is gone (removed, refitted), for every method; and, for a detection,
also a method that changes what it reads and was not there when it was fitted (fitted after it, attached around
it), and the same methods attached again in another order. Methods that change activations stack: Neuron Adjust fitted after Neuron Adjust is expected to change what
the first one reads, so stacking them in any order of layers, then a detection on top, warns nowhere.

A digest covers a method's type and fitted tensors, not its config: the same statistics under another seed or in
deterministic mode are the same method here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from .context import disabled_for
from .probe import SITE_KINDS

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


def site_positions(sites: dict[str, list[int]] | None, n_layers: int) -> list[int]:
    """Positions of sites in forward order: ``2 * layer`` for the pre-activation, ``2 * layer + 1`` for the key;
    ``None`` (unknown) is every site."""
    if sites is None:
        return list(range(2 * n_layers))
    return [2 * i + SITE_KINDS.index(kind) for kind, layers in sites.items() for i in layers]


def _affects(changer: Any, method: Any, n_layers: int) -> bool:
    """Whether ``changer`` changes an activation ``method``'s fit read: its first changed site comes before the last
    site ``method`` probes (a method that names no sites reads them all)."""
    changed = site_positions(type(changer).changed_sites(changer.config, n_layers), n_layers)
    read = site_positions(type(method).probe_sites(method.config, n_layers) or None, n_layers)
    return bool(changed) and min(changed) <= max(read, default=2 * n_layers - 1)


def changers(
    model: Any, method: Any, *, name: str | None = None, in_context: bool = False
) -> list[tuple[str, str]]:
    """``(digest, name)`` of the methods attached to ``model`` that change activations ``method`` reads (not
    abstaining ones), other than ``method`` attached as ``name``; ``in_context``: only those running here (not
    switched off by ``disable_unlearning``). A method attached twice is there twice."""
    disabled = disabled_for(model) if in_context else frozenset()
    if disabled is None:
        return []
    n_layers = len(model.ffl_sites)
    return [
        (method_digest(m), n)
        for n, m in model.methods.items()
        if not m.abstains and n not in disabled and n != name and _affects(m, method, n_layers)
    ]


def record_fit_context(model: Any, method: Any) -> None:
    """Record on a just-fitted ``method`` the activation-changing methods ``model`` ran with while it probed, and
    warn when a detection reads activations that random draws change (its decisions then depend on the draws)."""
    found = changers(model, method, in_context=True)
    method.fitted_with = tuple(d for d, _ in found)  # in the order they ran (attach order)
    random = sorted(n for n, m in model.methods.items() if m.stochastic and (method_digest(m), n) in found)
    if method.abstains and random:
        logger.warning(
            "%s reads activations that %s change with random draws (drawn per position of the batch): its decisions "
            "depend on them, so a prompt can abstain alone and not in a batch, or under one seed and not another. "
            "For decisions that do not, fit %s with deterministic=True (unlearn-hf fit --deterministic).",
            type(method).__name__,
            random,
            "them" if len(random) > 1 else "it",
        )


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
    """Warn (once per situation) for every attached method a method it was fitted after is gone from, and for every
    detection that also meets methods it was not fitted with (see the module docstring). Methods without a record
    (loaded from an older save) are not checked."""
    if model._unlearn_checks_paused:
        return
    for name, method in model.methods.items():
        recorded = getattr(method, "fitted_with", None)
        if recorded is None:
            continue
        now = changers(model, method, name=name)
        digests = [d for d, _ in now]
        # methods stack: one that changes activations is expected to run under later ones (not a detection)
        extra = Counter(digests) - Counter(recorded) if method.abstains else Counter()
        gone = sum((Counter(recorded) - Counter(digests)).values())
        # the same methods in another order (removed and attached again): on one module, hooks run in attach order
        reordered = method.abstains and not extra and not gone and digests != list(recorded)
        if not (extra or gone or reordered):
            continue
        key = (name, recorded, tuple(sorted(now)))
        if key in model._unlearn_context_warned:
            continue
        model._unlearn_context_warned.add(key)
        added = sorted(n for d, k in extra.items() for n in [n for dd, n in now if dd == d][-k:])
        what = []
        if gone:
            what.append(f"{gone} method(s) it was fitted after are no longer attached (removed or refitted)")
        if added:
            what.append(f"{added} are attached but did not run when it was fitted")
        if reordered:
            what.append("the methods it was fitted after now run in another order")
        logger.warning(
            "%s %r no longer describes the model it runs in: %s. Its statistics describe the activations it was "
            "fitted on, so %s; refit it after the methods it should run with.",
            type(method).__name__,
            name,
            "; ".join(what),
            "it may answer forget queries" if method.abstains else "it may not forget as fitted",
        )
