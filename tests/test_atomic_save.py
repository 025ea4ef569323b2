"""Crash-safe, contained saves: a save killed at any moment leaves the old or the new checkpoint (never neither,
never a mix), temporaries are cleaned, nothing outside the folder is touched, user files are kept."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers_persistence import assert_same_outputs, encode, fit_methods, outputs
from safetensors import SafetensorError
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from unlearn_hf import UnlearnedModelForCausalLM
from unlearn_hf.persistence import CONFIG_NAME, WEIGHTS_NAME, atomic, read_config, read_weights

KILLS_PER_LAYOUT = 20


@pytest.fixture(scope="module")
def two_models(smollm2, tmp_path_factory):
    """Two unlearned models that differ in every file: other base weights (saved folders, so that a light
    checkpoint finds its base), other methods."""
    tok = smollm2[1]
    models = []
    for seed, names in ((1, ("na",)), (2, ("ksd", "sp"))):
        folder = tmp_path_factory.mktemp(f"base{seed}")
        tiny_llama(seed=seed).save_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder).eval()
        models.append(fit_methods(UnlearnedModelForCausalLM.from_base(base), tok, names))
    return tuple(models)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if atomic.TMP_MARK in p.name or atomic.OLD_MARK in p.name)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (links: their target text)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def which_checkpoint(folder: Path, expected: dict[str, dict[str, torch.Tensor]], full: bool) -> str:
    """``"old"`` or ``"new"``: the checkpoint in ``folder``, checked tensor for tensor (a mix fails)."""
    config = read_config(folder)
    tensors = read_weights(folder, config)
    flat = {f"{m}.{t}": v for m, ts in tensors.items() for t, v in ts.items()}
    matches = []
    for label, want in expected.items():
        if flat.keys() == want["methods"].keys() and all(
            torch.equal(flat[k], want["methods"][k]) for k in flat
        ):
            matches.append(label)
    assert len(matches) == 1, f"the unlearning files match {matches}"
    if full:
        base = safetensors.torch.load_file(str(folder / "model.safetensors"))
        want = expected[matches[0]]["base"]
        assert base.keys() == want.keys() and all(torch.equal(base[k], want[k]) for k in base)
    return matches[0]


def flat_methods(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": v for n, m in model.methods.items() for t, v in m.state_dict().items()}


@pytest.mark.parametrize("full", [False, True], ids=["light", "full"])
def test_sigkill_at_random_moments_never_loses_the_checkpoint(two_models, smollm2, tmp_path, full):
    """A child process saves the two models into one folder, alternately, without end; it is SIGKILLed at random
    moments. After every kill the folder holds exactly one of the two checkpoints, it loads, and the next save
    leaves no temporary behind. A folder beside it is never touched."""
    old, new = two_models
    expected = {
        label: {
            "methods": flat_methods(m),
            "base": {k: v.clone() for k, v in m.get_base_model().state_dict().items()},
        }
        for label, m in (("old", old), ("new", new))
    }
    target = tmp_path / "ckpt"
    neighbour = tmp_path / "neighbour"
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("not yours")
    (neighbour / f".{target.name}-lookalike").write_text("also not yours")
    before = snapshot(neighbour)
    old.save_pretrained(target, save_base_model=full)
    (target / "notes.txt").write_text("a user's notes")

    start = time.monotonic()
    old.save_pretrained(target, save_base_model=full)
    save_s = time.monotonic() - start
    rng = random.Random(1234)
    seen, current = [], "old"
    for _ in range(KILLS_PER_LAYOUT):
        order = (new, old) if current == "old" else (old, new)  # the first save changes the checkpoint
        pid = os.fork()
        if pid == 0:  # the saving child: never returns
            # tqdm's lock is a semaphore shared across fork: a child killed inside a progress bar would leave
            # it held for the parent. The child shows no progress bars.
            hf_logging.disable_progress_bar()
            try:
                while True:
                    for m in order:
                        m.save_pretrained(target, save_base_model=full)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, max(0.2, 8 * save_s)))  # several saves: the kill lands in any phase
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        current = which_checkpoint(target, expected, full)
        seen.append(current)
        assert (target / "notes.txt").read_text() == "a user's notes"
    assert set(seen) == {"old", "new"}, seen  # the kills did land on both sides of the commit

    loaded = UnlearnedModelForCausalLM.from_pretrained(target)
    assert list(loaded.methods) == (["na"] if seen[-1] == "old" else ["ksd", "sp"])
    new.save_pretrained(target, save_base_model=full)
    assert leftovers(tmp_path) == []
    assert which_checkpoint(target, expected, full) == "new"
    assert snapshot(neighbour) == before
    batch = encode(smollm2[1])
    assert_same_outputs(
        outputs(new, batch), outputs(UnlearnedModelForCausalLM.from_pretrained(target), batch)
    )


class Interrupted(BaseException):
    """A simulated kill (not an Exception, so that no ``except Exception`` can swallow it)."""


def test_without_rename_exchange_a_kill_between_the_two_renames_keeps_the_old_checkpoint(
    two_models, smollm2, tmp_path, monkeypatch, caplog
):
    """Where RENAME_EXCHANGE is missing, the swap is two renames; killed between them, the folder name is empty for
    a moment: loading finds the old checkpoint (with a warning) and the next save puts it back first."""
    old, new = two_models
    batch = encode(smollm2[1])
    target = tmp_path / "ckpt"
    old.save_pretrained(target, save_base_model=True)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    renames = []
    real_rename = os.rename

    def rename(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) == 2:
            raise Interrupted
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(Interrupted):
        new.save_pretrained(target, save_base_model=True)
    monkeypatch.undo()
    assert renames[0][0] == "ckpt" and atomic.OLD_MARK in renames[0][1]
    assert not target.exists()
    with caplog.at_level(logging.WARNING):
        loaded = UnlearnedModelForCausalLM.from_pretrained(target)
    assert "was killed halfway" in caplog.text
    assert_same_outputs(outputs(old, batch), outputs(loaded, batch))

    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    new.save_pretrained(target, save_base_model=True)
    assert leftovers(tmp_path) == []
    assert_same_outputs(
        outputs(new, batch), outputs(UnlearnedModelForCausalLM.from_pretrained(target), batch)
    )


def test_stale_temporaries_of_killed_saves_are_removed_by_the_next_save(two_models, tmp_path):
    old, _ = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    for i in range(3):
        mark = atomic.TMP_MARK if i < 2 else atomic.OLD_MARK
        stale = tmp_path / f".ckpt{mark}{i:012x}"  # what killed saves leave
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / f".other{atomic.TMP_MARK}alive"  # another folder's temporary: not ours to remove
    other.mkdir()
    old.save_pretrained(target)
    assert leftovers(tmp_path) == [other.name]


@pytest.fixture
def other_file_system(tmp_path):
    """A folder on another file system than ``tmp_path`` when the machine has one (/dev/shm is tmpfs on Linux),
    else beside it: the save must work the same either way."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        folder = Path(tempfile.mkdtemp(dir=shm, prefix="unlearn-hf-test-"))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:  # pragma: no cover - machines without a second file system
        yield tmp_path / "disk"


def test_save_through_a_link_writes_into_the_real_folder(two_models, tmp_path, other_file_system):
    """The link stays a link; the temporaries live next to the real folder, on its file system (a link into
    another file system used to lose the old checkpoint to EXDEV)."""
    old, new = two_models
    real = other_file_system / "real"
    old.save_pretrained(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    new.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert list(UnlearnedModelForCausalLM.from_pretrained(link).methods) == ["ksd", "sp"]
    assert leftovers(tmp_path) == [] and leftovers(real.parent) == []


def test_dot_dot_after_a_link_saves_where_loading_looks(two_models, tmp_path, monkeypatch):
    """``link/../ck`` is resolved as the file system resolves it (next to the link's target), where
    ``from_pretrained`` of the same string reads; it used to be collapsed as text to ``./ck``, so the load read an
    older checkpoint (a review)."""
    old, new = two_models
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other" / "deep").mkdir(parents=True)
    os.symlink(tmp_path / "other" / "deep", "link")
    old.save_pretrained(tmp_path / "other" / "ck")
    new.save_pretrained("link/../ck")
    assert not (tmp_path / "ck").exists()
    assert list(UnlearnedModelForCausalLM.from_pretrained("link/../ck").methods) == list(new.methods)
    assert list(new.methods) != list(old.methods)


def test_a_save_never_deletes_or_writes_outside_its_folder(two_models, tmp_path):
    """A config whose companion files walk through a linked subfolder or out of the folder: nothing outside is
    deleted; the user's links are kept as links."""
    old, new = two_models
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    (target / "sub").symlink_to(outside, target_is_directory=True)
    config = json.loads((target / CONFIG_NAME).read_text())
    config["companion_files"] = ["sub/victim.txt", "../outside/victim.txt"]
    (target / CONFIG_NAME).write_text(json.dumps(config))
    before = snapshot(outside)
    new.save_pretrained(target)
    assert snapshot(outside) == before
    assert (target / "sub").is_symlink() and (target / "sub" / "victim.txt").read_text() == "precious"


def test_config_listing_the_unlearning_files_as_companions_does_not_empty_the_folder(two_models, tmp_path):
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    config = json.loads((target / CONFIG_NAME).read_text())
    config["companion_files"] = [CONFIG_NAME, WEIGHTS_NAME]
    (target / CONFIG_NAME).write_text(json.dumps(config))
    new.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert list(UnlearnedModelForCausalLM.from_pretrained(target).methods) == ["ksd", "sp"]


def test_user_files_are_kept_and_another_models_files_are_overwritten_with_a_warning(
    two_models, tmp_path, caplog
):
    """A folder that holds a plain transformers model: a full save into it warns, naming the files it replaces;
    the user's other files (a subfolder, a link) are kept; the previous save's own files are replaced quietly."""
    old, new = two_models
    target = tmp_path / "ckpt"
    old.get_base_model().save_pretrained(target)
    (target / "docs").mkdir()
    (target / "docs" / "notes.md").write_text("mine")
    (target / "latest").symlink_to("docs")
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.persistence.atomic"):
        new.save_pretrained(target, save_base_model=True)
    assert (
        "Overwriting" in caplog.text and "model.safetensors" in caplog.text and "config.json" in caplog.text
    )
    assert (target / "docs" / "notes.md").read_text() == "mine" and os.readlink(target / "latest") == "docs"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.persistence.atomic"):
        old.save_pretrained(target, save_base_model=True)
    assert "Overwriting" not in caplog.text
    assert list(UnlearnedModelForCausalLM.from_pretrained(target).methods) == ["na"]


def test_a_light_save_into_another_models_folder_is_refused(two_models, tmp_path):
    """A light save into a folder that holds a plain model (its config.json and weights, written by no unlearn_hf
    save) is refused before anything is written: it kept them, so AutoModelForCausalLM and the CLI's tokenizer
    loaded the other model next to this checkpoint's methods (a review). The user's tokenizer files alone are fine,
    and a full save replaces the other model's files."""
    old, new = two_models
    target = tmp_path / "ckpt"
    old.get_base_model().save_pretrained(target)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"another model's files .*config\.json, model\.safetensors"):
        new.save_pretrained(target, save_base_model=False)
    assert snapshot(target) == before and not leftovers(tmp_path)
    new.save_pretrained(target, save_base_model=True)
    assert list(UnlearnedModelForCausalLM.from_pretrained(target).methods) == list(new.methods)
    new.save_pretrained(target, save_base_model=False)  # its own full save's files: replaced by the light one
    assert not (target / "model.safetensors").exists() and not (target / "config.json").exists()
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer_config.json").write_text("{}")
    new.save_pretrained(tokenizer_only, save_base_model=False)
    assert (tokenizer_only / "tokenizer_config.json").read_text() == "{}"


def test_a_failed_save_leaves_the_old_folder_and_no_temporary(two_models, tmp_path, monkeypatch):
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, save_base_model=True)
    before = snapshot(target)

    for error in (OSError(28, "No space left on device (simulated)"), SafetensorError("IoError (simulated)")):

        def crash(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(safetensors.torch, "save_file", crash)  # the base model's weights
        monkeypatch.setattr(safetensors.torch, "save", crash)  # the fitted tensors
        # an AtomicSaveError (an OSError, which the CLI reports in one line), saying the folder is unchanged
        with pytest.raises(atomic.AtomicSaveError, match=r"simulated.*the folder is unchanged"):
            new.save_pretrained(target, save_base_model=True)
        assert snapshot(target) == before and leftovers(tmp_path) == []


def test_saving_into_a_file_is_refused_before_anything_is_written(two_models, tmp_path):
    old, _ = two_models
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        old.save_pretrained(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        old.save_pretrained(tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


def test_a_read_only_folder_is_refused_before_anything_is_written(two_models, tmp_path):
    """A checkpoint folder made read-only (mode 0555) was replaced anyway, and its undeletable previous contents
    then blocked every later save (found by a review). It is refused, by its mode bits (root included)."""
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    os.chmod(target, 0o555)
    try:
        with pytest.raises(atomic.AtomicSaveError, match=r"the folder is read-only \(mode 555\)"):
            new.save_pretrained(target)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before and leftovers(tmp_path) == []
    finally:
        os.chmod(target, 0o755)
    new.save_pretrained(target)  # writable again: saved


def test_dot_dot_and_the_current_folder(two_models, tmp_path, monkeypatch):
    """``save_pretrained("..")`` saves into the parent (".." used to become a name and nest without end); saving
    the folder the process stands in leaves the process in the new folder, not in the deleted old one."""
    old, new = two_models
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "ckpt" / "sub")
    old.save_pretrained("..")
    assert list(UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt").methods) == ["na"]
    assert (tmp_path / "ckpt" / "sub").is_dir() and leftovers(tmp_path) == []
    monkeypatch.chdir(tmp_path / "ckpt")
    new.save_pretrained(".")
    assert Path(os.getcwd()) == tmp_path / "ckpt" and Path("unlearn_config.json").is_file()
    assert list(UnlearnedModelForCausalLM.from_pretrained(".").methods) == ["ksd", "sp"]


def test_the_folders_mode_owner_and_empty_subfolders_are_kept(two_models, tmp_path):
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    (target / "empty").mkdir()
    (target / "private").mkdir()
    (target / "private" / "key").write_text("k")
    os.chmod(target / "private", 0o700)
    os.chmod(target, 0o2770)
    if os.geteuid() == 0:
        os.chown(target, 65534, os.getgid())
    before = target.stat()
    (tmp_path / f".ckpt{atomic.TMP_MARK}mybackup").mkdir()  # a user's look-alike, not a temporary of ours
    new.save_pretrained(target)
    after = target.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert (target / "empty").is_dir() and (target / "private" / "key").read_text() == "k"
    assert stat.S_IMODE((target / "private").stat().st_mode) == 0o700
    assert leftovers(tmp_path) == [f".ckpt{atomic.TMP_MARK}mybackup"]


def pretend_mounted(folder: Path, monkeypatch) -> None:
    """Make the save's checks see ``folder`` as a mount point of another file system."""
    real_ismount, real_stat = os.path.ismount, os.stat

    def stat_(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        if Path(path) == folder:
            return os.stat_result((*st[:2], st.st_dev + 1, *st[3:]))
        return st

    monkeypatch.setattr(atomic.os.path, "ismount", lambda p: Path(p) == folder or real_ismount(p))
    monkeypatch.setattr(atomic.os, "stat", stat_)


def test_mount_points_are_refused_before_anything_is_written(two_models, tmp_path, monkeypatch):
    """A mount point cannot be swapped, and a file system mounted inside the folder would be copied and then
    emptied: both are refused with one clear error, and the mounted files are untouched."""
    old, _ = two_models
    outer, inner = tmp_path / "mounted", tmp_path / "ckpt" / "data"
    outer.mkdir()
    old.save_pretrained(tmp_path / "ckpt")
    inner.mkdir()
    mounted = []
    try:
        for folder in (outer, inner):
            if subprocess.run(["mount", "-t", "tmpfs", "none", str(folder)], capture_output=True).returncode:
                pretend_mounted(folder, monkeypatch)  # no right to mount here: the same checks, simulated
            else:
                mounted.append(folder)
        (inner / "dataset.txt").write_text("precious")
        with pytest.raises(atomic.AtomicSaveError, match="is a mount point"):
            old.save_pretrained(outer)
        with pytest.raises(atomic.AtomicSaveError, match="mounted inside it"):
            old.save_pretrained(tmp_path / "ckpt")
        assert (inner / "dataset.txt").read_text() == "precious" and list(outer.iterdir()) == []
        assert leftovers(tmp_path) == []
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", str(folder)], check=False)
