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
    with pytest.raises(ValueError, match="registered losses.*clip.*m2mix"):
        registry.get_loss("m3mix")
    with pytest.raises(ValueError, match="registered metrics.*geometry"):
        registry.get_eval_metric("nope")


@pytest.mark.parametrize("argv,message", [
    (["--loss", "m3mix"], "unknown loss 'm3mix'; registered losses"),
    (["--loss", "m2mix", "--siglip", "--vmix-weight", "0.1"],
     "--vmix-weight cannot be combined with --siglip: V-Mix, L-Mix and VL-Mix are soft-target softmax terms"),
    (["--loss", "m2mix", "--siglip", "--lmix-weight", "0.1", "--vlmix-weight", "0.1"],
     "--lmix-weight, --vlmix-weight cannot be combined with --siglip"),
    (["--loss", "m2mix", "--siglip", "--horovod"], "does not support --horovod"),
    (["--loss", "m2mix", "--m2mix-weight", "-1"], "--m2mix-weight: must be a finite number >= 0"),
    (["--loss", "m2mix", "--m2mix-alpha", "0"], "--m2mix-alpha: must be a finite number > 0"),
    (["--loss", "m2mix", "--m2mix-temperature", "0"], "--m2mix-temperature"),
    (["--loss", "m2mix", "--mix-schedule", "cosine"], "invalid choice: 'cosine'"),
    (["--loss", "m2mix", "--m2mix-weight", "0"], "every mixing weight at 0"),
    (["--loss", "clip", "--m2mix-weight", "0.1"], "--m2mix-weight belongs to --loss m2mix, but --loss is clip"),
    (["--loss", "m2mix", "--m2mix-w", "0.1"], "unrecognized arguments: --m2mix-w"),
    (["--loss", "m2mix", "--lr-sched", "cosine"], "unrecognized arguments: --lr-sched"),
    (["--eval-metrics", "nope"], "unknown eval metric 'nope'"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, message):
    assert message in error_of(capsys, *argv)


def test_help_lists_openclip_and_plugin_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--train-data", "--loss-dist-impl", "--loss LOSS", "--m2mix-weight", "--m2mix-alpha",
                 "--m2mix-temperature", "--mix-schedule", "--vmix-weight", "--lmix-weight", "--vlmix-weight",
                 "--unimix-alpha", "--mix-pairing", "--eval-metrics"):
        assert flag in out, flag


def test_lambda_logger_writes_tensorboard_and_wandb_at_openclip_steps(monkeypatch):
    import sys
    import types
    from argparse import Namespace

    import torch
    import torch.nn.functional as F

    from m2mix_openclip import M2MixLoss
    from m2mix_openclip.integration.launcher import LambdaLogger

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

    logged = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(log=lambda data, step: logged.append((data, step))))
    loss = M2MixLoss(vmix_weight=0.1)
    writer = Writer()
    args = Namespace(accum_freq=2, rank=0, log_every_n_steps=2, wandb=True)
    wrapped = LambdaLogger(loss, epoch=1, num_batches_per_epoch=3, args=args, tb_writer=writer)
    x = F.normalize(torch.randn(4, 8), dim=1)
    lambdas = []
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches
        wrapped(x, x.roll(1, 0), torch.tensor(10.0), output_dict=True)
        lambdas.append(dict(loss.last_lambdas))
    # steps 3 (i_accum 0) and 5 (i_accum 2, the last) are logged, with the last micro-batch's lambdas
    assert [s for n, _, s in writer.scalars if n == "train/m2mix_lambda"] == [3, 5]
    assert ("train/vmix_lambda", lambdas[1]["vmix"], 3) in writer.scalars
    assert [step for _, step in logged] == [3, 5] and logged[1][0]["train/m2mix_lambda"] == lambdas[5]["m2mix"]
