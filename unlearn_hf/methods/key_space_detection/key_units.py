"""What Key Space Detection reads at one layer: a *key unit* (``docs/ARCHITECTURES.md``, "Mixtures of experts").

A dense FFL's key site is a unit of its own: every token has a key vector there, tested against the unit's one
hypercube (:class:`~.hypercube.KeySpaceLayer`). The routed experts of one mixture-of-experts layer form one unit
together: a token has a key only in the experts it is routed to, and each expert has a hypercube of its own, fitted
on the question ends routed to it (an expert to which fewer than 2 were routed has none). A token's scaled distance
to such a unit is the largest of its scaled distances to the hypercubes of the experts it is routed to that have
one,

    ``z = max_{e routed, with a hypercube} max_d |v_{e,d} − μ_{e,d}| / σ_{e,d} / k_e``,

and ``inf`` when none of its experts has one. A token is inside the unit at α when ``z ≤ α``. So at α = 1 every
fitted question end is inside (each ``k_e`` is the largest scaled distance of the expert's own fitted keys) unless
none of its experts got 2 fitted question ends, and an expert the forget questions rarely reach does not veto a
question that every other expert of its token places inside. A unit's id is its first site's index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ...sites import FFLSite, module_device
from ...sites.experts import expert_taps
from ...sites.model_config import text_config
from .hypercube import KeySpaceLayer, distance_dtype, scaled_distance


def key_units(sites: Sequence[FFLSite]) -> dict[int, list[int]]:
    """``{unit id: [site indices]}``, in the model's order: each dense site alone, the routed experts of one
    experts module together (all of them, whatever was fitted)."""
    units: dict[int, list[int]] = {}
    owners: dict[int, int] = {}
    for s in sites:
        if not s.routed:
            units[s.layer] = [s.layer]
            continue
        owner = id(s.key.owner)
        if owner not in owners:
            owners[owner] = s.layer
            units[s.layer] = []
        units[owners[owner]].append(s.layer)
    return units


def units_cut_by_generate(model, sites: Sequence[FFLSite], units: Iterable[int]) -> list[int]:
    """The units of ``units`` whose decoder layer runs over the last position only in a prefill as ``generate`` runs
    it (``logits_to_keep=1``): the KV-shared layers of transformers' Gemma 4 models (the last
    ``config.num_kv_shared_layers``, which reuse earlier layers' keys and values and are run on the positions whose
    logits are kept; Gemma 3n shares keys and values too but runs every position, and keeps its layers). Their key
    vectors at a question's end are never computed there, so they cannot decide."""
    if not any(hasattr(type(m), "_maybe_slice_kv_shared_inputs") for m in model.modules()):
        return []  # the model never slices its inputs before the KV-shared layers
    config = text_config(model)
    shared, n_layers = getattr(config, "num_kv_shared_layers", 0), getattr(config, "num_hidden_layers", None)
    if not isinstance(shared, int) or shared <= 0 or not isinstance(n_layers, int):
        return []
    return [u for u in units if sites[u].decoder_layer >= n_layers - shared]


def unit_of(sites: Sequence[FFLSite]) -> dict[int, int]:
    """``{site index: its unit's id}``."""
    return {i: u for u, members in key_units(sites).items() for i in members}


def unit_readers(
    sites: Sequence[FFLSite], cubes: Mapping[int, tuple], chosen: Iterable[int], alpha: float
) -> dict[int, KeySpaceLayer | RoutedUnit]:
    """The reader of each unit of ``chosen`` on its module's device, from the hypercubes ``{site index: (μ, σ, k,
    ...)}``: a :class:`~.hypercube.KeySpaceLayer` for a dense unit (tested at ``alpha``), a :class:`RoutedUnit`
    for routed experts."""
    units = key_units(sites)
    out: dict[int, KeySpaceLayer | RoutedUnit] = {}
    for u in chosen:
        site = sites[u]
        if site.routed:
            out[u] = RoutedUnit([sites[i] for i in units[u]], cubes, module_device(site.key.owner))
        else:
            out[u] = KeySpaceLayer(*cubes[u][:3], alpha, module_device(site.key))
    return out


class RoutedUnit:
    """The routed experts of one experts module, read as one key unit: each forward that reads it starts a
    :class:`UnitDistances` (:meth:`start`), the experts' key taps add their tokens' distances to it, and it gives
    each token's ``z``. The unit itself holds only the hypercubes: forwards in several threads do not mix.

    Args:
        sites: every expert site of the module, in expert order.
        cubes: ``{site index: (μ, σ, k)}`` of the experts that have a hypercube.
        device: where the distances are computed (the module's device).
    """

    def __init__(
        self,
        sites: Sequence[FFLSite],
        cubes: Mapping[int, tuple[torch.Tensor, torch.Tensor, float]],
        device: torch.device | str,
    ) -> None:
        self.sites = list(sites)
        self.owner = self.sites[0].key.owner
        self._fitted = {s.expert: cubes[s.layer][:3] for s in self.sites if s.layer in cubes}
        self.place(torch.device(device))

    def place(self, device: torch.device) -> tuple[torch.device, torch.dtype, dict]:
        """The hypercubes on ``device`` (where the module now runs) in its distance dtype, as ``(device, dtype,
        {expert: (μ, σ, k)})`` set in one assignment (a forward in another thread reads the old or the new one)."""
        dtype = distance_dtype(device)
        cubes = {
            e: (mu.to(device, dtype), sigma.to(device, dtype), float(k))
            for e, (mu, sigma, k) in self._fitted.items()
        }
        self._placed = placed = (device, dtype, cubes)
        return placed

    @property
    def cubes(self) -> dict:
        return self._placed[2]

    def tokens(self, args: tuple) -> int:
        """How many tokens a call of the experts module with positional ``args`` computes."""
        return expert_taps(self.owner).tokens(args)

    @property
    def read_sites(self) -> list[FFLSite]:
        """The expert sites whose keys are read: those with a hypercube."""
        return [s for s in self.sites if s.expert in self.cubes]

    def start(self, n_tokens: int, wanted: torch.Tensor | None, device: torch.device) -> UnitDistances:
        """The distances of one forward over ``n_tokens`` flattened tokens; only those flagged in ``wanted`` (bool
        ``[n_tokens]``, ``None``: all) are measured."""
        placed = self._placed
        if device != placed[0]:  # the model was moved since the method was attached
            placed = self.place(device)
        return UnitDistances(placed, torch.full((n_tokens,), -1.0, dtype=placed[1], device=device), wanted)


class UnitDistances:
    """The scaled distances of one forward's tokens to a :class:`RoutedUnit` (``-1`` until an expert adds one)."""

    def __init__(self, placed: tuple, z: torch.Tensor, wanted: torch.Tensor | None) -> None:
        _, self.dtype, self.cubes = placed  # the unit's hypercubes as this forward found them
        self.z, self.wanted = z, wanted

    def add(self, expert: int, keys: torch.Tensor, token_index: torch.Tensor) -> None:
        """The key vectors ``[n, I]`` of the tokens ``token_index`` ``[n]`` routed to ``expert``."""
        cube = self.cubes.get(expert)
        if cube is None:  # no hypercube: the expert has no say
            return
        if self.wanted is not None:
            keep = self.wanted[token_index]
            keys, token_index = keys[keep], token_index[keep]
        z = scaled_distance(keys, cube[0], cube[1], cube[2], self.dtype)
        self.z.scatter_reduce_(0, token_index.to(self.z.device), z.to(self.z.device), "amax")

    def distances(self) -> torch.Tensor:
        """``z`` ``[n_tokens]`` (``inf`` for a token routed to no expert with a hypercube)."""
        return self.z.masked_fill(self.z < 0, torch.inf)


def wanted_tokens(rows: int, seq: int, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows * seq]``: the flattened positions ``index`` ``[rows, w]`` (where ``valid``) of each row."""
    flat = torch.arange(rows, device=index.device).unsqueeze(1) * seq + index
    wanted = torch.zeros(rows * seq, dtype=torch.bool, device=index.device)
    wanted[flat[valid]] = True
    return wanted
