"""Probe throughput on a small random mixture-of-experts model, against a plain forward measured in the same run.

The probe reads the pre-activation and key sites of every routed expert (over the tokens routed to it) and of the
shared experts, and stops after the last decoder layer. It is compared with the model's own forward over the same batches
(its experts implementation: transformers' default on this machine) in two ways: the backbone alone (like for like:
the probe never computes the LM head; target >= 0.90) and the whole model, LM head included. Repeats alternate probe and forward,
reversing the order each time; the report gives tokens/s and the median per-repeat ratio (target >= 0.90) of three
probes: both sites ("probe": the pass Neuron Adjust and Selective Pruning share when fitted together), the
moments of the pre-activation (what Neuron Adjust probes) and mean |x| of the key (Selective Pruning; Key Space
Detection reads the key of a few tokens per query).

The probe's own work (float64 statistics of every site) grows with the FFL widths, the model's with hidden x width:
on very small models the statistics weigh more, so the report is given at two hidden sizes. Llama 4's own experts
module computes every expert on every token; the probe computes each expert on its routed tokens only (transformers'
eager loop), so there the probe can outrun the plain forward.

Usage: python benchmarks/moe_probe_throughput.py [--model-type qwen2_moe] [--hidden 256] [--repeats 5] [--batches 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from unlearn_hf import probe
from unlearn_hf.sites import find_ffl_sites


def moe_config(model_type: str, hidden: int) -> dict:
    """8 experts, top-2 (Llama 4: top-1, every MoE layer, as Llama 4 Scout); expert width 1.5 x hidden (Qwen2-MoE: and
    a shared expert of 3 x hidden; Llama 4: a shared expert of the experts' width)."""
    expert = 3 * hidden // 2
    return {
        "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=expert),
        "qwen2_moe": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=expert,
            shared_expert_intermediate_size=3 * hidden,
        ),
        "llama4_text": dict(
            num_local_experts=8, num_experts_per_tok=1, intermediate_size=expert, interleave_moe_layer_step=1
        ),
    }[model_type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="qwen2_moe", choices=["qwen2_moe", "mixtral", "llama4_text"])
    parser.add_argument(
        "--hidden", type=int, default=256, help="hidden size (the probe's share falls as it grows)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    config = AutoConfig.for_model(
        args.model_type,
        **{
            "hidden_size": args.hidden,
            "intermediate_size": 3 * args.hidden,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": args.hidden // 8,
            "vocab_size": 2048,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            **moe_config(args.model_type, args.hidden),
        },
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    sites = find_ffl_sites(model)
    gen = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": (ids := torch.randint(3, 2048, (args.batch_size, args.seq_len), generator=gen)),
            "attention_mask": torch.ones_like(ids),
        }
        for _ in range(args.batches)
    ]
    tokens = args.batches * args.batch_size * args.seq_len

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    backbone_model = model.get_decoder()

    def backbone() -> None:  # like for like: the probe never computes the LM head
        with torch.no_grad():
            for b in batches:
                backbone_model(**b, use_cache=False)

    def probing(kinds: tuple[str, ...], kept):
        return lambda: probe(model, batches, site=kinds, sites=sites, statistics=kept, show_progress=False)

    # both sites (the pass Neuron Adjust and Selective Pruning share in ``fit([...])``), the pre-activation's
    # moments (Neuron Adjust's probe), the key's mean |x| (Selective Pruning's)
    runs = {
        "forward": forward,
        "backbone": backbone,
        "probe": probing(("pre", "key"), {"pre": ("moments",), "key": ("abs",)}),
        "pre": probing(("pre",), ("moments",)),
        "key": probing(("key",), ("abs",)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up, every run (first calls pay one-time costs)
        run()
    for r in range(args.repeats):
        for name in runs if r % 2 == 0 else reversed(list(runs)):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    routed = sum(s.routed for s in sites)
    print(
        f"{args.model_type}, hidden {args.hidden}: {len(sites)} sites ({routed} routed experts), {tokens} tokens per pass, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, t in times.items():
        line = f"  {name:8s} {tokens / statistics.median(t):10.0f} tokens/s"
        if name not in ("forward", "backbone"):
            for ref in ("backbone", "forward"):  # the first is like for like (target >= 0.90)
                ratios = [f / p for f, p in zip(times[ref], t)]
                line += f"   / {ref}: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        print(line)


if __name__ == "__main__":
    main()
