"""Argument handling of the launcher: errors are argparse errors (exit 2) naming the problem."""

import pytest

from m2mix_openclip.integration import registry
from m2mix_openclip.integration.launcher import main


def error_of(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_registry_lists_and_rejects():
    assert {"clip", "m2mix"} <= set(registry.available_losses())
    assert "geometry" in registry.available_eval_metrics()
    assert "zeroshot" in registry.available(registry.EVAL_HOOKS_GROUP)
    with pytest.raises(registry.PluginError, match="unknown plugin 'm3mix'.*'open_clip.losses': .*clip, m2mix"):
        registry.get_loss("m3mix")
    with pytest.raises(registry.PluginError, match="'open_clip.eval_metrics': .*geometry"):
        registry.get_eval_metric("nope")


@pytest.mark.parametrize("argv,message", [
    (["--loss", "m3mix"], "unknown plugin 'm3mix'; registered in entry-point group 'open_clip.losses'"),
    (["--loss", "m2mix", "--siglip", "--vmix-weight", "0.1"],
     "--vmix-weight cannot be combined with --siglip: V-Mix, L-Mix and VL-Mix are soft-target softmax terms"),
    (["--loss", "m2mix", "--siglip", "--lmix-weight", "0.1", "--vlmix-weight", "0.1"],
     "--lmix-weight, --vlmix-weight cannot be combined with --siglip"),
    (["--loss", "m2mix", "--siglip", "--horovod"], "does not support --horovod"),
    (["--loss", "m2mix", "--m2mix-weight", "-1"], "argument --m2mix-weight: a weight must be >= 0"),
    (["--loss", "m2mix", "--m2mix-alpha", "0"], "argument --m2mix-alpha: must be > 0, got '0'"),
    (["--loss", "m2mix", "--m2mix-temperature", "hot"],
     "argument --m2mix-temperature: expected a temperature > 0 (e.g. 0.07) or 'learned'"),
    (["--loss", "m2mix", "--unimix-temperature", "0"], "argument --unimix-temperature: expected a temperature"),
    (["--loss", "m2mix", "--mix-schedule", "cosine"], "invalid choice: 'cosine'"),
    (["--loss", "m2mix", "--m2mix-weight", "0"], "every mixing weight at 0"),
    (["--loss", "clip", "--m2mix-weight", "0.1"], "--m2mix-weight belongs to --loss m2mix, but --loss is clip"),
    (["--m2mix-weight=0.1"], "--m2mix-weight belongs to --loss m2mix, but --loss is clip"),
    (["--loss", "m2mix", "--m2mix-wieght", "0.1"], "--m2mix-wieght (did you mean --m2mix-weight?)"),
    (["--loss", "m2mix", "--lr-sched", "cosine"], "unrecognized arguments: --lr-sched (did you mean --lr-scheduler?)"),
    (["--eval-metrics", "nope"], "unknown plugin 'nope'"),
])
def test_bad_flags_are_one_line_errors(capsys, argv, message):
    err = error_of(capsys, *argv)
    assert message in err
    assert len(err.strip().splitlines()) == 2 and "usage:" not in err  # the error and a pointer to --help
    assert "_temperature" not in err and "function" not in err


def test_batch_of_one_stops_before_training(capsys, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    data = tmp_path / "t.csv"
    data.write_text(f"filepath\ttitle\n{image}\tcap\n")
    err = error_of(capsys, "--loss", "m2mix", "--train-data", str(data), "--batch-size", "1")
    assert "--batch-size 1" in err and "at least 2" in err


def test_missing_train_data_is_one_line(capsys, tmp_path):
    err = error_of(capsys, "--train-data", str(tmp_path / "nope.csv"))
    assert f"--train-data {tmp_path / 'nope.csv'}: file not found" in err


def test_help_lists_openclip_and_plugin_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--train-data", "--loss-dist-impl", "--loss LOSS", "--m2mix-weight", "--m2mix-alpha",
                 "--m2mix-temperature", "--mix-schedule", "--vmix-weight", "--lmix-weight", "--vlmix-weight",
                 "--unimix-alpha", "--mix-pairing", "--eval-metrics"):
        assert flag in out, flag


def test_help_shows_plugin_flags_first(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    entries = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]  # past the usage line
    assert entries.index("--loss") < entries.index("--m2mix-weight") < entries.index("--train-data")
    assert entries.index("--zeroshot-data") < entries.index("--train-data")


def test_step_logger_logs_loss_scalars_once_per_openclip_logging_step(monkeypatch):
    import sys
    import types
    from argparse import Namespace

    import torch
    import torch.nn.functional as F

    from m2mix_openclip import M2MixLoss
    from m2mix_openclip.integration.launcher import StepLogger

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

    logged = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(log=lambda data, step: logged.append((data, step))))
    loss = M2MixLoss(vmix_weight=0.1)
    writer = Writer()
    proxy = StepLogger(writer, loss, epoch=1, args=Namespace(wandb=True))
    x = F.normalize(torch.randn(4, 8), dim=1)
    seen = {}
    for step in (3, 4, 5):
        loss(x, x.roll(1, 0), torch.tensor(10.0))
        seen[step] = dict(loss.last_lambdas)
        if step != 4:  # OpenCLIP logs steps 3 and 5 only, several scalars each
            proxy.add_scalar("train/loss", 1.0, step)
            proxy.add_scalar("train/lr", 0.1, step)
    ours = [(n, v, s) for n, v, s in writer.scalars if n == "train/m2mix_lambda"]
    assert ours == [("train/m2mix_lambda", seen[3]["m2mix"], 3), ("train/m2mix_lambda", seen[5]["m2mix"], 5)]
    assert ("train/vmix_lambda", seen[3]["vmix"], 3) in writer.scalars
    assert ("train/nonfinite_steps", 0.0, 5) in writer.scalars
    assert [step for _, step in logged] == [3, 5] and logged[1][0]["train/m2mix_lambda"] == seen[5]["m2mix"]
    # without --report-to tensorboard OpenCLIP gets a writer that swallows, and ours still logs to wandb
    quiet = StepLogger(None, loss, epoch=1, args=Namespace(wandb=True))
    quiet.add_scalar("train/loss", 1.0, 7)
    assert logged[-1][1] == 7


def test_a_flag_of_a_newer_openclip_is_answered_with_the_installed_version(monkeypatch):
    """The wording (the matrix runs the real thing on 2.20-2.26, whose trainers lack these flags)."""
    from m2mix_openclip.integration import openclip_compat as compat
    monkeypatch.setattr(compat, "openclip_version", lambda: "2.24.0")
    monkeypatch.setattr(compat, "trainer_flags", lambda: frozenset({"--siglip", "--lr"}))
    assert compat.missing_flag_advice("--device") == (
        "OpenCLIP 2.24.0's trainer has no --device (it came in 2.28); it takes a visible GPU, else the CPU: leave "
        "--device out (CUDA_VISIBLE_DEVICES= keeps it on the CPU)")
    assert compat.missing_flag_advice("--loss-dist-impl").startswith("OpenCLIP 2.24.0's trainer has no "
                                                                     "--loss-dist-impl (it came in 2.30)")
    assert compat.missing_flag_advice("--siglip") is None and compat.missing_flag_advice("--devise") is None


def test_resume_command_replaces_resume():
    from m2mix_openclip.integration.launcher import resume_command
    assert resume_command(["--name", "a b", "--resume", "x.pt", "--epochs", "3"]) == \
        "m2mix-train --name 'a b' --epochs 3 --resume latest"
    assert resume_command(["--resume=latest", "--lr", "1e-3"]) == "m2mix-train --lr 1e-3 --resume latest"


@pytest.mark.parametrize("loss_name", ["m2mix", "clip"])
def test_a_0_1_0_loss_state_file_is_read_only_by_a_loss_with_a_state(tmp_path, loss_name):
    """m2mix-openclip 0.1.0 kept the loss state beside the checkpoint (loss_state_epoch_N.pth): a
    resumed m²-Mix loss continues from it; OpenCLIP's own loss, which has no state, never opens it."""
    import torch

    from m2mix_openclip import M2MixLoss
    from m2mix_openclip.integration.launcher import LEGACY_LOSS_STATE, RunHooks, parse_args
    saved = M2MixLoss(seed=7)
    saved.generator.manual_seed(1234)
    torch.rand(5, generator=saved.generator)  # the generator has moved on from its seed
    legacy = tmp_path / LEGACY_LOSS_STATE.format(epoch=1)
    if loss_name == "m2mix":
        torch.save({"state_dict": saved.state_dict()}, legacy)
    else:
        legacy.write_bytes(b"not a torch file")  # would fail to load, were it opened
    args = parse_args(["--model", "RN50", "--loss", loss_name, "--train-data", "x.csv"], check_data=False)
    args.rank, args.world_size, args.distill = 0, 1, False  # what OpenCLIP's main sets before create_loss
    hooks = RunHooks({"main_module": None})
    hooks.resume_path, hooks.resume_epoch = str(tmp_path / "epoch_1.pt"), 1
    loss = hooks.create_loss(args)
    if loss_name == "m2mix":
        torch.testing.assert_close(loss.generator.get_state(), saved.generator.get_state())
    else:
        assert not hasattr(loss, "generator")
