"""Fit an unlearning method on SmolLM2-135M-Instruct with several processes (data parallel).

Every process loads the whole model, probes its own shard of the forget/retain data, and the statistics of all
processes are combined with ``torch.distributed`` collectives, so every rank ends with the same fitted methods
(equal to a single-process fit up to float64 rounding). Rank 0 alone saves.

Run it with any launcher (the same script works in a single process, too)::

    # CPU (gloo): split the cores between the processes
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/distributed_fit.py --out smollm2-no-math
    # GPUs (NCCL): one process per GPU, e.g. 8 GPUs
    torchrun --nproc_per_node 8 examples/distributed_fit.py --out smollm2-no-math --forget 7473
    accelerate launch --multi_gpu --num_processes 8 examples/distributed_fit.py --out smollm2-no-math
    python examples/distributed_fit.py --out smollm2-no-math  # one process

(``accelerate launch --multi_gpu`` also starts CPU processes with gloo on a machine without GPUs; its ``--cpu``
flag alone starts a single process unless MPI is configured.)

Forget: GSM8K (math). Retain: MBPP (code). Data from ``../shared/data`` (``--data``). ``--method`` picks Key
Space Detection (default), Neuron Adjust or Selective Pruning; all three fit the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from accelerate import PartialState

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)
from unlearn_hf.distributed import get_world_size, is_main_process
from unlearn_hf.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("distributed_fit")


def read_jsonl(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to save the unlearning into (rank 0)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--forget", type=int, default=200, help="GSM8K train examples (forget set)")
    parser.add_argument("--retain", type=int, default=200, help="MBPP train examples (retain set)")
    parser.add_argument("--batch-size", type=int, default=None, help="at most this many examples per forward")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="padded tokens per forward")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--method", choices=["ksd", "na", "sp"], default="ksd")
    parser.add_argument("--ratio", type=float, default=0.03, help="NA / SP: fraction of neurons")
    parser.add_argument("--alpha", type=float, default=1.0, help="Key Space Detection: radius multiplier")
    args = parser.parse_args()

    # Initializes torch.distributed from the launcher's environment (gloo on CPU, NCCL on GPUs); without a
    # launcher it is a plain single process. torch.distributed.init_process_group() works just as well.
    state = PartialState()
    # the ranks as torch.distributed numbers them (on CPU, accelerate 1.16 reports every gloo rank as its main process)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, force=True)

    model, tokenizer = (
        load_smollm2()
    )  # on a fresh machine one rank converts the GGUF file, the others wait for it
    model.to(state.device)

    gsm8k = read_jsonl(args.data / "gsm8k" / "train.jsonl", args.forget)
    mbpp = [r for r in read_jsonl(args.data / "mbpp" / "mbpp.jsonl", 974) if r["task_id"] >= 601][
        : args.retain
    ]
    forget = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm8k]
    retain = [f"{r['text']}\n{r['code'].replace(chr(13) + chr(10), chr(10))}" for r in mbpp]
    queries = [r["question"] for r in gsm8k]  # bare: Key Space Detection renders them as the model meets them

    unlearned = UnlearnedModelForCausalLM.from_base(model)
    configs = {
        "ksd": KeySpaceDetectionConfig(alpha=args.alpha),
        "na": NeuronAdjustConfig(ratio=args.ratio),
        "sp": SelectivePruningConfig(ratio=args.ratio),
    }
    # KSD learns from the forget queries alone; NA and SP contrast forget and retain texts.
    data = (queries, None) if args.method == "ksd" else (forget, retain)
    start = time.perf_counter()
    # The fit probes this rank's shard and all-reduces the statistics (automatic: a process group is there).
    method = unlearned.fit(
        configs[args.method],
        *data,
        tokenizer,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_length=args.max_length,
    )
    logger.info(
        "Fitted %s on %d process(es) in %.1f s.", method, get_world_size(), time.perf_counter() - start
    )

    if is_main_process():  # every rank holds the same fitted state: one of them saves
        unlearned.save_pretrained(args.out)
        logger.info("Saved to %s", args.out)
        tokenizer.padding_side = "left"
        question = read_jsonl(args.data / "gsm8k" / "test.jsonl", 1)[0]["question"]  # not in the fit data
        prompts = [f"Question: {question}\nAnswer:", "Write a python function to reverse a string.\n"]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(state.device)
        out = unlearned.generate(**enc, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
        abstained = out.get("abstained", torch.zeros(len(prompts), dtype=torch.bool)).tolist()
        for prompt, seq, refused in zip(prompts, out.sequences, abstained):
            text = tokenizer.decode(seq[enc["input_ids"].shape[1] :], skip_special_tokens=True)
            logger.info("%s\n  -> %s%r", prompt.strip()[:80], "[abstained] " if refused else "", text)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
