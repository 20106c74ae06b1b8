"""``--loss m2mix`` for SigLIP, CoCa and distillation, through OpenCLIP's real trainer (tiny, CPU)."""

import copy
import os

import pytest
from trainer_utils import common_args, launcher, logged_lambdas, logged_losses, read_log, write_model_with_weights

from m2mix_openclip.data import write_dataset
from m2mix_openclip.demo import TINY_MODEL, write_local_model

pytestmark = pytest.mark.slow

SIGLIP_MODEL = copy.deepcopy(TINY_MODEL)
SIGLIP_MODEL["model_cfg"]["init_logit_bias"] = -10

COCA_MODEL = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                       "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    },
    "preprocess_cfg": {},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    data = write_dataset(str(base / "data"), splits=("pretrain",), limit=48, shard_size=24, shifts=())
    return {"base": base, "logs": base / "logs", "csv": data["pretrain"]["csv"]}


def train(env, name, model, *extra):
    args = common_args(model, env["logs"], name, epochs=1)
    launcher(*args, "--train-data", env["csv"], "--csv-img-key", "filepath", "--csv-caption-key", "title",
             "--loss", "m2mix", *extra)
    log = read_log(env["logs"], name)
    assert "Loss: --loss m2mix" in log
    assert len(logged_lambdas(log)) == 3  # 48 samples / batch 16, logged at every step
    return log


def test_siglip(env):
    model = write_local_model(str(env["base"] / "siglip"), SIGLIP_MODEL)
    log = train(env, "siglip", model, "--siglip", "--m2mix-weight", "5", "--m2mix-temperature", "learned")
    assert "-> M2MixSigLipLoss" in log
    siglip, m2mix = logged_losses(log), logged_losses(log, "M2mix_loss")
    assert len(siglip) == len(m2mix) == 3
    # SigLIP's first value at logit bias -10 and scale 10: about softplus(10 - 10 cos) per positive pair
    assert 5 < siglip[0] < 15 and siglip[-1] < siglip[0], siglip
    # the mean loss of one (anchor, mix) pair, times the weight 5 (lambda changes every step)
    assert all(0 < v < 5 * siglip[0] for v in m2mix), m2mix
    totals = logged_losses(log, "Loss")
    assert totals[0] == pytest.approx(siglip[0] + m2mix[0], abs=2e-3)


def test_coca(env):
    model = write_model_with_weights(str(env["base"] / "tiny-coca"), COCA_MODEL)
    log = train(env, "coca", model, "--vmix-weight", "0.1", "--coca-caption-loss-weight", "2")
    assert "-> M2MixCoCaLoss" in log
    for key in ("Contrastive_loss", "Caption_loss", "M2mix_loss", "Vmix_loss"):
        values = logged_losses(log, key)
        assert len(values) == 3 and all(v > 0 for v in values), (key, values)


def test_distillation(env):
    import open_clip
    import torch

    teacher_dir = env["base"] / "teacher"
    teacher = write_local_model(str(teacher_dir))
    torch.save(open_clip.create_model(teacher).state_dict(), teacher_dir / "open_clip_pytorch_model.bin")
    student = write_local_model(str(env["base"] / "student"))
    log = train(env, "distill", student, "--distill-model", teacher, "--distill-pretrained", "none")
    assert "-> M2MixDistillLoss" in log
    for key in ("Contrastive_loss", "Distill_loss", "M2mix_loss"):
        values = logged_losses(log, key)
        assert len(values) == 3 and all(v > 0 for v in values), (key, values)
    assert os.path.exists(env["logs"] / "distill" / "checkpoints")
