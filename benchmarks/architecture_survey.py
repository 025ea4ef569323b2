"""Which causal LMs of the installed transformers the methods can use: every ``*ForCausalLM`` model type, built tiny
from its own config class, sorted by what ``find_ffl_sites`` makes of it.

Outcomes:
- ``table``: the model type is in ``KNOWN_SITES`` (tested with every method in tests/test_architectures.py);
- ``discovered``: found by discovery, with both sites (every method);
- ``key sites only``: found by discovery without a usable pre-activation (Key Space Detection, Selective Pruning);

and, for these three, whether every method its sites allow works on the tiny model (``methods``: Selective
Pruning and Neuron Adjust fit and change the logits, Key Space Detection at α = 1 contains every fitted row,
``generate`` runs);
- ``refused: module lists or >2-D weights`` (expert lists, recurrent or state-space blocks) / ``refused: sites``:
  ``SiteError``, whose message says why and how to name the sites;
- ``not built``: no variant of the generic shrinking below gives a tiny model (the first variant whose model runs a
  forward is surveyed, else the first that builds); the model type itself may work at its real size: these are not
  verdicts on the library.

Each type runs in its own process (some configs are large or hang), one worker per CPU by default. Writes
``benchmarks/architecture_survey.json`` and prints a summary.

Usage: python benchmarks/architecture_survey.py [--workers 2] [--timeout 120] [--types llama phi3 ...]
(``--types`` updates those entries of an existing ``architecture_survey.json``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "architecture_survey.json"

#: The generic shrinking: every size attribute a config class may use, small (see ``_VARIANTS``).
_SMALL = dict(
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    n_embd=32,
    n_layer=2,
    n_head=4,
    d_model=32,
    num_layers=2,
)
#: Variants tried in order until the tiny model runs a forward: the generic shrinking, with a head_dim, with the
#: sizes of multi-head latent attention (DeepSeek-V2/V3 and kin), with a small rotary_dim (GPT-J, CodeGen).
_VARIANTS = (
    {},
    {"head_dim": 8},
    dict(
        num_key_value_heads=4,
        head_dim=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
    ),
    {"head_dim": 8, "rotary_dim": 8},
)


def survey_one(model_type: str) -> dict:
    """Build ``model_type`` tiny and find its sites; the outcome as a JSON-ready dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn_hf.sites import KNOWN_SITES, SiteError, find_ffl_sites

    model, built, error = None, None, None
    for extra in _VARIANTS:
        try:
            config = AutoConfig.for_model(model_type, **{**_SMALL, **extra})
        except Exception as err:  # noqa: BLE001 - any failure of a foreign config class is an outcome
            error = f"config: {type(err).__name__}: {err}"
            continue
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
        except Exception as err:  # noqa: BLE001
            model, error = None, f"model: {type(err).__name__}: {err}"
            continue
        built = built or model
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
            break
        except Exception:  # noqa: BLE001 - the next variant may run; else the first one built is surveyed
            model = None
    model = model or built
    if model is None:
        return {"outcome": "not built", "detail": str(error)[:300]}
    try:
        sites = find_ffl_sites(model)
    except SiteError as err:
        blocks = "weights of more than two dimensions" in str(err)
        outcome = "refused: module lists or >2-D weights" if blocks else "refused: sites"
        return {"outcome": outcome, "detail": str(err)[:400]}
    first = sites[0]
    checks = check_methods(model, model_type)
    if model_type in KNOWN_SITES:
        outcome = "table"
    elif any(s.pre is None for s in sites):
        outcome = "key sites only"
    else:
        outcome = "discovered"
    return {
        "outcome": outcome,
        "class": type(model).__name__,
        "layers": len(sites),
        "pre": first.pre_name,
        "key": first.key_name,
        "gate": first.gate,
        "detail": first.pre_missing[:300],
        "methods": checks,
    }


def check_methods(model, model_type: str) -> dict[str, str]:
    """Every method its sites allow, on random token rows: ``{check: "ok" | "error: ..."}``. KSD at α = 1 must
    contain each fitted row; Neuron Adjust and Selective Pruning must fit and change the logits; generate must run."""
    import torch

    from unlearn_hf import (
        KeySpaceDetectionConfig,
        NeuronAdjustConfig,
        SelectivePruningConfig,
        UnlearnedModelForCausalLM,
    )

    gen = torch.Generator().manual_seed(0)
    vocab = min(128, model.get_input_embeddings().weight.shape[0])

    def rows(lo, hi, n=4):
        out = []
        for _ in range(n):
            ids = torch.randint(lo, hi, (1, 6), generator=gen)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return out

    forget, retain = rows(3, vocab // 2), rows(vocab // 2, vocab)  # 24 tokens each: rare experts see few
    unlearned = UnlearnedModelForCausalLM.from_base(model.eval())
    with torch.no_grad():
        plain = model(**forget[0], use_cache=False).logits
    configs = {"sp": SelectivePruningConfig(ratio=0.1)}
    if all(s.pre is not None for s in unlearned.ffl_sites):
        configs["na"] = NeuronAdjustConfig(ratio=0.1, deterministic=True)
    out = {}
    for name, config in configs.items():
        try:
            unlearned.fit(config, forget, retain, name=name, show_progress=False)
            with torch.no_grad():
                changed = not torch.equal(unlearned(**forget[0], use_cache=False).logits, plain)
            unlearned.remove_method(name)
            out[name] = "ok" if changed else "error: the logits did not change"
        except Exception as err:  # noqa: BLE001 - reported, not raised: the survey goes on
            out[name] = f"error: {type(err).__name__}: {err}"[:300]
    try:
        # routed experts: a row is inside at alpha 1 when one of its experts got 2 fitted rows (with 200 rows, all
        # experts of the tiny models do)
        queries = forget + rows(3, vocab // 2, 196)
        ksd = KeySpaceDetectionConfig(inputs="prompts", layers=None, alpha=1.0, window=1, action="eos")
        unlearned.fit(ksd, queries, name="ksd", show_progress=False, batch_size=1)
        with torch.no_grad():
            inside = all(bool(unlearned.detect(**row)[0]) for row in queries)
        out["ksd"] = "ok" if inside else "error: a fitted row is outside the hypercube at alpha 1"
    except Exception as err:  # noqa: BLE001
        out["ksd"] = f"error: {type(err).__name__}: {err}"[:300]
    try:
        with unlearned.disable_unlearning():
            unlearned.generate(**retain[0], max_new_tokens=2, do_sample=False, pad_token_id=0)
    except Exception as err:  # noqa: BLE001 - the tiny config's own problem, not the library's
        out["generate"] = f"n/a: the bare model's generate fails too: {type(err).__name__}: {err}"[:300]
        return out
    try:
        generated = unlearned.generate(**retain[0], max_new_tokens=2, do_sample=False, pad_token_id=0)
        out["generate"] = "ok" if generated.shape[1] >= 7 else "error: nothing generated"
    except Exception as err:  # noqa: BLE001
        out["generate"] = f"error: {type(err).__name__}: {err}"[:300]
    return out


def _run(model_type: str, timeout: float) -> tuple[str, dict]:
    cmd = [sys.executable, __file__, "--one", model_type]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return model_type, {"outcome": "not built", "detail": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return model_type, {
            "outcome": "not built",
            "detail": (done.stderr.strip().splitlines() or ["?"])[-1][:300],
        }
    return model_type, json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--types", nargs="*", help="model types to (re)survey (default: every *ForCausalLM type)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(survey_one(args.one)))
        return
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    with ThreadPoolExecutor(args.workers) as pool:
        results = dict(pool.map(lambda t: _run(t, args.timeout), types))
    if args.types and OUT.exists():  # update those entries of the last full survey
        results = {**json.loads(OUT.read_text())["types"], **results}
    counts = Counter(r["outcome"] for r in results.values())
    OUT.write_text(
        json.dumps(
            {"transformers": __version__, "counts": counts, "types": results}, indent=1, sort_keys=True
        )
        + "\n"
    )
    for outcome, n in counts.most_common():
        names = ", ".join(t for t, r in sorted(results.items()) if r["outcome"] == outcome)
        print(f"{outcome}: {n}\n  {names}")


if __name__ == "__main__":
    main()
