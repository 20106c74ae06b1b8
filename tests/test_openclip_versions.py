"""Whichever supported OpenCLIP is importable: the adapter reads it right, the loss takes what its
trainer passes and equals its ClipLoss, m2mix-train and the tools run with it.

The default suite runs this file against the installed release (3.3.0); ``.ci/matrix`` reruns it
with only OpenCLIP swapped for 2.20.0, 2.24.0, 2.26.1, 2.32.0 and 3.3.0 (``M2MIX_EXPECT_OPENCLIP``
names the release it installed).
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import warnings

import open_clip
import open_clip.loss
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from packaging.requirements import Requirement
from packaging.version import Version
from trainer_utils import GEOMETRY_KEYS, launcher, logged_lambdas, read_log, results, run

from m2mix_openclip import M2MixLoss, M2MixSigLipLoss
from m2mix_openclip.data import write_dataset
from m2mix_openclip.demo import write_local_model
from m2mix_openclip.integration import launcher as m2mix_launcher
from m2mix_openclip.integration import openclip_compat as compat

VERSION = compat.openclip_version()

# Read from each release's own files (trainer folder, params.py, loss.py, factory.py, tokenizer),
# not from the adapter, which must find the same.
RELEASES = {
    "2.20.0": dict(package="training", device=False, loss_dist_impl=False, logit_bias=False, local_dir=False,
                   tokens=77, siglip=False, siglip_dist_impl=False),
    "2.24.0": dict(package="training", device=False, loss_dist_impl=False, logit_bias=False, local_dir=False,
                   tokens=16, siglip=True, siglip_dist_impl=False),
    "2.26.1": dict(package="open_clip_train", device=False, loss_dist_impl=False, logit_bias=False, local_dir=False,
                   tokens=16, siglip=True, siglip_dist_impl=False),
    "2.32.0": dict(package="open_clip_train", device=True, loss_dist_impl=True, logit_bias=True, local_dir=False,
                   tokens=16, siglip=True, siglip_dist_impl=True),
    "3.3.0": dict(package="open_clip_train", device=True, loss_dist_impl=True, logit_bias=True, local_dir=True,
                  tokens=16, siglip=True, siglip_dist_impl=True),
}


def unit_features(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(n, d, generator=g), dim=1)


def clip_loss_takes_logit_bias() -> bool:
    """Whether this release's ``ClipLoss.forward`` takes ``logit_bias`` (2.32 on): only the tests
    ask; the losses take it on every release."""
    return "logit_bias" in inspect.signature(ClipLoss.forward).parameters


def resume_loads_own_checkpoints() -> bool:
    """False where OpenCLIP's ``--resume`` of its own checkpoint fails: its scheduler writes numpy
    learning rates into the optimizer state (before 2.30), and torch >= 2.6 loads with
    ``weights_only=True`` by default."""
    scheduler = importlib.import_module(f"{compat.require_trainer().package}.scheduler")
    return not (hasattr(scheduler, "np") and Version(torch.__version__).release >= (2, 6))


def wheel_top_level_packages():
    """Top-level packages of the installed open_clip_torch, from its own RECORD (not the adapter)."""
    return {str(f).split("/")[0] for f in importlib.metadata.files("open_clip_torch") if "/" in str(f)}


# -- the adapter ----------------------------------------------------------------------------------
def test_the_environment_holds_the_release_the_matrix_installed():
    expected = os.environ.get("M2MIX_EXPECT_OPENCLIP", importlib.metadata.version("open_clip_torch"))
    assert importlib.metadata.version("open_clip_torch") == expected
    assert VERSION == expected  # the imported open_clip is that wheel's


def test_the_adapter_finds_this_releases_own_trainer():
    trainer = compat.require_trainer()
    shipped = wheel_top_level_packages()
    assert trainer.package in shipped and trainer.package in ("open_clip_train", "training")
    import open_clip
    site = os.path.dirname(os.path.dirname(open_clip.__file__))
    for module in (trainer.main, trainer.params, trainer.train):
        assert os.path.dirname(os.path.dirname(module.__file__)) == site
    assert not trainer.plugins_patch_applied


@pytest.mark.skipif(VERSION not in RELEASES, reason=f"no recorded facts for OpenCLIP {VERSION}")
def test_the_adapter_reads_this_release():
    facts = RELEASES[VERSION]
    assert compat.require_trainer().package == facts["package"]
    assert compat.has_flag("--device") is facts["device"]
    assert compat.has_flag("--loss-dist-impl") is facts["loss_dist_impl"]
    assert clip_loss_takes_logit_bias() is facts["logit_bias"]
    assert compat.native_local_dir() is facts["local_dir"]
    assert compat.tokenizer_context_length(16) == facts["tokens"]
    assert compat.has_siglip_loss() is facts["siglip"] and compat.has_flag("--siglip") is facts["siglip"]
    if facts["siglip"]:
        assert compat.siglip_loss_takes_dist_impl() is facts["siglip_dist_impl"]


def test_the_adapter_reads_this_releases_parsed_arguments():
    """``--siglip`` and ``--loss-dist-impl`` as this release's own parser fills them in, or not at all."""
    params = compat.require_trainer().params
    plain = params.parse_args([])
    assert compat.siglip_requested(plain) is False and compat.loss_dist_impl(plain) is None
    assert ("siglip" in vars(plain)) is compat.has_flag("--siglip")
    assert ("loss_dist_impl" in vars(plain)) is compat.has_flag("--loss-dist-impl")
    if compat.has_flag("--siglip"):
        assert compat.siglip_requested(params.parse_args(["--siglip"])) is True
    if compat.has_flag("--loss-dist-impl"):
        assert compat.loss_dist_impl(params.parse_args(["--loss-dist-impl", "shift"])) == "shift"


def test_flags_are_the_trainers_own():
    """The flags the adapter reports are those whose values OpenCLIP's own parser fills in."""
    namespace = vars(compat.require_trainer().params.parse_args([]))
    for option in ("--device", "--loss-dist-impl", "--siglip", "--batch-size", "--precision"):
        assert compat.has_flag(option) is (option[2:].replace("-", "_") in namespace), option
    assert not compat.has_flag("--loss") and not compat.has_flag("--no-such-flag")  # unpatched OpenCLIP


def test_device_arguments():
    argv, env = compat.device_arguments("cpu")
    if compat.has_flag("--device"):
        assert (argv, env) == (["--device", "cpu"], {})
        assert compat.device_arguments("cuda:1") == (["--device", "cuda:1"], {})
    else:  # the trainer takes cuda when it sees a GPU: hide them
        assert (argv, env) == ([], {"CUDA_VISIBLE_DEVICES": ""})
        with pytest.raises(compat.UnsupportedOpenCLIP, match=r"--device cuda:1 cannot be chosen"):
            compat.device_arguments("cuda:1")


@pytest.mark.parametrize("version, reason", [
    ("2.19.0", "older than the oldest supported release"),
    ("1.3.0", "older than the oldest supported release"),
    ("4.0.0", "not supported yet"),
    ("4.2.0.dev0", "not supported yet"),
    ("main", "not a release number"),
])
def test_versions_outside_the_range_are_refused_in_one_line(version, reason):
    with pytest.raises(compat.UnsupportedOpenCLIP) as info:
        compat.check_version(version)
    message = str(info.value)
    assert "\n" not in message and f"open_clip_torch) {version} at " in message and reason in message
    assert "supports open_clip_torch >=2.20,<4" in message


@pytest.mark.parametrize("version", ["2.20.0", "2.24.0", "2.26.1", "2.32.0", "3.3.0", "3.9.9"])
def test_versions_inside_the_range_pass(version):
    compat.check_version(version)


def test_installed_requirement_admits_the_supported_releases_and_excludes_4():
    requirements = [Requirement(r) for r in importlib.metadata.requires("m2mix-openclip")]
    (open_clip_req,) = [r for r in requirements if r.name == "open_clip_torch" and r.marker is None]
    for version in ("2.20.0", "2.24.0", "2.26.1", "2.32.0", "3.3.0"):
        assert open_clip_req.specifier.contains(version), version
    for version in ("2.19.0", "4.0.0", "4.2.0.dev0"):
        assert not open_clip_req.specifier.contains(version, prereleases=True), version
    (webdataset_req,) = [r for r in requirements if r.name == "webdataset" and r.marker is None]
    assert webdataset_req.specifier.contains("0.2.86") and not webdataset_req.specifier.contains("1.0.2")


# -- the loss takes exactly what this release's trainer passes ---------------------------------
def test_contrastive_loss_equals_this_releases_clip_loss():
    x, y = unit_features()
    scale = torch.tensor(30.0)
    ours = M2MixLoss()(x, y, scale, output_dict=True)["contrastive_loss"]
    torch.testing.assert_close(ours, ClipLoss()(x, y, scale), rtol=1e-6, atol=1e-6)
    independent = ref.clip_terms(x.double(), y.double(), x.double(), y.double(), 0, 30.0)
    torch.testing.assert_close(ours.double(), independent, rtol=1e-6, atol=1e-6)
    if clip_loss_takes_logit_bias():  # 2.32 on: the trainer may pass logit_bias
        for bias in (None, torch.tensor(-3.0)):
            torch.testing.assert_close(
                M2MixLoss()(x, y, scale, logit_bias=bias, output_dict=True)["contrastive_loss"],
                ClipLoss()(x, y, scale, logit_bias=bias, output_dict=True)["contrastive_loss"], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(compat.has_siglip_loss(), reason="this release has SigLipLoss")
def test_without_siglip_loss_the_other_families_import():
    assert not hasattr(open_clip.loss, "SigLipLoss") and M2MixSigLipLoss is None
    assert M2MixLoss(m2mix_weight=0.1).enabled_terms == ["m2mix"]


@pytest.mark.skipif(not compat.has_siglip_loss(), reason="no SigLipLoss in this release")
@pytest.mark.parametrize("dist_impl", [None, "bidir", "shift", "reduce", "gather"])
def test_siglip_loss_takes_and_keeps_each_dist_impl_and_equals_this_releases_on_one_process(dist_impl):
    """``dist_impl`` is taken on every release (SigLipLoss takes it from 2.30), and kept; on one
    process (no exchange runs) the contrastive term is this release's ``SigLipLoss``. The
    exchanges themselves across processes: test_loss_families.py."""
    x, y = unit_features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = M2MixSigLipLoss(dist_impl=dist_impl, m2mix_weight=0.5, mix_schedule="constant")
    assert ours.dist_impl == (dist_impl or "bidir")
    terms = ours(x, y, scale, bias, output_dict=True, mix_lambda=0.4)
    theirs = open_clip.loss.SigLipLoss()(x, y, scale, bias)
    torch.testing.assert_close(terms["contrastive_loss"], theirs, rtol=1e-6, atol=1e-6)
    assert set(terms) == {"contrastive_loss", "m2mix_loss"} and torch.isfinite(terms["m2mix_loss"])
    with pytest.raises(ValueError, match=r"unknown dist_impl 'ring'; choose one of \['bidir', 'shift', 'reduce'"):
        M2MixSigLipLoss(dist_impl="ring")


def test_loss_takes_the_model_output_of_this_release(tmp_path):
    """``loss(**model(images, texts), output_dict=True)``, as this release's trainer calls it."""
    import open_clip
    name = compat.model_name(write_local_model(str(tmp_path / "model")))
    model, _, _ = open_clip.create_model_and_transforms(name, output_dict=True)
    tokenizer = open_clip.get_tokenizer(name)
    texts = tokenizer([f"a handwritten digit {i}" for i in range(6)])
    assert texts.shape[1] == model.positional_embedding.shape[0]  # the tiny config fits the tokenizer
    with torch.no_grad():
        model_out = model(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), texts)
    assert isinstance(model_out, dict) and "logit_bias" not in model_out  # CLIP without init_logit_bias
    ours = M2MixLoss(m2mix_weight=1.0, mix_schedule="constant")(**model_out, output_dict=True, mix_lambda=0.3)
    theirs = ClipLoss()(**model_out, output_dict=True)
    torch.testing.assert_close(ours["contrastive_loss"], theirs["contrastive_loss"], rtol=1e-6, atol=1e-6)
    x, y = model_out["image_features"].double(), model_out["text_features"].double()
    torch.testing.assert_close(ours["m2mix_loss"].double(), ref.m2mix_term(x, y, x, y, 0, 0.3, 0.07),
                               rtol=1e-5, atol=1e-6)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, reason", [
    ("4.2.0.dev0", "not supported yet"), ("4.0.0", "not supported yet"), ("2.19.0", "older than the oldest"),
])
def test_launcher_refuses_other_releases_with_one_line(monkeypatch, capsys, version, reason):
    monkeypatch.setattr(compat, "openclip_version", lambda: version)
    compat.require_trainer.cache_clear()
    try:
        assert m2mix_launcher.main(["--loss", "m2mix", "--train-data", "x.csv"]) == 2
    finally:
        compat.require_trainer.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("m2mix-train: error: ")
    assert f"OpenCLIP (open_clip_torch) {version} at " in err and reason in err
    assert "supports open_clip_torch >=2.20,<4" in err


def _fake_openclip(site, version=None):
    """A copy of the imported ``open_clip`` under ``site``, optionally claiming another version."""
    import open_clip
    shutil.copytree(os.path.dirname(open_clip.__file__), site / "open_clip",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if version is not None:
        (site / "open_clip" / "version.py").write_text(f"__version__ = '{version}'\n")
    return {"PYTHONPATH": str(site)}


def _refusal(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("m2mix-train: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.slow  # a fresh process
def test_m2mix_train_refuses_openclip_4_in_one_line(tmp_path):
    env = _fake_openclip(tmp_path, "4.2.0.dev0")
    line = _refusal(launcher("--model", "ViT-B-32", "--loss", "m2mix", env_extra=env, check=False))
    assert "4.2.0.dev0" in line and ">=2.20,<4" in line and "not supported yet" in line
    # the loss itself stays importable there
    probe = run([sys.executable, "-c", "from m2mix_openclip import M2MixLoss; print(M2MixLoss.__name__)"],
                env_extra=env)
    assert probe.stdout.strip() == "M2MixLoss"


@pytest.mark.slow  # a fresh process
def test_an_unrelated_training_package_is_neither_imported_nor_taken(tmp_path):
    env = _fake_openclip(tmp_path)  # this release's open_clip, beside a package that is not its trainer
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("open(__file__ + '.imported', 'w').close()\n")
    for module in ("main", "params", "train", "file_utils"):
        (tmp_path / "training" / f"{module}.py").write_text("open(__file__ + '.imported', 'w').close()\n")
    line = _refusal(launcher("--model", "ViT-B-32", env_extra=env, check=False))
    assert f"{VERSION} at {tmp_path}" in line and ">=2.20,<4" in line
    assert "'training' beside it is not a recognised OpenCLIP trainer" in line
    assert not list((tmp_path / "training").glob("*.imported"))


@pytest.mark.slow  # a fresh process
def test_a_trainer_of_another_openclip_is_refused(tmp_path):
    env = _fake_openclip(tmp_path)  # open_clip alone: any trainer Python finds is not beside it
    line = _refusal(launcher("--model", "ViT-B-32", env_extra=env, check=False))
    assert f"{VERSION} at {tmp_path}" in line
    assert "no trainer package (open_clip_train, or training before 2.26) beside it" in line
    assert "from another OpenCLIP" in line  # the matrix's base install has open_clip_train elsewhere


# -- the launcher and the tools, end to end -------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny ``m2mix-train --loss m2mix`` run: CSV, 1 epoch, fp32, --workers 0."""
    base = tmp_path_factory.mktemp("versions")
    data = write_dataset(str(base / "data"), splits=("pretrain", "test"), limit=48, shard_size=48, shifts=())
    model = write_local_model(str(base / "model"))
    logs = base / "logs"
    device, env = compat.device_arguments("cpu")
    args = ["--model", model, "--train-data", data["pretrain"]["csv"], "--val-data", data["test"]["csv"],
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--precision", "fp32", "--workers", "0",
            "--batch-size", "16", "--lr", "1e-3", "--warmup", "1", "--seed", "0", "--logs", str(logs),
            "--log-every-n-steps", "1", "--report-to", "", *device, "--loss", "m2mix"]
    launcher(*args, "--epochs", "1", "--name", "run", env_extra=env)
    return {"base": base, "data": data, "model": model, "logs": logs, "args": args, "env": env}


@pytest.mark.slow
def test_m2mix_train_logs_the_m2mix_term_and_the_geometry(trained):
    log = read_log(trained["logs"], "run")
    assert "M2mix_loss" in log and "Contrastive_loss" in log and "Loss: --loss m2mix -> M2MixLoss" in log
    assert len(logged_lambdas(log)) == 3  # 48 samples / 16 per step, every step logged
    rows = results(trained["logs"], "run")
    assert [r["epoch"] for r in rows] == [1] and GEOMETRY_KEYS <= set(rows[0]) and "image_to_text_R@1" in rows[0]
    with compat.numpy_scalars_allowed():  # this release's checkpoint, numpy learning rates and all
        checkpoint = torch.load(trained["logs"] / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert "generator_state" in checkpoint["loss"]["_extra_state"]  # the lambda generator travels with it


@pytest.mark.slow
def test_resume_latest_continues_training(trained):
    """On every release: before 2.30 OpenCLIP's own checkpoints hold numpy learning rates that
    torch's safe loading refuses; m2mix-train allows those scalars, and no other code."""
    checkpoint = trained["logs"] / "run" / "checkpoints" / "epoch_1.pt"
    if not resume_loads_own_checkpoints():
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(checkpoint, weights_only=True)  # what OpenCLIP's own --resume meets here
    shutil.copytree(trained["logs"] / "run", trained["logs"] / "resumed")
    proc = launcher(*trained["args"], "--epochs", "2", "--name", "resumed", "--resume", "latest",
                    env_extra=trained["env"], check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    log = read_log(trained["logs"], "resumed")
    assert "restored loss state" in log and "Model initialized randomly" not in output
    assert [r["epoch"] for r in results(trained["logs"], "resumed")] == [1, 2]


def test_a_flag_of_a_newer_trainer_names_this_release(capsys):
    """``--device`` (2.28), ``--loss-dist-impl`` (2.30), ``--siglip`` (2.22) on a release without them."""
    lacking = [flag for flag in compat.NEWER_TRAINER_FLAGS if not compat.has_flag(flag)]
    expected = {flag for flag, has in (("--device", "device"), ("--loss-dist-impl", "loss_dist_impl"),
                                       ("--siglip", "siglip")) if not RELEASES.get(VERSION, {}).get(has, True)}
    assert set(lacking) == expected or VERSION not in RELEASES
    values = {"--device": ["cpu"], "--loss-dist-impl": ["bidir"], "--siglip": []}
    for flag in lacking:
        with pytest.raises(SystemExit) as exc:
            m2mix_launcher.main([flag, *values[flag]])
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert err.startswith(f"m2mix-train: error: OpenCLIP {VERSION}'s trainer has no {flag} (it came in "
                              f"{compat.NEWER_TRAINER_FLAGS[flag][0]}); ")


@pytest.mark.slow
def test_m2mix_analyze_reads_this_releases_checkpoint(trained):
    out = trained["base"] / "report"
    checkpoint = trained["logs"] / "run" / "checkpoints" / "epoch_1.pt"
    run([sys.executable, "-m", "m2mix_openclip.analyze", "--model", trained["model"], "--checkpoint",
         str(checkpoint), "--data", trained["data"]["test"]["csv"], "--device", "cpu", "--out", str(out),
         "--class-names", "zero,one,two,three,four,five,six,seven,eight,nine"])
    with open(out / "analysis.json") as f:
        report = json.load(f)
    row = report["models"]["epoch_1.pt"]
    assert report["num_pairs"] == 48 and GEOMETRY_KEYS <= set(row) and 0 <= row["zero_shot_accuracy"] <= 1
    # the trainer's own evaluation of that checkpoint on the same data found the same geometry
    trained_row = results(trained["logs"], "run")[0]
    assert row["modality_gap"] == pytest.approx(trained_row["modality_gap"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_an_export_of_this_releases_checkpoint_is_the_trained_model(trained):
    """m2mix-export, then the tools on the folder alone (OpenCLIP 3.x loads its weights; before 3.0,
    which has no local-dir:, the tools read them): the trainer's own evaluation figures again."""
    exported = trained["base"] / "exported"
    checkpoint = trained["logs"] / "run" / "checkpoints" / "epoch_1.pt"
    run([sys.executable, "-m", "m2mix_openclip.export", "--model", trained["model"], "--checkpoint", str(checkpoint),
         "--out", str(exported)])
    out = trained["base"] / "report-exported"
    run([sys.executable, "-m", "m2mix_openclip.analyze", "--model", f"local-dir:{exported}",
         "--data", trained["data"]["test"]["csv"], "--device", "cpu", "--out", str(out)])
    with open(out / "analysis.json") as f:
        row = json.load(f)["models"]["exported"]
    trained_row = results(trained["logs"], "run")[0]
    assert row["modality_gap"] == pytest.approx(trained_row["modality_gap"], rel=1e-4, abs=1e-5)
    if compat.native_local_dir():
        model = open_clip.create_model(f"local-dir:{exported}")
        with compat.numpy_scalars_allowed():
            state = torch.load(checkpoint, weights_only=True)["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_the_adapter_reads_whether_evaluation_passes_a_tokenizer():
    """Read from this release's own zero_shot.py text: 2.20's zero_shot_eval takes no tokenizer."""
    spec = importlib.util.find_spec(f"{compat.require_trainer().package}.zero_shot")
    with open(spec.origin, encoding="utf-8") as f:
        parameters = re.search(r"def zero_shot_eval\(([^)]*)\)", f.read()).group(1)
    assert compat.evaluation_passes_tokenizer() is ("tokenizer" in parameters)
    if VERSION in RELEASES:
        assert compat.evaluation_passes_tokenizer() is (VERSION != "2.20.0")


@pytest.mark.parametrize("precision,autocast_dtype,input_dtype", [
    ("fp32", None, None), ("amp", torch.float16, None), ("amp_bf16", torch.bfloat16, None),
    ("amp_bfloat16", torch.bfloat16, None), ("bf16", None, torch.bfloat16), ("pure_bf16", None, torch.bfloat16),
    ("fp16", None, torch.float16), ("pure_fp16", None, torch.float16),
])
def test_evaluation_precision_on_the_cpu_is_the_trainers(precision, autocast_dtype, input_dtype):
    """What a product computes in under the returned autocast on a CPU, on every release (those
    whose get_autocast cannot reach a CPU get torch.autocast with the same dtypes)."""
    autocast, dtype = compat.evaluation_precision(precision, "cpu")
    assert dtype is input_dtype is open_clip.get_input_dtype(precision)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "CUDA is not available. Disabling autocast"
        with autocast():
            product = torch.ones(3, 3) @ torch.ones(3, 3)
    assert product.dtype == (autocast_dtype or torch.float32)
    meta_autocast, _ = compat.evaluation_precision(precision, torch.device("meta"))
    with meta_autocast():  # no autocast for meta tensors: the product stays float32
        assert (torch.ones(2, 2, device="meta") @ torch.ones(2, 2, device="meta")).dtype == torch.float32


# -- the patch for this release's trainer generation ----------------------------------------------
PATCHES = {"training": "open_clip_v2.24.0-loss-plugins.patch", "open_clip_train": "open_clip_v3.3.0-loss-plugins.patch"}
NO_PATCH = {  # releases of the matrix that no patch in patches/ fits, and why
    "2.20.0": "the v2.24.0 patch does not fit OpenCLIP 2.20.0 (hunks of main.py and train.py differ; its "
              "evaluate() takes no tokenizer) and patches/ has none for 2.20-2.22: m2mix-train runs it unpatched",
}


@pytest.mark.slow
@pytest.mark.skipif(VERSION in NO_PATCH, reason=NO_PATCH.get(VERSION, ""))
def test_the_matching_patch_applies_to_this_wheel_trains_and_reverts(trained, tmp_path):
    """The patch of this trainer generation, on a copy of the installed trainer package (``patch
    -p2`` from site-packages, as the README says): OpenCLIP's own ``main`` then trains ``--loss
    m2mix`` with the geometry metrics, ``m2mix-train`` runs the patched trainer as it is, and
    ``patch -R`` gives back every file byte for byte."""
    import filecmp

    import open_clip
    package = compat.require_trainer().package
    patch_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches", PATCHES[package])
    installed = os.path.dirname(compat.require_trainer().main.__file__)
    site = tmp_path / "site"
    shutil.copytree(installed, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    patch = ["patch", "-d", str(site), "-p2", "--no-backup-if-mismatch", "-i", patch_file]
    run([*patch, "--dry-run"])
    run(patch)
    assert (site / package / "plugins.py").exists()
    # OpenCLIP's own main knows no local-dir: before 3.0: the tiny model as a built-in config instead
    shutil.copytree(os.path.dirname(open_clip.__file__), site / "open_clip",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(trained["model"][len("local-dir:"):], "open_clip_config.json")) as f:
        (site / "open_clip" / "model_configs" / "m2mix-tiny.json").write_text(json.dumps(json.load(f)["model_cfg"]))
    args = list(trained["args"])
    args[args.index("--model") + 1] = "m2mix-tiny"
    env = dict(trained["env"], PYTHONPATH=str(site))
    run([sys.executable, "-m", f"{package}.main", *args, "--epochs", "1", "--name", "patched"], env_extra=env)
    log = read_log(trained["logs"], "patched")
    assert "M2mix_loss" in log and "Contrastive_loss" in log
    (row,) = results(trained["logs"], "patched")
    assert GEOMETRY_KEYS <= set(row)
    # m2mix-train finds the patched trainer beside that open_clip and runs it as it is
    launcher(*args, "--epochs", "1", "--name", "patched-launcher", env_extra=env)
    log = read_log(trained["logs"], "patched-launcher")
    assert "M2mix_loss" in log and "Loss: --loss m2mix -> M2MixLoss" not in log  # not the launcher's wrapper
    run([*patch, "-R"])
    assert not (site / package / "plugins.py").exists()
    names = sorted(n for n in os.listdir(installed) if n.endswith(".py"))
    assert sorted(n for n in os.listdir(site / package) if n.endswith(".py")) == names
    match, mismatch, errors = filecmp.cmpfiles(installed, site / package, names, shallow=False)
    assert not mismatch and not errors


def test_a_random_coca_gets_its_text_decoder_initialised():
    """OpenCLIP builds CoCa's text-decoder projection with torch.empty and never initialises it:
    with memory that held huge values, the created model holds them. initialise_text_decoders
    draws it as the decoder's own init_parameters does (std width ** -0.5)."""
    import open_clip
    from test_loss_families_e2e import COCA_MODEL

    from m2mix_openclip.integration import openclip_compat
    config = {key: value for key, value in COCA_MODEL["model_cfg"].items() if key != "custom_text"}
    for _ in range(4):
        junk = [torch.full((1 << 16,), 1e30) for _ in range(64)]  # freed memory full of 1e30
        del junk
        model = open_clip.coca_model.CoCa(**config)
        assert openclip_compat.initialise_text_decoders(model) == 1
        width = config["multimodal_cfg"]["width"]
        projection = model.text_decoder.text_projection.detach()
        assert torch.isfinite(projection).all() and projection.std().item() == pytest.approx(width ** -0.5, rel=0.2)
