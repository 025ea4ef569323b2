"""Shared fixtures: the real SmolLM2 model and its tokenizer, the shared data sets.

Helpers live in modules of their own (``tiny_models``, ``helpers_*``), never here: tests import them, not this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers_data import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"The shared data sets are missing: expected {SHARED_DATA} (../shared/data from the repo)."
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, eval mode (shared: do not attach methods to
    it; wrap it with ``UnlearnedModelForCausalLM.from_base`` and remove what you attach)."""
    from unlearn_hf.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture
def bos_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer made to add its BOS token (``<|im_start|>``) in front of every text, as Llama 3's and
    Gemma's do; its chat template's text starts with that token."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(smol_tokenizer)
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the tests of a module (tiny models run fastest so on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def no_environment_report():
    """lm-eval's ``simple_evaluate`` adds torch's environment report to every result (``collect_env``: ``pip list``
    and more in subprocesses, ~1 s per evaluation, two thirds of a tiny model's); no test reads it, so in-process
    runs get a placeholder (a launched ``lm_eval`` process still collects it)."""
    from torch.utils import collect_env

    patch = pytest.MonkeyPatch()
    patch.setattr(collect_env, "get_pretty_env_info", lambda: "(not collected in the tests)")
    yield
    patch.undo()


#: Modules that run the real model for minutes: scheduled first, so that ``-n 2 --dist loadfile`` does not leave
#: one of them for the end of the run, on one worker.
SLOW_FIRST = (
    "test_integration_na_sp.py",
    "test_integration_ksd.py",
    "test_integration_lm_eval.py",
    "test_cli.py",
)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each
        torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    # a stable sort: the order within a file is kept
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
