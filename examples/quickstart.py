"""Quickstart: make SmolLM2-135M-Instruct abstain on math questions and forget math-specific neurons.

Run from the repository root (data in ../shared/data):  python examples/quickstart.py
"""

from __future__ import annotations

import logging

import torch

from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, UnlearnedModelForCausalLM
from unlearn_hf.evaluation import answer_token_accuracy, get_skill
from unlearn_hf.models import load_smollm2

logging.basicConfig(level=logging.INFO, format="%(message)s")

model, tok = load_smollm2()
math, code = get_skill("gsm8k", "../shared/data"), get_skill("mbpp", "../shared/data")
unlearned = UnlearnedModelForCausalLM.from_base(model)

# Neuron Adjust: statistics of math (forget) and code (retain) text at every FFL pre-activation; deterministic
# replacement, so that the detection fitted on top decides the same for a prompt alone and in a batch
unlearned.fit(
    NeuronAdjustConfig(ratio=0.03, deterministic=True),
    forget=math.probe_texts(100),
    retain=code.probe_texts(100),
    tokenizer=tok,
)
# Key Space Detection: the hypercube of math questions (bare; rendered bare, through the chat template and in the
# QA template the evaluation below uses), with the layer, window and alpha calibrated on held-out math and code
# questions (at most 2% of code abstains)
unlearned.fit(
    KeySpaceDetectionConfig(templates=["Question: {question}\nAnswer:"]),
    forget=math.probe_questions(100),
    retain={"code": code.probe_questions(100)},
    tokenizer=tok,
)

prompts = [math.eval_items(1)[0].prompt, code.eval_items(1)[0].prompt]
tok.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True)
out = unlearned.generate(**batch, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
for prompt, seq, abstained in zip(prompts, out.sequences, out.abstained):
    answer = tok.decode(seq[batch["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"{prompt.splitlines()[0][:70]}...\n  abstained={bool(abstained)}: {answer.strip()[:120]}\n")

for skill in (math, code):
    items = skill.eval_items(20)
    with torch.no_grad():
        before = answer_token_accuracy(model, tok, items).score
        after = answer_token_accuracy(unlearned, tok, items).score
    print(f"{skill.name}: answer-token accuracy {before:.3f} -> {after:.3f}")

unlearned.save_pretrained("outputs/quickstart-model")
print("saved to outputs/quickstart-model")
