"""m2mix-demo's own files (the model folder's config, the bare pre-trained state) appear whole or
not at all: a demo stopped while writing leaves no half file for a later run to read."""

import json
import os

import pytest
import torch

from m2mix_openclip import demo
from m2mix_openclip.integration import openclip_compat


def test_the_model_config_is_written_whole_and_nothing_else(tmp_path):
    folder = tmp_path / "model"
    assert demo.write_local_model(str(folder)) == f"local-dir:{folder}"
    assert os.listdir(folder) == ["open_clip_config.json"]  # no temporary file left
    written = json.loads((folder / "open_clip_config.json").read_text())
    text_cfg = demo.TINY_MODEL["model_cfg"]["text_cfg"]
    assert written["model_cfg"]["text_cfg"]["context_length"] == openclip_compat.tokenizer_context_length(
        text_cfg["context_length"])
    assert written["model_cfg"]["vision_cfg"] == demo.TINY_MODEL["model_cfg"]["vision_cfg"]
    assert written["preprocess_cfg"] == demo.TINY_MODEL["preprocess_cfg"]


def test_a_config_that_fails_to_write_leaves_the_file_before_it(tmp_path):
    folder = tmp_path / "model"
    unwritable = {**demo.TINY_MODEL, "preprocess_cfg": {"mean": object()}}  # fails after model_cfg
    with pytest.raises(TypeError, match="not JSON serializable"):
        demo.write_local_model(str(folder), unwritable)
    assert os.listdir(folder) == []
    demo.write_local_model(str(folder))
    before = (folder / "open_clip_config.json").read_bytes()
    with pytest.raises(TypeError):
        demo.write_local_model(str(folder), unwritable)
    assert (folder / "open_clip_config.json").read_bytes() == before
    assert os.listdir(folder) == ["open_clip_config.json"]


def test_the_bare_state_is_the_checkpoints_model_written_whole(tmp_path):
    weights = torch.arange(6.0).reshape(2, 3)
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module.w": weights}, "optimizer": {}}, checkpoint)
    bare = tmp_path / "pretrained.pt"
    assert demo._bare_state(str(checkpoint), str(bare)) == str(bare)
    saved = torch.load(bare, weights_only=True)
    assert saved.keys() == {"w"} and torch.equal(saved["w"], weights)
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "pretrained.pt"]


def test_a_bare_state_that_fails_to_write_leaves_no_file(tmp_path, monkeypatch):
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, checkpoint)

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as opened:
                save_until_the_disk_is_full(obj, opened)
        f.write(b"PK\x03\x04 the first bytes of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left on device"):
        demo._bare_state(str(checkpoint), str(tmp_path / "pretrained.pt"))
    assert os.listdir(tmp_path) == ["epoch_1.pt"]
