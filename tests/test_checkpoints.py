"""Checkpoints written whole and chosen only when they load (plugins.save_checkpoint, integration.checkpoints)."""

import errno
import logging
import os
import pickle
import stat

import pytest
import torch

from m2mix_openclip.integration import plugins
from m2mix_openclip.integration.checkpoints import (
    CheckpointLoadError,
    checkpoint_problem,
    checkpoints_newest_first,
    latest_loadable,
    remove_unfinished_saves,
)
from m2mix_openclip.integration.launcher import KeepingCheckpoints, open_whole


def checkpoint(epoch=1, size=1000, value=0.0):
    return {"epoch": epoch, "state_dict": {"w": torch.full((size,), value), "step": torch.tensor(3)},
            "optimizer": {"lr": 0.1}}


def test_a_saved_checkpoint_loads_and_has_the_mode_open_would_give(tmp_path):
    path = tmp_path / "epoch_1.pt"
    plugins.save_checkpoint(checkpoint(value=2.0), str(path))
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.full((1000,), 2.0))
    assert os.listdir(tmp_path) == ["epoch_1.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    path = tmp_path / "epoch_2.pt"
    plugins.save_checkpoint(checkpoint(), str(path))
    before = path.read_bytes()
    bad = checkpoint(epoch=2)
    bad["state_dict"]["w"][7] = float("inf")
    with pytest.raises(plugins.NonFiniteCheckpointError, match=r"^epoch_2\.pt not saved: the model's weights are not "
                                                               r"finite \(NaN or Inf in w\); the run has diverged"):
        plugins.save_checkpoint(bad, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["epoch_2.pt"]
    assert plugins.nonfinite_tensor({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}) == "b"
    assert plugins.nonfinite_tensor({"a": torch.ones(2), "n": torch.tensor([1, 2])}) is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_says_so_with_the_size_needed_and_leaves_nothing(tmp_path, monkeypatch):
    """The real ENOSPC of the kernel: the save's temporary file is /dev/full. torch reports the
    failed write as "unexpected pos"; the message still says what happened."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    previous = folder / "epoch_1.pt"
    plugins.save_checkpoint(checkpoint(), str(previous))
    real_open = os.open

    def open_full(path, flags, *args):
        if os.path.basename(path).startswith(".epoch_2.pt."):
            real_open(path, flags, *args)  # the name exists, as it would, and is removed on failure
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, *args)

    monkeypatch.setattr(plugins.os, "open", open_full)
    big = checkpoint(epoch=2, size=300_000)
    with pytest.raises(plugins.CheckpointSaveError) as e:
        plugins.save_checkpoint(big, str(folder / "epoch_2.pt"))
    monkeypatch.undo()
    counted = plugins._RecordingWriter()
    torch.save(big, counted)
    free = __import__("shutil").disk_usage(folder).free
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert message.startswith(f"No space left on device: {folder} (epoch_2.pt needs {counted.size / 1e6:.1f} MB, ")
    assert message.endswith("nothing was written under that name and the earlier checkpoints are as they were")
    assert abs(float(message.split(", ")[1].split(" MB free")[0]) - free / 1e6) < 50  # the space free, roughly now
    assert "\n" not in message and sorted(os.listdir(folder)) == ["epoch_1.pt"]
    assert torch.load(previous, weights_only=True)["epoch"] == 1


def test_an_interrupted_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "epoch_latest.pt"
    plugins.save_checkpoint(checkpoint(epoch=1), str(path))

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plugins.save_checkpoint(checkpoint(epoch=2), str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["epoch_latest.pt"] and torch.load(path, weights_only=True)["epoch"] == 1


@pytest.fixture
def folder(tmp_path):
    for epoch in (1, 2, 10):
        torch.save(checkpoint(epoch), tmp_path / f"epoch_{epoch}.pt")
    return tmp_path


def test_checkpoint_problems_are_told_from_the_file_ends(folder):
    whole = (folder / "epoch_10.pt").read_bytes()
    (folder / "cut.pt").write_bytes(whole[:1000])
    (folder / "random.pt").write_bytes(b"\x00" + os.urandom(2999))  # neither "PK" nor a pickle's first byte
    (folder / "empty.pt").write_bytes(b"")
    torch.save(checkpoint(), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    assert checkpoint_problem(str(folder / "epoch_10.pt")) is None
    assert checkpoint_problem(str(folder / "legacy.pt")) is None  # only loading tells
    assert checkpoint_problem(str(folder / "cut.pt")) == (
        "is cut short (1000 bytes and no zip directory at its end: a save that was interrupted or ran out of space)")
    assert checkpoint_problem(str(folder / "random.pt")) == \
        "is not a torch checkpoint (neither torch's zip format nor a pickle)"
    assert checkpoint_problem(str(folder / "empty.pt")) == "is empty (0 bytes)"


def natural(path):
    import re
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path)]


def test_resume_latest_takes_the_newest_that_loads(folder, caplog):
    whole = (folder / "epoch_10.pt").read_bytes()
    (folder / "epoch_10.pt").write_bytes(whole[: len(whole) // 2])  # cut short in place
    (folder / ".epoch_11.pt.1a2b3c4d.tmp").write_bytes(b"unfinished")
    candidates = checkpoints_newest_first(str(folder), str(folder / "epoch_10.pt"), natural)
    assert [os.path.basename(p) for p in candidates] == ["epoch_10.pt", "epoch_2.pt", "epoch_1.pt"]
    loads = []

    def load(path):
        loads.append(os.path.basename(path))
        return torch.load(path, weights_only=True)

    with caplog.at_level(logging.WARNING):
        chosen, loaded = latest_loadable(candidates, load, str(folder))
    assert os.path.basename(chosen) == "epoch_2.pt" and loaded["epoch"] == 2
    assert loads == ["epoch_2.pt"]  # the cut-short one is skipped by its ends, not by a load
    assert f"--resume latest: skipped {folder / 'epoch_10.pt'}: it is cut short" in caplog.text
    assert remove_unfinished_saves(str(folder)) == [".epoch_11.pt.1a2b3c4d.tmp"]
    assert not (folder / ".epoch_11.pt.1a2b3c4d.tmp").exists()

    # a load that fails on a file that looks whole (here, a pickle that would run code): skipped, nothing run
    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(folder / "ran"),))

    with open(folder / "epoch_20.pt", "wb") as f:
        pickle.dump({"epoch": 20, "x": RunsCode()}, f, protocol=2)
    candidates = checkpoints_newest_first(str(folder), None, natural)
    chosen, _ = latest_loadable(candidates, lambda p: torch.load(p, weights_only=True), str(folder))
    assert os.path.basename(chosen) == "epoch_2.pt" and not (folder / "ran").exists()
    assert "skipped" in caplog.text and "epoch_20.pt: it cannot be loaded (UnpicklingError: Weights only load failed" \
        in caplog.text

    # none loads: one line, never a silent start from scratch
    for name in ("epoch_1.pt", "epoch_2.pt"):
        (folder / name).write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match=r"^--resume latest: none of the 4 checkpoint\(s\) in .* loads "
                                                  r"\(epoch_20\.pt cannot be loaded \(UnpicklingError"):
        latest_loadable(checkpoints_newest_first(str(folder), None, natural), torch.load, str(folder))
    assert latest_loadable([], torch.load, str(folder)) == (None, None)


def test_an_io_error_stops_instead_of_going_back_to_an_older_checkpoint(folder):
    def load(path):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(CheckpointLoadError, match=r"epoch_10\.pt cannot be read \(Input/output error\); nothing was "
                                                  "resumed"):
        latest_loadable(checkpoints_newest_first(str(folder), None, natural), load, str(folder))


def test_results_and_params_files_are_written_whole(tmp_path):
    results = tmp_path / "results.jsonl"
    with open_whole(results, "a+") as f:
        f.write('{"epoch": 1}')
        f.write("\n")
    with open_whole(results, "a+") as f:
        f.write('{"epoch": 2}\n')
    assert results.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    with pytest.raises(RuntimeError):
        with open_whole(results, "a+") as f:
            f.write('{"epoch": 3')
            raise RuntimeError("killed halfway")
    assert results.read_text() == '{"epoch": 1}\n{"epoch": 2}\n' and os.listdir(tmp_path) == ["results.jsonl"]
    with open_whole(tmp_path / "params.txt", "w") as f:
        f.write("lr: 0.1\n")
    assert (tmp_path / "params.txt").read_text() == "lr: 0.1\n"
    with open_whole(results) as f:  # reading is the built-in open
        assert f.read().count("\n") == 2


def test_the_previous_checkpoint_stays_when_the_newer_one_was_not_saved(tmp_path, caplog):
    class Hooks:
        refused_save = None

    hooks = Hooks()
    keeping = KeepingCheckpoints(hooks)
    (tmp_path / "epoch_1.pt").write_bytes(b"x")
    (tmp_path / "tmp.pt").write_bytes(b"y")
    hooks.refused_save = str(tmp_path / "epoch_2.pt")
    keeping.remove(str(tmp_path / "epoch_1.pt"))  # --delete-previous-checkpoint
    assert (tmp_path / "epoch_1.pt").exists() and "kept" in caplog.text
    hooks.refused_save = str(tmp_path / "tmp.pt")  # --save-most-recent: the refused tmp.pt is not moved
    keeping.replace(str(tmp_path / "tmp.pt"), str(tmp_path / "epoch_latest.pt"))
    assert not (tmp_path / "epoch_latest.pt").exists()
    hooks.refused_save = None
    keeping.remove(str(tmp_path / "epoch_1.pt"))
    keeping.replace(str(tmp_path / "tmp.pt"), str(tmp_path / "epoch_latest.pt"))
    assert sorted(os.listdir(tmp_path)) == ["epoch_latest.pt"] and keeping.path is os.path
