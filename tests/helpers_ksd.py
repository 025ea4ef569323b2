"""Shared by the Key Space Detection tests: prompts that a tiny random model separates (the forget queries share
their ending ``Answer:``, the other prompts end differently), batching, an independent capture of the key vectors
and a numpy reference of the fit."""

from __future__ import annotations

import numpy as np
import torch

FORGET = [f"Question: What is {a} plus {b}?\nAnswer:" for a, b in zip(range(1, 40, 3), range(50, 90, 3))]
OTHER = [
    "def fib(n):",
    "Write a haiku about the sea",
    "Bonjour, comment allez-vous",
    "import numpy as np",
    "The capital of France is",
    "Once upon a time",
]
#: Depth of the tiny Llama (``tiny_llama(layers=N_LAYERS)``) the tests separate these prompts with.
N_LAYERS = 4


def separable_ksd(tok, refusal: str = "I can't help with that.", **config):
    """``(model, unlearned)``: a tiny Llama with Key Space Detection fitted on :data:`FORGET` (layer 1, α = 1.5,
    ``config`` for the other fields), whose forget queries are separable from :data:`OTHER` (see
    test_key_space_detection)."""
    from tiny_models import tiny_llama

    from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM

    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.5, refusal=refusal, **config),
        forget=FORGET,
        tokenizer=tok,
        show_progress=False,
    )
    return model, unlearned


def encode(tok, texts, side="left"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


def batches_of(tok, texts, size=5, side="right"):
    return [dict(encode(tok, texts[i : i + size], side)) for i in range(0, len(texts), size)]


class KeyCapture:
    """Records the key vector at the last real token of every row, at the given layers, with our own hooks.

    ``masks`` are the attention masks of the forwards to come, in order (for forwards run by someone else, e.g. the
    fit's probe); :meth:`run` supplies them itself.
    """

    def __init__(self, model, layers, masks=()):
        self.first = min(layers)
        self.pending = list(masks)
        self.vectors = {i: [] for i in layers}
        self.mask: torch.Tensor | None = None
        self.handles = [
            model.model.layers[i].mlp.down_proj.register_forward_pre_hook(self._hook(i)) for i in layers
        ]

    def _hook(self, layer):
        def hook(module, args):
            if layer == self.first:
                self.mask = self.pending.pop(0)
            key = args[0].detach().double()
            last = self.mask.shape[1] - 1 - self.mask.flip(1).int().argmax(1)  # not the library's helper
            self.vectors[layer].append(key[torch.arange(key.shape[0]), last].numpy())

        return hook

    def run(self, model, batches):
        self.pending = [b["attention_mask"] for b in batches]
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        return self

    def array(self, layer) -> np.ndarray:
        return np.concatenate(self.vectors[layer])

    def remove(self):
        for h in self.handles:
            h.remove()


def numpy_reference(vectors: np.ndarray, eps: float):
    """μ, σ (sample std floored at eps) and the brute-force k: the smallest k with every vector inside."""
    mu = vectors.mean(0)
    sd = np.maximum(vectors.std(0, ddof=1), eps)
    z = np.abs(vectors - mu) / sd  # [n, d]
    return mu, sd, z.max()
