"""The plugin protocol module on its own: standard library only, and its rules for plugins that
clash or cannot be imported (the trainer runs of both paths are in test_training.py)."""

import argparse
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from m2mix_openclip.integration import plugins, registry


def test_it_runs_with_the_standard_library_alone():
    """As OpenCLIP's trainer holds it: no site-packages at all (``-S``), loaded from its file."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("plugins", {plugins.__file__!r})
        module = sys.modules["plugins"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "open_clip", "m2mix_openclip")))
        print(module.available_losses(), module.get_loss("clip") is module.OPENCLIP_LOSS)
        print(module.chosen_loss(["--lr", "1", "--loss=m2mix"]), module.chosen_loss(["--loss"]))
    """)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "['clip'] True", "m2mix clip"]


def test_the_installed_clip_loss_is_the_protocols_own():
    from importlib.metadata import entry_points

    ours = {ep.name: ep for ep in entry_points(group=plugins.LOSS_GROUP) if ep.dist.name == "m2mix-openclip"}
    assert ours["clip"].load() is plugins.OPENCLIP_LOSS  # one object, not a copy beside it
    assert plugins.get_loss("clip") is plugins.OPENCLIP_LOSS


def test_registry_names_are_the_protocols():
    for name in registry.__all__:
        assert getattr(registry, name) is getattr(plugins, name), name


def _distribution(site, name, entry_points, module_source):
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))


@pytest.fixture
def extra_plugins(tmp_path, monkeypatch):
    """A second installed distribution: a metric whose key clashes with ``geometry``'s, a metric and
    a hook that cannot be imported, and a hook that works."""
    site = tmp_path / "site"
    _distribution(site, "extra_plugins", (
        "[open_clip.eval_metrics]\nclashing = extra_plugins:clashing\nbroken_metric = extra_broken:METRIC\n"
        "dtypes = extra_plugins:dtypes\n"
        "[open_clip.eval_hooks]\nbroken_hook = extra_broken:HOOK\nepoch_hook = extra_plugins:epoch_hook\n"),
        """
        import torch
        def clashing(image_features, text_features):
            return {"alignment": torch.tensor(0.5)}
        def dtypes(image_features, text_features):
            return {"float32_inputs": image_features.dtype == text_features.dtype == torch.float32}
        def epoch_hook(model, tokenizer, preprocess, epoch, args):
            return {"hook-epoch": epoch, "hook-preprocess": preprocess}
        """)
    (site / "extra_broken.py").write_text("raise ImportError('needs a package that is not installed')\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_evaluation_plugins_merge_without_clashes(extra_plugins):
    g = torch.Generator().manual_seed(0)
    x, y = (F.normalize(torch.randn(8, 4, generator=g), dim=1) for _ in range(2))
    x, y = x.half(), y.half()  # as features leave a model under --precision fp16
    args = argparse.Namespace(eval_metrics=["geometry", "dtypes"])
    metrics = plugins.eval_metrics(args, x, y, existing={"image_to_text_R@1": 0.5})
    assert "image_to_text_R@1" not in metrics and metrics["float32_inputs"] == 1.0
    unit_x, unit_y = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    assert metrics["alignment"] == pytest.approx(float((unit_x - unit_y).norm(dim=1).pow(2).mean()), abs=1e-6)
    args.eval_metrics = ["geometry", "clashing"]
    with pytest.raises(ValueError, match=r"eval metric 'clashing' returned keys that already exist: \['alignment'\]"):
        plugins.eval_metrics(args, x, y)
    args.eval_metrics = ["clashing"]
    with pytest.raises(ValueError, match=r"eval metric 'clashing' returned keys that already exist: \['alignment'\]"):
        plugins.eval_metrics(args, x, y, existing={"alignment": 0.1})
    clashing = plugins.eval_metrics(args, x, y)
    assert clashing == {"alignment": 0.5} and type(clashing["alignment"]) is float


def test_plugins_that_cannot_be_imported_are_skipped_unless_chosen(extra_plugins, caplog):
    args = argparse.Namespace(zeroshot_data=None)
    with caplog.at_level(logging.WARNING):
        metrics = plugins.eval_hooks(None, None, 3.0, 2, args, existing={"epoch": 2})
    assert metrics == {"hook-epoch": 2.0, "hook-preprocess": 3.0}  # and zeroshot's, empty without its flags
    assert "skipped: plugin 'broken_hook' (extra_broken:HOOK, from extra-plugins 0.1) failed to import: " \
           "ImportError: needs a package that is not installed" in caplog.text
    with pytest.raises(ValueError, match="evaluation hook 'epoch_hook' returned keys that already exist"):
        plugins.eval_hooks(None, None, None, 2, args, existing={"hook-epoch": 1.0})

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise AssertionError(message)

    parsed = plugins.parse_args(Parser(), ["--loss", "clip"])
    assert parsed.eval_metrics == ["clashing", "dtypes", "geometry"]  # every one that imports
    assert "skipped: plugin 'broken_metric'" in caplog.text
    with pytest.raises(AssertionError, match="plugin 'broken_metric' .* failed to import"):
        plugins.parse_args(Parser(), ["--eval-metrics", "geometry", "broken_metric"])


def test_loss_state_in_checkpoints_and_on_resume():
    from open_clip.loss import ClipLoss

    from m2mix_openclip.integration.launcher import parse_args
    assert plugins.checkpoint_entries(ClipLoss()) == {} and plugins.checkpoint_entries(None) == {}
    args = parse_args(["--loss", "m2mix", "--seed", "3"], check_data=False)
    args.rank, args.world_size = 0, 1  # as OpenCLIP's main sets them
    loss = plugins.create_loss(args)
    torch.empty(5).uniform_(generator=loss.generator)  # a few steps into the run
    (state,) = plugins.checkpoint_entries(loss).values()
    expected = torch.empty(3).uniform_(generator=loss.generator)
    resumed = plugins.create_loss(args, state)
    assert torch.equal(torch.empty(3).uniform_(generator=resumed.generator), expected)
    restarted = plugins.create_loss(args)
    assert not torch.equal(torch.empty(3).uniform_(generator=restarted.generator), expected)
    clip_args = parse_args([], check_data=False)
    clip_args.rank, clip_args.world_size, clip_args.distill = 0, 1, False
    assert type(plugins.create_loss(clip_args, state)) is ClipLoss  # a loss without state ignores one


def test_loss_scalars_line_and_values(caplog):
    class Loss:
        def logged_scalars(self):
            return {"m2mix_lambda": torch.tensor(0.25), "nonfinite_steps": 0}

    with caplog.at_level(logging.INFO):
        assert plugins.loss_scalars(Loss(), 1, 7) == {"train/m2mix_lambda": 0.25, "train/nonfinite_steps": 0.0}
    assert "Train Epoch: 1 step 7 loss scalars: m2mix_lambda=0.25 nonfinite_steps=0" in caplog.text
    assert plugins.loss_scalars(object(), 1, 7) == {}
