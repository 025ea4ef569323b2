"""End-to-end tests of the loopback Hub with the real `huggingface_hub` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, hub_env, start_hub_server
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

TOKEN = "hf_loopback_test_token"
REPO = "test-user/tiny"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with start_hub_server(tmp_path) as server:
        yield server


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}), encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    # ~3 MB of float32 weights
    save_file({"weight": torch.randn(768, 1000, generator=generator)}, str(folder / "model.safetensors"))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_download_roundtrip_with_revisions(hub: HubServer, model_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with hub_env(hub.endpoint, cache, token=TOKEN):
        api = HfApi()
        url = api.create_repo("tiny", exist_ok=False)
        assert url.repo_id == REPO
        api.create_repo("tiny", exist_ok=True)  # 409 swallowed
        first = api.upload_folder(folder_path=model_folder, repo_id=REPO, commit_message="v1")
        assert hub.head(REPO) == first.oid
        assert hub.is_lfs_file(REPO, "model.safetensors") and not hub.is_lfs_file(REPO, "config.json")
        # the weights travelled through the LFS batch API + PUT, the JSON file inline
        paths = [(r.method, r.path) for r in hub.requests]
        assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in paths
        assert any(m == "PUT" and p.startswith("/_lfs/upload/") for m, p in paths)
        assert all(r.token == TOKEN for r in hub.requests if r.path.startswith("/api/") and r.server == "hub")

        local = Path(snapshot_download(REPO))
        expected = _files(model_folder)
        downloaded = _files(local)
        assert {k: downloaded[k] for k in expected} == expected
        assert ".gitattributes" in downloaded  # like the Hub, create_repo makes an initial commit
        assert local.name == first.oid

        assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "config.json", "model.safetensors"]
        info = api.model_info(REPO, files_metadata=True)
        assert info.sha == first.oid and info.private is False
        sizes = {s.rfilename: s.size for s in info.siblings}
        assert sizes["model.safetensors"] == len(expected["model.safetensors"])
        lfs = {s.rfilename: s.lfs for s in info.siblings}
        assert lfs["model.safetensors"] is not None and lfs["config.json"] is None

        # second commit changes config.json only (the unchanged weights are skipped by the client)
        (model_folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
        second = api.upload_file(
            path_or_fileobj=model_folder / "config.json", path_in_repo="config.json", repo_id=REPO
        )
        assert second.oid != first.oid and hub.head(REPO) == second.oid
        assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second.oid, first.oid]

        latest = Path(snapshot_download(REPO))
        assert latest.name == second.oid
        assert (latest / "model.safetensors").read_bytes() == expected["model.safetensors"]
        new = json.loads(Path(hf_hub_download(REPO, "config.json")).read_text())
        old = json.loads(Path(hf_hub_download(REPO, "config.json", revision=first.oid)).read_text())
        assert (old["n_layer"], new["n_layer"]) == (1, 2)
        old_tree = {f.path for f in api.list_repo_tree(REPO, revision=first.oid, recursive=True)}
        assert old_tree == {".gitattributes", "config.json", "model.safetensors"}
        assert api.model_info(REPO, revision=first.oid).sha == first.oid

        # errors map to the client's exception classes
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(REPO, "missing.json")
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(REPO, "config.json", revision="no-such-branch")
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("test-user/does-not-exist")

    # LFS objects were served by the CDN origin, without the token
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert cdn and all(r.token is None for r in cdn)

    # offline: served from the cache, the server sees nothing
    before = len(hub.requests)
    with hub_env(hub.endpoint, cache, token=TOKEN, offline=True):
        offline_dir = Path(snapshot_download(REPO))
        assert json.loads((offline_dir / "config.json").read_text())["n_layer"] == 2
        assert (offline_dir / "model.safetensors").read_bytes() == expected["model.safetensors"]
        old_dir = Path(snapshot_download(REPO, revision=first.oid))
        assert json.loads((old_dir / "config.json").read_text())["n_layer"] == 1
        old_config = hf_hub_download(REPO, "config.json", revision=first.oid)
        assert json.loads(Path(old_config).read_text())["n_layer"] == 1
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "never-downloaded.json")
    assert len(hub.requests) == before


def test_private_repo_needs_token(hub: HubServer, tmp_path: Path) -> None:
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        api = HfApi()
        api.create_repo("secret", private=True)
        api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id="test-user/secret")
        assert api.model_info("test-user/secret").private is True
        path = hf_hub_download("test-user/secret", "config.json")
        assert json.loads(Path(path).read_text()) == {"a": 1}
    with hub_env(hub.endpoint, tmp_path / "other-cache", token=None):
        with pytest.raises(RepositoryNotFoundError):
            HfApi().model_info("test-user/secret")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("test-user/secret", "config.json")
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("test-user/secret")
    unauthenticated = [r for r in hub.requests if r.token is None and r.server == "hub"]
    assert unauthenticated and all(r.status == 401 for r in unauthenticated)


def test_restricted_tokens_and_write_needs_token(tmp_path: Path) -> None:
    with HubServer(tmp_path / "storage", tokens={"good"}) as hub:
        with hub_env(hub.endpoint, tmp_path / "cache", token="bad"):
            with pytest.raises(Exception, match="401"):
                HfApi().create_repo("x")
        with hub_env(hub.endpoint, tmp_path / "cache", token=None):
            with pytest.raises(Exception, match="401"):
                HfApi().create_repo("x")
        with hub_env(hub.endpoint, tmp_path / "cache", token="good"):
            assert HfApi().whoami()["name"] == "test-user"
            HfApi().create_repo("x")
        assert hub.tokens_seen[-1] == "good"


def test_autoconfig_through_server(hub: HubServer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        HfApi().create_repo("cfg")
        config.push_to_hub("test-user/cfg")
        loaded = transformers.AutoConfig.from_pretrained("test-user/cfg")
    assert loaded.model_type == "gpt2" and loaded.n_layer == 1 and loaded.n_embd == 8


def test_server_state_survives_restart(tmp_path: Path) -> None:
    with HubServer(tmp_path / "storage") as hub, hub_env(hub.endpoint, tmp_path / "c1", token=TOKEN):
        HfApi().create_repo("persist")
        commit = HfApi().upload_file(
            path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="test-user/persist"
        )
    with HubServer(tmp_path / "storage") as hub, hub_env(hub.endpoint, tmp_path / "c2", token=TOKEN):
        assert hub.head("test-user/persist") == commit.oid
        assert Path(hf_hub_download("test-user/persist", "a.txt")).read_bytes() == b"hello"


def test_hub_env_restores_client_state(tmp_path: Path) -> None:
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module

    before = (
        constants.ENDPOINT,
        constants.HF_HUB_CACHE,
        constants.HF_HUB_OFFLINE,
        hf_api_module.api.endpoint,
    )
    with hub_env("http://127.0.0.1:1", tmp_path / "cache", offline=True):
        assert constants.ENDPOINT == "http://127.0.0.1:1"
        assert constants.HF_HUB_CACHE == str(tmp_path / "cache")
        assert constants.HF_HUB_OFFLINE is True
        assert hf_api_module.api.endpoint == "http://127.0.0.1:1"
    after = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, hf_api_module.api.endpoint)
    assert after == before
