"""m2mix-export: the folder loads in OpenCLIP (local-dir:) with the checkpoint's weights, its
preprocessing and tokens, and no random-init warning; it appears whole and checked, or not at all."""

import json
import logging
import os

import open_clip
import pytest
import torch
from PIL import Image

from m2mix_openclip.demo import write_local_model
from m2mix_openclip.export import export_model, main
from m2mix_openclip.integration import openclip_compat


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model folder (config only) and a training checkpoint of it, as OpenCLIP's trainer
    saves one (``state_dict`` with DistributedDataParallel's ``module.`` prefixes)."""
    base = tmp_path_factory.mktemp("export")
    name = write_local_model(str(base / "model"))
    torch.manual_seed(3)
    model = open_clip.create_model(openclip_compat.model_name(name))
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # not the initial value: the checkpoint's own weights must arrive
    torch.save({"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {}}, base / "epoch_2.pt")
    return base, name


@pytest.mark.skipif(not openclip_compat.native_local_dir(), reason="local-dir: models arrived in OpenCLIP 3.0")
def test_the_folder_loads_in_openclip_with_the_checkpoint_weights(trained, tmp_path, caplog):
    base, name = trained
    main(["--model", name, "--checkpoint", str(base / "epoch_2.pt"), "--out", str(tmp_path / "exported")])
    saved = torch.load(base / "epoch_2.pt", weights_only=True)["state_dict"]
    with caplog.at_level(logging.INFO):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert any("Found CLIP weights" in r.getMessage() for r in caplog.records)
    state = model.state_dict()
    assert set(state) == {k[len("module."):] for k in saved}
    for key, value in saved.items():
        assert torch.equal(state[key[len("module."):]], value), key
    assert float(state["logit_scale"]) == 3.0
    # the same preprocessing and tokens as the model it came from
    _, _, source_preprocess = open_clip.create_model_and_transforms(name)
    image = Image.new("RGB", (50, 37), (200, 30, 90))
    assert torch.equal(preprocess(image), source_preprocess(image))
    texts = ["a handwritten digit seven", "the digit 7, written by hand"]
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exported'}")(texts),
                       open_clip.get_tokenizer(name)(texts))
    provenance = json.loads((tmp_path / "exported" / "m2mix_export.json").read_text())
    assert provenance["checkpoint"] == str(base / "epoch_2.pt") and provenance["model"] == name
    assert sorted(os.listdir(tmp_path / "exported")) == ["m2mix_export.json", "open_clip_config.json",
                                                         "open_clip_pytorch_model.bin"]


def test_a_bare_state_dict_exports_and_the_tools_load_the_folder(trained, tmp_path):
    from m2mix_openclip.models import load_model, read_checkpoint
    base, name = trained
    torch.save(read_checkpoint(str(base / "epoch_2.pt")), tmp_path / "bare.pt")
    export_model(name, str(tmp_path / "exported"), checkpoint=str(tmp_path / "bare.pt"))
    model, _, _ = load_model(f"local-dir:{tmp_path / 'exported'}")  # no --checkpoint: the folder's weights
    for key, value in read_checkpoint(str(base / "epoch_2.pt")).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_nothing_is_written_over_and_a_failed_export_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    base, name = trained
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_bytes(b"other weights")
    assert main(["--model", name, "--checkpoint", str(base / "epoch_2.pt"), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path / "busy") == ["model.safetensors"]

    misfit = {"visual.proj": torch.zeros(3, 3)}
    torch.save(misfit, tmp_path / "misfit.pt")
    assert main(["--model", name, "--checkpoint", str(tmp_path / "misfit.pt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"m2mix-export: error: checkpoint {tmp_path / 'misfit.pt'} does not fit model")
    assert sorted(os.listdir(tmp_path)) == ["busy", "misfit.pt"]  # no folder, no staging left behind

    assert main(["--model", name, "--out", str(tmp_path / "y")]) == 2
    assert "give --checkpoint" in capsys.readouterr().err

    # a check that fails after writing (here: the folder would load other weights) leaves nothing either
    from m2mix_openclip import export
    original = export._verify

    def failing(folder, model, tokenizer):
        assert sorted(os.listdir(folder)) == ["m2mix_export.json", "open_clip_config.json",
                                              "open_clip_pytorch_model.bin"]
        with torch.no_grad():
            model.logit_scale.add_(1.0)
        original(folder, model, tokenizer)

    monkeypatch.setattr(export, "_verify", failing)
    with pytest.raises(RuntimeError, match="loads other weights than the checkpoint's .*logit_scale"):
        export_model(name, str(tmp_path / "z"), checkpoint=str(base / "epoch_2.pt"))
    assert sorted(os.listdir(tmp_path)) == ["busy", "misfit.pt"]
