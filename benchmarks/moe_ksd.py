"""Key Space Detection on a mixture of experts: routed experts' hypercubes against a dense site's, on the same keys.

No mixture-of-experts checkpoint can be downloaded here, so the model is SmolLM2-135M-Instruct *upcycled*: each
feed-forward layer becomes a Mixtral layer of ``--experts`` copies of the dense FFL with a random router (seeded),
top-``--top-k``. Mixtral renormalizes the top-k routing weights to sum to 1, so with identical experts the
upcycled model computes SmolLM2's function (checked: the largest logit difference is printed), and a token's key
in any expert it is routed to is exactly its dense key. The comparison therefore isolates what reading routed
experts costs or gains: each expert's hypercube is fitted only on the question ends routed to it (about
``top_k / experts`` of them), and a token must lie inside the hypercube of every expert it is routed to. The
dense column is SmolLM2 itself, which is also what a shared expert equal to the dense FFL would give. Real
experts are trained apart and differ; this measures the routing and the split of the fitted data, not that.

Both are fitted as ``benchmarks/ksd_formats.py`` fits (200 GSM8K train questions; calibration on MBPP train tasks
and MMLU dev questions; every layer a candidate) and measured on held-out sets in several formats.

Run: ``python -m benchmarks.moe_ksd [--n 100] [--experts 8] [--top-k 2]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from benchmarks.ksd_formats import DATA, eval_sets, fit_data, measure, table
from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM

FORMATS = ["qa", "bare", "chat", "chat_system", "unseen_solve"]


@torch.no_grad()
def upcycle(dense, n_experts: int, top_k: int, seed: int = 0) -> MixtralForCausalLM:
    """A Mixtral model whose every expert is a copy of ``dense``'s (Llama) FFL, with a random router."""
    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        sliding_window=None,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    moe = MixtralForCausalLM(config).to(dense.dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = value
    for i, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp"
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(n_experts, 1, 1)
        state[f"{prefix}.experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(n_experts, 1, 1)
        router = torch.randn(n_experts, c.hidden_size, generator=gen) / c.hidden_size**0.5
        state[f"{prefix}.gate.weight"] = router.to(dense.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"upcycling left missing {missing} / unexpected {unexpected}")
    moe.tie_weights()
    return moe


def run(model, tok, forget, retain, sets) -> tuple[dict, dict, float]:
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    t0 = time.perf_counter()
    method = unlearned.fit(KeySpaceDetectionConfig(), forget, retain, tok, name="math", show_progress=False)
    seconds = time.perf_counter() - t0
    sites = unlearned.ffl_sites
    chosen = sorted({sites[i].decoder_layer for i in method.config.layers})
    info = {
        "decoder_layers": chosen,
        "sites": len(method.config.layers),
        "window": method.config.window,
        "alpha": round(method.config.alpha, 4),
        "held_out_forget": method.config.calibration["forget_rate"],
        "calibration_false": method.config.calibration["false_rate"],
    }
    return info, measure(unlearned, tok, sets, FORMATS), seconds


def main() -> None:
    from unlearn_hf.models import load_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="held-out questions per set")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    dense, tok = load_smollm2()
    moe = upcycle(dense, args.experts, args.top_k)
    probe_ids = tok(
        ["Natalia sold clips to 48 of her friends in April.", "def fib(n):"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        diff = float((dense(**probe_ids).logits - moe(**probe_ids).logits).abs().max())
    print(
        f"upcycled: {args.experts} experts, top-{args.top_k}; largest logit difference to SmolLM2: {diff:.2e}"
    )
    forget, retain = fit_data(Path(args.data))
    sets = eval_sets(Path(args.data), args.n)
    results = {}
    for name, model in (
        ("dense (SmolLM2)", dense),
        (f"routed ({args.experts} experts, top-{args.top_k})", moe),
    ):
        info, rates, seconds = run(model, tok, forget, retain, sets)
        results[name] = {"chosen": info, "fit_seconds": round(seconds, 1), "abstention": rates}
        print(f"\n### {name}: fit {seconds:.0f}s; chosen {json.dumps(info)}")
        print(table(rates))
    if args.json:
        Path(args.json).write_text(json.dumps({"logit_difference": diff, **results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
