"""OpenCLIP's real trainer, end to end on the CPU, through the launcher and the patch."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from trainer_utils import (
    GEOMETRY_KEYS,
    common_args,
    csv_args,
    launcher,
    logged_lambdas,
    logged_losses,
    logged_scalars,
    read_log,
    results,
    run,
    write_tiny_model,
)

from m2mix_openclip.data import write_dataset

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = os.path.join(ROOT, "patches", "open_clip_v3.3.0-loss-plugins.patch")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    data = write_dataset(str(base / "data"), splits=("pretrain", "test"), limit=48, shard_size=24, shifts=())
    return {"data": data, "model": write_tiny_model(str(base / "model")), "logs": base / "logs", "base": base}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_m2mix_run(env, name, epochs=2):
    log = read_log(env["logs"], name)
    assert "M2mix_loss" in log and "Contrastive_loss" in log
    assert len(logged_lambdas(log)) >= 3
    rows = results(env["logs"], name)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert GEOMETRY_KEYS <= set(row) and "image_to_text_R@1" in row
    return log


def test_m2mix_on_csv(env):
    proc = launcher(*common_args(env["model"], env["logs"], "csv"), *csv_args(env["data"]), "--loss", "m2mix")
    log = assert_m2mix_run(env, "csv")
    # the run ends with its own last line, not torch's exit statistics
    assert "TorchDynamo" not in proc.stdout + proc.stderr and "FakeTensor" not in proc.stdout + proc.stderr
    # inverse-epoch schedule: epoch 1's factor is 1/2
    assert "mix_schedule_factor=0.5" in log and "nonfinite_steps=0" in log
    import torch
    checkpoint = torch.load(env["logs"] / "csv" / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    assert "generator_state" in checkpoint["loss"]["_extra_state"]


def test_m2mix_on_webdataset_brace_pattern(env):
    d = env["data"]
    assert "{000000..000001}" in d["pretrain"]["shards"]
    launcher(*common_args(env["model"], env["logs"], "wds"), "--dataset-type", "webdataset",
             "--train-data", d["pretrain"]["shards"], "--train-num-samples", "48",
             "--val-data", d["test"]["shards"], "--val-num-samples", "48", "--loss", "m2mix")
    assert_m2mix_run(env, "wds")


def test_clip_through_launcher_equals_plain_openclip(env):
    args = common_args(env["model"], env["logs"], "ref", epochs=1) + csv_args(env["data"])
    run([sys.executable, "-m", "open_clip_train.main", *args])
    ours = common_args(env["model"], env["logs"], "ours", epochs=1) + csv_args(env["data"])
    launcher(*ours, "--loss", "clip")
    ref_losses = logged_losses(read_log(env["logs"], "ref"))
    our_losses = logged_losses(read_log(env["logs"], "ours"))
    assert len(ref_losses) == 3 and our_losses == ref_losses
    assert GEOMETRY_KEYS <= set(results(env["logs"], "ours")[0])  # baselines get the geometry too
    assert not GEOMETRY_KEYS & set(results(env["logs"], "ref")[0])


def test_accum_freq_2(env):
    launcher(*common_args(env["model"], env["logs"], "accum", epochs=1, batch=8), *csv_args(env["data"]),
             "--loss", "m2mix", "--accum-freq", "2", "--vmix-weight", "0.1", "--report-to", "tensorboard")
    log = read_log(env["logs"], "accum")
    assert "M2mix_loss" in log and "Vmix_loss" in log
    # 48 samples, micro-batches of 8, 2 per optimizer step: 3 steps, each logged, one lambda per step,
    # the seeded generator's sequence (m2mix's lambda, then vmix's, every step)
    import torch

    from m2mix_openclip.mixup import sample_beta
    scalars = logged_scalars(log)
    g = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(3):
        expected.append((sample_beta(0.5, 0.5, g), sample_beta(0.5, 0.5, g)))
    assert len(scalars) == 3
    for got, (m2mix, vmix) in zip(scalars, expected):
        assert got["m2mix_lambda"] == pytest.approx(m2mix, rel=1e-3, abs=1e-4)
        assert got["vmix_lambda"] == pytest.approx(vmix, rel=1e-3, abs=1e-4)
    # the same scalars in tensorboard (the [tensorboard] extra), at OpenCLIP's steps 0, 1, 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(env["logs"] / "accum" / "tensorboard")).Reload()
    for key in ("m2mix_lambda", "vmix_lambda", "nonfinite_steps"):
        written = events.Scalars(f"train/{key}")
        assert [e.step for e in written] == [0, 1, 2]
        assert [e.value for e in written] == pytest.approx([s[key] for s in scalars], rel=1e-3, abs=1e-4)


def test_resume_latest_continues_the_lambda_sequence(env):
    base = csv_args(env["data"]) + ["--loss", "m2mix"]
    launcher(*common_args(env["model"], env["logs"], "full"), *base)
    launcher(*common_args(env["model"], env["logs"], "part", epochs=1), *base)
    launcher(*common_args(env["model"], env["logs"], "part", epochs=2), *base, "--resume", "latest")
    full = logged_lambdas(read_log(env["logs"], "full"))
    part = logged_lambdas(read_log(env["logs"], "part"))  # out.log is appended to on resume
    assert "restored loss state" in read_log(env["logs"], "part")
    assert len(full) == 6 and part == full


def test_torchrun_two_cpu_processes_local_loss_gather_with_grad(env):
    # Fine-tune from a bare (model-only) state dict, which OpenCLIP 3.3.0 cannot load under DDP.
    import open_clip
    import torch
    bare = env["base"] / "bare.pt"
    torch.save(open_clip.create_model(env["model"]).state_dict(), bare)
    args = common_args(env["model"], env["logs"], "ddp", epochs=1, batch=8) + csv_args(env["data"])
    args += ["--resume", str(bare)]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "m2mix_openclip.train", "--", *args, "--loss", "m2mix", "--local-loss", "--gather-with-grad"])
    log = read_log(env["logs"], "ddp")
    assert "total 2" in log and "M2mix_loss" in log and f"loaded checkpoint '{bare}'" in log
    assert GEOMETRY_KEYS <= set(results(env["logs"], "ddp")[0])


@pytest.fixture(scope="module")
def patched(env):
    """A copy of the installed OpenCLIP trainer with patches/open_clip_v3.3.0-loss-plugins.patch,
    first on PYTHONPATH."""
    import open_clip_train
    src = env["base"] / "patched" / "src"
    shutil.copytree(os.path.dirname(open_clip_train.__file__), src / "open_clip_train",
                    ignore=shutil.ignore_patterns("__pycache__"))
    root = src.parent
    subprocess.run(["patch", "-p1", "--dry-run", "-i", PATCH], cwd=root, check=True, capture_output=True)
    subprocess.run(["patch", "-p1", "-i", PATCH], cwd=root, check=True, capture_output=True)
    return {"PYTHONPATH": str(src)}


@pytest.mark.parametrize("path", ["launcher", "patch"])
def test_launcher_and_patch_behave_alike(env, patched, path):
    """One protocol, two paths: the same loss terms, loss scalars at the same steps with the same
    names, geometry and zero-shot figures, and the loss state inside the checkpoint."""
    import torch
    name = f"alike-{path}"
    d = env["data"]
    args = common_args(env["model"], env["logs"], name, epochs=2) + csv_args(d) + [
        "--loss", "m2mix", "--zeroshot-data", f"clean={d['test']['csv']}", "--zeroshot-classnames",
        "zero,one,two,three,four,five,six,seven,eight,nine", "--zeroshot-templates", "the number {c}"]
    if path == "launcher":
        launcher(*args)
    else:
        run([sys.executable, "-m", "open_clip_train.main", *args], env_extra=patched)
    log = read_log(env["logs"], name)
    assert "M2mix_loss" in log
    scalars = logged_scalars(log)
    assert len(scalars) == 6 and set(scalars[0]) == {"m2mix_lambda", "mix_schedule_factor", "nonfinite_steps"}
    rows = results(env["logs"], name)
    assert len(rows) == 2 and all(GEOMETRY_KEYS <= set(r) and "clean-zeroshot-top1" in r for r in rows)
    checkpoint = torch.load(env["logs"] / name / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    assert checkpoint["loss"]["_extra_state"]["epoch"] == 1
    if path == "patch":  # the same numbers as the launcher's run, which ran first
        assert logged_scalars(read_log(env["logs"], "alike-launcher")) == scalars
        assert logged_losses(read_log(env["logs"], "alike-launcher")) == logged_losses(log)


def test_patched_openclip_closes_the_abbreviation_trap(patched):
    bad = run([sys.executable, "-m", "open_clip_train.main", "--loss-dist", "x"], env_extra=patched, check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --loss-dist" in bad.stderr
    bad = run([sys.executable, "-m", "open_clip_train.main", "--loss", "m2mix", "--siglip", "--vmix-weight", "0.1"],
              env_extra=patched, check=False)
    assert bad.returncode == 2 and "cannot be combined with --siglip" in bad.stderr


def test_loss_from_a_second_installed_distribution(env, tmp_path):
    site = tmp_path / "site"
    (site / "scaled_clip_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "scaled_clip_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: scaled-clip-plugin\nVersion: 0.1\n")
    (site / "scaled_clip_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[open_clip.losses]\nhalf_clip = scaled_clip_plugin:PLUGIN\n")
    (site / "scaled_clip_plugin.py").write_text(textwrap.dedent("""
        from open_clip.loss import ClipLoss
        from m2mix_openclip.integration.registry import LossPlugin

        class HalfClip(ClipLoss):
            def forward(self, *args, output_dict=False, **kwargs):
                value = 0.5 * super().forward(*args, **kwargs)
                return {"half_contrastive_loss": value} if output_dict else value

        PLUGIN = LossPlugin(build=lambda args: HalfClip(), description="half of ClipLoss")
    """))
    # a second distribution whose plugins cannot be imported, and that registers "m2mix" again
    (site / "broken_plugin-0.2.dist-info").mkdir()
    (site / "broken_plugin-0.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.2\n")
    (site / "broken_plugin-0.2.dist-info" / "entry_points.txt").write_text(
        "[open_clip.losses]\nbroken = broken_plugin:PLUGIN\nm2mix = broken_plugin:PLUGIN\n"
        "[open_clip.eval_hooks]\nbroken_hook = broken_plugin:HOOK\n")
    (site / "broken_plugin.py").write_text("raise ImportError('needs a package that is not installed')\n")
    env_extra = {"PYTHONPATH": str(site)}
    probe = run([sys.executable, "-c", "from m2mix_openclip.integration import registry as r; "
                 "print(r.available_losses()); print(type(r.get_loss('half_clip')(None)).__name__); "
                 "print(r.duplicates(r.LOSS_GROUP))"],
                env_extra=env_extra)
    assert "'half_clip'" in probe.stdout and "HalfClip" in probe.stdout and "'broken'" in probe.stdout
    assert "name 'm2mix' is registered by m2mix-openclip" in probe.stdout and "and by broken-plugin 0.2" in probe.stdout
    helped = launcher("--help", env_extra=env_extra)
    assert "--m2mix-weight" in helped.stdout
    assert "--loss broken: unavailable: plugin 'broken' (broken_plugin:PLUGIN, from broken-plugin 0.2) failed to " \
           "import: ImportError: needs a package that is not installed" in " ".join(helped.stdout.split())
    chosen = launcher("--loss", "broken", env_extra=env_extra, check=False)
    assert chosen.returncode == 2
    assert "plugin 'broken' (broken_plugin:PLUGIN, from broken-plugin 0.2) failed to import" in chosen.stderr
    assert "evaluation hook broken_hook: unavailable: plugin 'broken_hook'" in " ".join(helped.stdout.split())
    # the broken evaluation hook is skipped, with a warning, at every evaluation
    trained = launcher(*common_args(env["model"], env["logs"], "plugin", epochs=1), *csv_args(env["data"]),
                       "--loss", "half_clip", env_extra=env_extra)
    assert "Half_contrastive_loss" in read_log(env["logs"], "plugin")
    assert "skipped: plugin 'broken_hook' (broken_plugin:HOOK, from broken-plugin 0.2) failed to import" \
        in trained.stdout + trained.stderr
    assert GEOMETRY_KEYS <= set(results(env["logs"], "plugin")[0])


def test_loss_state_lives_in_the_checkpoints_that_remain(env):
    import torch
    launcher(*common_args(env["model"], env["logs"], "keep-last", epochs=3), *csv_args(env["data"]),
             "--loss", "m2mix", "--delete-previous-checkpoint", "--val-frequency", "0")
    folder = env["logs"] / "keep-last" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth")) == ["epoch_3.pt"]
    state = torch.load(folder / "epoch_3.pt", map_location="cpu", weights_only=False)
    assert state["loss"]["_extra_state"]["epoch"] == 2
