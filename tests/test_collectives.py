"""One gather per step: ``--loss m2mix`` makes the collectives ``--loss clip`` makes, for every loss
family, through OpenCLIP's real trainer on 2 gloo processes (tiny models, CPU)."""

import json
import os
import socket
import sys

import pytest
import torch
from test_loss_families_e2e import COCA_MODEL, SIGLIP_MODEL
from trainer_utils import common_args, read_log, run, write_model_with_weights

from m2mix_openclip.data import write_dataset
from m2mix_openclip.demo import write_local_model

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD, BATCH, STEPS = 2, 8, 2
FAMILIES = {"clip": "M2MixLoss", "siglip": "M2MixSigLipLoss", "coca": "M2MixCoCaLoss", "distill": "M2MixDistillLoss"}


def free_ports(count):
    """``count`` distinct ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("collectives")
    data = write_dataset(str(base / "data"), splits=("pretrain",), limit=WORLD * BATCH * STEPS, shifts=())
    teacher_dir = base / "teacher"
    teacher = write_local_model(str(teacher_dir))
    import open_clip
    torch.save(open_clip.create_model(teacher).state_dict(), teacher_dir / "open_clip_pytorch_model.bin")
    models = {"clip": write_local_model(str(base / "clip")), "distill": write_local_model(str(base / "student")),
              "siglip": write_local_model(str(base / "siglip"), SIGLIP_MODEL),
              "coca": write_model_with_weights(str(base / "tiny-coca"), COCA_MODEL)}
    extra = {"clip": [], "coca": [], "siglip": ["--siglip"],
             "distill": ["--distill-model", teacher, "--distill-pretrained", "none"]}
    return {"base": base, "csv": data["pretrain"]["csv"], "models": models, "extra": extra}


@pytest.fixture(scope="module")
def counted(env):
    """{(family, loss): (per rank, the collectives of each optimizer step, the run's log)}: the eight
    runs one after the other in one pair of processes (a process start costs more than a run)."""
    runs = []
    ports = free_ports(2 * len(FAMILIES) + 1)
    for family in FAMILIES:
        for loss in ("clip", "m2mix"):
            args = common_args(env["models"][family], env["base"] / "logs", f"{family}-{loss}", epochs=1, batch=BATCH)
            runs.append([f"{family}-{loss}", ports[len(runs) + 1], args + [
                "--train-data", env["csv"], "--csv-img-key", "filepath", "--csv-caption-key", "title",
                "--local-loss", "--gather-with-grad", "--loss", loss, *env["extra"][family]]])
    spec = env["base"] / "runs.json"
    spec.write_text(json.dumps(runs))
    out = env["base"] / "counts"
    out.mkdir()
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
         "--master_port", str(ports[0]), os.path.join(HERE, "collectives.py"), str(out), str(spec)])
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    counts = {}
    for name, _, _ in runs:
        assert [r[name]["status"] for r in per_rank] == [0] * WORLD, name
        family, loss = name.split("-")
        counts[family, loss] = ([r[name]["steps"] for r in per_rank], read_log(env["base"] / "logs", name))
    return counts


# What OpenCLIP's own loss exchanges in one step on 2 processes with --local-loss --gather-with-grad: the
# softmax families gather images and captions (the distillation teacher's too, without gradient), and
# their backward pass returns the gradients (gloo: one scatter per process and tensor); SigLIP swaps
# caption chunks with its neighbour, forward and backward.
# Beside the loss, at each logging step (every step here, --log-every-n-steps 1), the launcher's
# divergence stop agrees on the losses' finiteness with one all-reduce of two integers, for any loss.
DIVERGENCE_CHECK = {"all_reduce": 1}
OPENCLIP_STEP = {
    "clip": {"all_gather": 2, "scatter": 2 * WORLD, **DIVERGENCE_CHECK},
    "coca": {"all_gather": 2, "scatter": 2 * WORLD, **DIVERGENCE_CHECK},
    "distill": {"all_gather": 4, "scatter": 2 * WORLD, **DIVERGENCE_CHECK},
    "siglip": {"batch_isend_irecv": 2, "isend": 2, "irecv": 2, **DIVERGENCE_CHECK},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_m2mix_makes_the_collectives_of_openclips_loss(counted, family):
    clip_steps, _ = counted[family, "clip"]
    m2mix_steps, log = counted[family, "m2mix"]
    assert f"-> {FAMILIES[family]}" in log and "M2mix_loss" in log
    if family == "siglip":  # --m2mix-weight left out: SigLIP's default for the global batch of 2 x 8
        assert ("--loss m2mix: --m2mix-weight 0.3 (the --siglip default 0.02 x (G - 1) for the global batch G = 16: "
                "--batch-size 8 x 2 processes x --accum-freq 1)") in log
    else:
        assert "--loss m2mix: --m2mix-weight 0.02 (the default)" in log
    for rank in range(WORLD):
        assert len(clip_steps[rank]) == len(m2mix_steps[rank]) == STEPS + 1
        assert clip_steps[rank][1] == OPENCLIP_STEP[family], "the counter sees OpenCLIP's loss"
        first_clip, first_m2mix = dict(clip_steps[rank][0]), dict(m2mix_steps[rank][0])
        if family == "siglip":
            # SigLIP never gathers: the first call's unit-norm check agrees across processes with
            # one all-reduce of a flag, once per run
            first_clip["all_reduce"] = first_clip.get("all_reduce", 0) + 1
        assert first_m2mix == first_clip, rank
        assert m2mix_steps[rank][1:] == clip_steps[rank][1:], rank
