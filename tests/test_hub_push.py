"""push_to_hub and loading from the Hub, end to end with the real huggingface_hub client against a loopback Hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers_persistence import assert_same_methods, assert_same_outputs, encode, fit_methods, outputs
from hub_server import HubServer, hub_env, start_hub_server
from huggingface_hub import HfApi, ModelCard
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

import unlearn_hf
from unlearn_hf import UnlearnedModelForCausalLM
from unlearn_hf.persistence import CONFIG_NAME, WEIGHTS_NAME, FingerprintMismatchError, UnlearnFormatError

TOKEN = "hf_unlearn_test_token"
USER = "test-user"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with start_hub_server(tmp_path) as server:
        yield server


@pytest.fixture
def batch(smol_tokenizer):
    return encode(smol_tokenizer)


EVALUATION = [
    {
        "method": "ksd",
        "skill": "arithmetic",
        "metric": "answer-token accuracy",
        "before": 0.64,
        "after": 0.08,
    },
    {"method": "ksd", "skill": "English", "metric": "answer-token accuracy", "before": 0.7, "after": 0.69},
]


def test_push_full_checkpoint_card_revisions_and_offline(hub, tmp_path, smol_tokenizer, batch):
    repo = f"{USER}/tiny-unlearned"
    v1 = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama(seed=4)), smol_tokenizer, ("na", "ksd"))
    out1 = outputs(v1, batch)
    with hub_env(hub.endpoint, tmp_path / "push-cache", token=TOKEN):
        info1 = v1.push_to_hub(
            "tiny-unlearned",  # the namespace comes from the token's user, as with the real Hub
            save_base_model=True,
            private=True,
            commit_message="Unlearn arithmetic",
            base_model_name_or_path="test-user/tiny-origin",
            forget_skill="arithmetic",
            retain_skills=["English"],
            forget_data="5 arithmetic strings",
            card_info={"retain_data": "5 English sentences", "license": "apache-2.0"},
            evaluation=EVALUATION,
        )
        api = HfApi()
        assert api.model_info(repo).private is True
        assert api.list_repo_commits(repo)[0].title == "Unlearn arithmetic"
    assert hub.head(repo) == info1.oid
    files = hub.files(repo)
    assert {"README.md", CONFIG_NAME, WEIGHTS_NAME, "config.json", "model.safetensors"} <= set(files)
    assert hub.is_lfs_file(repo, WEIGHTS_NAME)
    saved = json.loads(files[CONFIG_NAME])
    assert saved["layout"] == "full" and saved["forget_data"] == "5 arithmetic strings"
    assert saved["retain_data"] == "5 English sentences"  # card_info data descriptions go into the config too

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "test-user/tiny-origin" and card.data.library_name == "unlearn_hf"
    assert card.data.pipeline_tag == "text-generation" and card.data.license == "apache-2.0"
    assert {"unlearn_hf", "neuron-adjust", "key-space-detection"} <= set(card.data.tags)
    text = card.text
    assert "The weights are unchanged" in text and "arithmetic" in text and "English" in text
    assert "5 arithmetic strings" in text and "5 English sentences" in text
    assert "| ksd | arithmetic | answer-token accuracy | 0.64 | 0.08 | 87.5% |" in text  # (0.64-0.08)/0.64
    assert f'UnlearnedModelForCausalLM.from_pretrained("{repo}")' in text
    assert "`alpha`" in text and "`ratio`" in text  # the methods' settings
    assert unlearn_hf.__version__ in text

    # second version on main: only Selective Pruning
    v2 = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama(seed=4)), smol_tokenizer, ("sp",))
    out2 = outputs(v2, batch)
    with hub_env(hub.endpoint, tmp_path / "push-cache", token=TOKEN):
        info2 = v2.push_to_hub(repo, save_base_model=True, base_model_name_or_path="test-user/tiny-origin")
    assert info2.oid != info1.oid

    fresh = tmp_path / "fresh-cache"
    with hub_env(hub.endpoint, fresh, token=TOKEN):
        latest = UnlearnedModelForCausalLM.from_pretrained(repo)
        pinned = UnlearnedModelForCausalLM.from_pretrained(repo, revision=info1.oid)
    assert list(latest.methods) == ["sp"] and list(pinned.methods) == ["na", "ksd"]
    assert_same_methods(v2, latest)
    assert_same_methods(v1, pinned)
    assert_same_outputs(out2, outputs(latest, batch))
    assert_same_outputs(out1, outputs(pinned, batch))

    hub.clear_requests()
    with hub_env(hub.endpoint, fresh, token=TOKEN, offline=True):
        offline_latest = UnlearnedModelForCausalLM.from_pretrained(repo)
        offline_pinned = UnlearnedModelForCausalLM.from_pretrained(repo, revision=info1.oid)
    assert hub.requests == []  # served from the cache alone
    assert_same_outputs(out2, outputs(offline_latest, batch))
    assert_same_outputs(out1, outputs(offline_pinned, batch))


def test_light_checkpoint_resolves_pinned_base_from_the_hub(hub, tmp_path, smol_tokenizer, batch):
    base_repo, repo = f"{USER}/tiny-base", f"{USER}/tiny-light"
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        api = HfApi()
        api.create_repo(base_repo)
        tiny_llama(seed=0).save_pretrained(tmp_path / "base-v1")
        base_v1 = api.upload_folder(folder_path=tmp_path / "base-v1", repo_id=base_repo).oid
        base = AutoModelForCausalLM.from_pretrained(base_repo)
        model = fit_methods(UnlearnedModelForCausalLM.from_base(base), smol_tokenizer, ("na", "ksd", "sp"))
        before = outputs(model, batch)
        model.push_to_hub(repo, base_model_revision=base_v1, forget_skill="arithmetic")
        # the base repo moves on to other weights
        tiny_llama(seed=9).save_pretrained(tmp_path / "base-v2")
        api.upload_folder(folder_path=tmp_path / "base-v2", repo_id=base_repo)
    files = hub.files(repo)
    assert set(files) == {".gitattributes", "README.md", CONFIG_NAME, WEIGHTS_NAME}
    saved = json.loads(files[CONFIG_NAME])["base_model"]
    assert (saved["name_or_path"], saved["revision"]) == (base_repo, base_v1)
    assert ModelCard(files["README.md"].decode()).data.base_model == base_repo

    fresh = tmp_path / "fresh-cache"
    with hub_env(hub.endpoint, fresh, token=TOKEN):
        loaded = UnlearnedModelForCausalLM.from_pretrained(repo)
        assert_same_outputs(before, outputs(loaded, batch))
        # the base model at its newest revision is another model: refused
        with pytest.raises(FingerprintMismatchError, match="weight values differ"):
            UnlearnedModelForCausalLM.from_pretrained(repo, base_model_revision="main")

    hub.clear_requests()
    with hub_env(hub.endpoint, fresh, token=TOKEN, offline=True):
        again = UnlearnedModelForCausalLM.from_pretrained(repo)
    assert hub.requests == []
    assert_same_outputs(before, outputs(again, batch))


def test_hub_repo_without_unlearning_or_with_a_pickle(hub, tmp_path, smol_tokenizer, monkeypatch):
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        api = HfApi()
        api.create_repo("plain")
        tiny_llama().save_pretrained(tmp_path / "plain")
        api.upload_folder(folder_path=tmp_path / "plain", repo_id=f"{USER}/plain")
        with pytest.raises(
            UnlearnFormatError,
            match=f"No {CONFIG_NAME} in the Hub repo {USER}/plain@[0-9a-f]{{40}}: it holds no saved",
        ):
            UnlearnedModelForCausalLM.from_pretrained(f"{USER}/plain")

        model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama()), smol_tokenizer, ("sp",))
        model.save_pretrained(tmp_path / "pickled", base_model_name_or_path=f"{USER}/plain")
        (tmp_path / "pickled" / WEIGHTS_NAME).unlink()
        torch.save(model.methods["sp"].state_dict(), tmp_path / "pickled" / "unlearn_model.bin")
        api.create_repo("pickled")
        api.upload_folder(folder_path=tmp_path / "pickled", repo_id=f"{USER}/pickled")
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
        with pytest.raises(UnlearnFormatError, match="unlearn_model.bin.*pickle-based files are refused"):
            UnlearnedModelForCausalLM.from_pretrained(f"{USER}/pickled")


def test_push_to_a_new_branch_creates_it(hub, tmp_path, smol_tokenizer, batch):
    """``revision="dev"`` on a repo without that branch creates it, as transformers' ``push_to_hub`` does (it
    failed with ``RevisionNotFoundError`` and left an empty repo; found by a review); main is left alone."""
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(tiny_llama(seed=4)), smol_tokenizer, ("na", "ksd")
    )
    repo = f"{USER}/tiny-branch"
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        model.push_to_hub(
            repo, save_base_model=True, revision="dev", base_model_name_or_path=f"{USER}/origin"
        )
        api = HfApi()
        assert {b.name for b in api.list_repo_refs(repo).branches} == {"main", "dev"}
        assert CONFIG_NAME in api.list_repo_files(repo, revision="dev")
        assert CONFIG_NAME not in api.list_repo_files(repo)
        loaded = UnlearnedModelForCausalLM.from_pretrained(repo, revision="dev")
    assert_same_outputs(outputs(loaded, batch), outputs(model, batch))


def test_a_failed_push_deletes_the_repo_it_created_and_only_that(hub, tmp_path, smol_tokenizer, monkeypatch):
    """An upload that fails after the repo was created (network, quota) left an empty repo behind (a review). The
    repo the push created is deleted again; a repo that existed before keeps its content."""
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama(seed=4)), smol_tokenizer, ("na",))
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        model.push_to_hub("kept", save_base_model=True, base_model_name_or_path=f"{USER}/origin")
        head = hub.head(f"{USER}/kept")

        def fail(*args, **kwargs):
            raise ConnectionError("connection reset (simulated)")

        monkeypatch.setattr(HfApi, "upload_folder", fail)
        for repo in ("new", "kept"):
            with pytest.raises(ConnectionError, match="simulated"):
                model.push_to_hub(repo, save_base_model=True, base_model_name_or_path=f"{USER}/origin")
        api = HfApi()
        assert not api.repo_exists(f"{USER}/new")
        assert api.repo_exists(f"{USER}/kept") and hub.head(f"{USER}/kept") == head
        assert CONFIG_NAME in api.list_repo_files(f"{USER}/kept")


def test_private_push_refuses_an_existing_public_repo(hub, tmp_path, smol_tokenizer):
    """``private=True`` does not change an existing repo's visibility (``create_repo(exist_ok=True)`` keeps it):
    the push published the model the user asked to keep private (a review). It is refused before any upload and
    the repo is left as it was; an existing private repo takes the push."""
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama(seed=4)), smol_tokenizer, ("na",))
    kwargs = {"save_base_model": True, "base_model_name_or_path": f"{USER}/origin"}
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        model.push_to_hub("open", **kwargs)
        model.push_to_hub("closed", private=True, **kwargs)
        heads = {repo: hub.head(f"{USER}/{repo}") for repo in ("open", "closed")}
        with pytest.raises(ValueError, match=r"test-user/open exists and is public"):
            model.push_to_hub("open", private=True, commit_message="second", **kwargs)
        assert hub.head(f"{USER}/open") == heads["open"]
        # another card, so that the push has a change to commit (two saves of one model may write the same bytes)
        model.push_to_hub(
            "closed", private=True, commit_message="second", forget_skill="arithmetic", **kwargs
        )
        api = HfApi()
        assert api.list_repo_commits(f"{USER}/closed")[0].title == "second"
        assert (
            api.model_info(f"{USER}/closed").private is True and hub.head(f"{USER}/closed") != heads["closed"]
        )


def test_a_full_push_from_a_local_base_folder_has_no_local_path_in_its_card(hub, tmp_path, smol_tokenizer):
    """The card's metadata names the base model only when it is a Hub id: the Hub refuses a `base_model` that names
    no model (the loopback Hub does too), which failed every full push of a model loaded from a folder (a review)."""
    tiny_llama(seed=4).save_pretrained(tmp_path / "my base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "my base")
    model = fit_methods(UnlearnedModelForCausalLM.from_base(base), smol_tokenizer, ("sp",))
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        model.push_to_hub(f"{USER}/from-folder", save_base_model=True, forget_skill="arithmetic")
    card = ModelCard(hub.files(f"{USER}/from-folder")["README.md"].decode())
    assert card.data.base_model is None
    assert str(tmp_path) not in card.content and "`my base`" in card.text


def test_a_push_over_an_earlier_one_removes_the_files_only_the_earlier_one_wrote(
    hub, tmp_path, smol_tokenizer
):
    """A light push over a full one: the full layout's base model and tokenizer files (its config's
    companion_files) go, or plain transformers would load the old weights from the repo; a file the user put there
    stays, as a local save keeps it (a review)."""
    repo = f"{USER}/pushed-twice"
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama(seed=4)), smol_tokenizer, ("sp",))
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        model.push_to_hub(
            repo, save_base_model=True, tokenizer=smol_tokenizer, base_model_name_or_path=f"{USER}/origin"
        )
        HfApi().upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id=repo)
        full = set(hub.files(repo))
        assert {"config.json", "model.safetensors", "tokenizer.json", "notes.txt"} <= full
        model.push_to_hub(repo, save_base_model=False, base_model_name_or_path=f"{USER}/origin")
    light = set(hub.files(repo))
    assert {CONFIG_NAME, WEIGHTS_NAME, "README.md", "notes.txt"} <= light
    assert not light & {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}
    assert json.loads(hub.files(repo)[CONFIG_NAME])["layout"] == "light"


def test_pushing_an_unchanged_model_again_makes_no_commit(hub, tmp_path, smol_tokenizer):
    """The same fit saves the same bytes (safetensors' header metadata is written sorted), so huggingface_hub sees
    every file unchanged and the second push commits nothing: before, unlearn_model.safetensors differed at every
    save and each push uploaded it again."""
    repo = f"{USER}/pushed-unchanged"
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(tiny_llama(seed=5)), smol_tokenizer, ("ksd", "na", "sp")
    )
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        model.push_to_hub(repo, base_model_name_or_path=f"{USER}/origin")
        first, files = hub.head(repo), hub.files(repo)
        model.push_to_hub(repo, base_model_name_or_path=f"{USER}/origin")
    assert hub.head(repo) == first and hub.files(repo) == files
