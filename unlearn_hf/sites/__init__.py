"""Where the methods look: the two sites of every feed-forward layer (FFL).

Every decoder layer has an FFL ``out = W_out · φ(W_in · x)`` (gated: ``W_down · (act(W_gate x) ⊙ W_up x)``).

* **pre-activation** site: the module whose output enters the activation (``gate_proj``, ``c_fc``, ``fc1``...;
  for a fused gate/up projection such as Phi-3's ``gate_up_proj``, the gate columns of its output, see
  :data:`GATE_LAYOUTS`). Neuron Adjust rewrites it with a forward hook. A layer may lack one (``pre=None``):
  then Key Space Detection and Selective Pruning still work, Neuron Adjust is refused.
* **key** site: the FFL's output projection (``down_proj``, ``c_proj``, ``fc2``...). Its *input* holds the
  ``d_ff`` memory coefficients; Key Space Detection and Selective Pruning read/zero it with a forward pre-hook.

Sites come from, in order: a user override, the table of known model types, unambiguous discovery. Every site
is validated against the real module shapes before use.

Site tensors are ``[batch, seq, d_ff]`` for every architecture except OPT, which flattens the tokens to
``[batch * seq, d_ff]`` before its FFL: :func:`as_token_grid` gives the ``[batch, seq, d_ff]`` view of either.

Modules: :mod:`.ffl_site` (:class:`FFLSite`, :class:`SiteError`, shape validation), :mod:`.known_architectures`
(the table of model types), :mod:`.model_config` (what the config declares), :mod:`.discovery` (unknown model
types), :mod:`.resolve` (:func:`find_ffl_sites`), :mod:`.site_tensors` (:func:`as_token_grid`,
:func:`module_device`).
"""

from .discovery import find_decoder_layers
from .ffl_site import GATE_LAYOUTS, FFLSite, SiteError, SitePair, linear_io, require_pre_sites
from .known_architectures import KNOWN_SITES
from .model_config import config_d_ff
from .resolve import SiteOverride, find_ffl_sites
from .site_tensors import as_token_grid, module_device

__all__ = [
    "GATE_LAYOUTS",
    "KNOWN_SITES",
    "FFLSite",
    "SiteError",
    "SiteOverride",
    "SitePair",
    "as_token_grid",
    "config_d_ff",
    "find_decoder_layers",
    "find_ffl_sites",
    "linear_io",
    "module_device",
    "require_pre_sites",
]
