"""Zero-shot robustness on the user's own sets at every evaluation, through OpenCLIP's trainer."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from trainer_utils import common_args, csv_args, launcher, results, write_tiny_model

from m2mix_openclip.data import CLASS_NAMES, write_dataset
from m2mix_openclip.datasets import load_labelled_set

pytestmark = pytest.mark.slow
TEMPLATES = ["a handwritten digit {c}", "the number {c}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("zeroshot")
    data = write_dataset(str(base / "data"), splits=("pretrain", "test"), limit=32, shard_size=16,
                         shifts=("rotate",))
    names = base / "names.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    return {"data": data, "model": write_tiny_model(str(base / "model")), "logs": base / "logs",
            "names": str(names)}


def independent_top1(model_name, checkpoint, data_csv):
    """Zero-shot top-1 written plainly: one image and one prompt at a time."""
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    labelled = load_labelled_set("x", data_csv, len(CLASS_NAMES))
    with torch.no_grad():
        classifier = torch.stack([
            F.normalize(torch.stack([F.normalize(model.encode_text(tokenizer([t.replace("{c}", c)])), dim=-1)[0]
                                     for t in TEMPLATES]).mean(0), dim=0)
            for c in CLASS_NAMES])
        hits = 0
        for path, label in zip(labelled.images, labelled.labels.tolist()):
            x = F.normalize(model.encode_image(preprocess(Image.open(path).convert("RGB"))[None]), dim=-1)[0]
            hits += int(int((classifier @ x).argmax()) == label)
    return hits / len(labelled.images)


def test_two_sets_tracked_at_every_evaluation(env, tmp_path):
    d = env["data"]
    # an evaluation hook from a second installed distribution: a plain function is enough
    site = tmp_path / "site"
    (site / "scale_hook-0.1.dist-info").mkdir(parents=True)
    (site / "scale_hook-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: scale-hook\nVersion: 0.1\n")
    (site / "scale_hook-0.1.dist-info" / "entry_points.txt").write_text(
        "[open_clip.eval_hooks]\nscale = scale_hook:hook\n")
    (site / "scale_hook.py").write_text(
        "def hook(model, tokenizer, preprocess, epoch, args):\n"
        "    model = getattr(model, 'module', model)\n"
        "    return {'hook-logit-scale': float(model.logit_scale.exp()), 'hook-epoch': float(epoch)}\n")
    launcher(*common_args(env["model"], env["logs"], "zs", epochs=2), *csv_args(d), "--loss", "m2mix",
             "--zeroshot-data", f"clean={d['test']['csv']}", "--zeroshot-data", f"rot={d['test-rotate']['shards']}",
             "--zeroshot-classnames", env["names"], "--zeroshot-templates", ";".join(TEMPLATES),
             env_extra={"PYTHONPATH": str(site)})
    rows = results(env["logs"], "zs")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["hook-epoch"] for r in rows] == [1.0, 2.0] and all(r["hook-logit-scale"] > 1 for r in rows)
    for row in rows:
        for key in ("clean-zeroshot-top1", "clean-zeroshot-top5", "clean-zeroshot-ece",
                    "rot-zeroshot-top1", "rot-zeroshot-top5", "rot-zeroshot-ece"):
            assert 0.0 <= row[key] <= 1.0, key
    checkpoint = env["logs"] / "zs" / "checkpoints" / "epoch_2.pt"
    expected = independent_top1(env["model"], checkpoint, d["test"]["csv"])
    assert rows[-1]["clean-zeroshot-top1"] == pytest.approx(expected, abs=1e-6)


def test_a_set_with_labels_beyond_the_class_list_stops_before_training(env):
    d = env["data"]
    proc = launcher(*common_args(env["model"], env["logs"], "zs-bad", epochs=1), *csv_args(d),
                    "--zeroshot-data", f"rot={d['test-rotate']['csv']}", "--zeroshot-classnames", "zero,one",
                    check=False)
    assert proc.returncode == 2
    assert "zero-shot set 'rot'" in proc.stderr and "class list has 2 names" in proc.stderr
    assert "Start epoch" not in proc.stdout + proc.stderr
