"""The classification workflow end to end on the bundled digits: labelled images to class-prompt
pairs, fine-tuning with both losses through OpenCLIP's trainer (a shifted ImageFolder set of some
classes tracked by --zeroshot-data), then m2mix-wiseft; endpoints against an independent computation."""

import json
import os
import sys

import open_clip
import pytest
import torch
from test_wiseft import SUBSET, independent_scores, state
from trainer_utils import common_args, launcher, read_log, results, run, write_tiny_model

from m2mix_openclip.data import CLASS_NAMES, write_dataset
from m2mix_openclip.datasets import load_labelled_set
from m2mix_openclip.integration.openclip_compat import model_name as openclip_name

pytestmark = pytest.mark.slow
TEMPLATES = "a handwritten digit {c};the number {c}"
EPOCHS = 1


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("classification")
    data = write_dataset(str(base / "digits"), splits=("test",), limit=40, shifts=("rotate", "blur"))
    data.update(write_dataset(str(base / "digits"), splits=("finetune",), shifts=()))  # every class has 4 images
    model = write_tiny_model(str(base / "model"))
    torch.manual_seed(0)  # the "zero-shot" model: fixed weights that both fine-tunes start from
    torch.save(open_clip.create_model_and_transforms(openclip_name(model))[0].state_dict(), base / "zeroshot.pt")
    # the rotated test images of three classes as an ImageFolder tree, folders named by class index
    rotated = load_labelled_set("r", data["test-rotate"]["csv"], 10)
    for path, label in zip(rotated.images, rotated.labels.tolist()):
        if label in SUBSET:
            os.makedirs(base / "rotated" / str(label), exist_ok=True)
            os.link(path, base / "rotated" / str(label) / os.path.basename(path))
    names = str(base / "digits" / "classnames.txt")
    convert = run([sys.executable, "-m", "m2mix_openclip.data", "--from", data["finetune"]["csv"], "--classnames",
                   names, "--templates", TEMPLATES, "--shots", "4", "--seed", "0", "--out", str(base / "pairs")])
    checkpoints = {}
    for loss in ("clip", "m2mix"):
        launcher(*common_args(model, base / "logs", loss, epochs=EPOCHS, batch=8),
                 "--resume", str(base / "zeroshot.pt"), "--train-data", str(base / "pairs" / "train.csv"),
                 "--val-data", data["test"]["csv"],
                 "--csv-img-key", "filepath", "--csv-caption-key", "title", "--loss", loss,
                 *(["--m2mix-weight", "0.1"] if loss == "m2mix" else []),
                 "--zeroshot-data", f"clean={data['test']['csv']}", "--zeroshot-data", f"rot3={base / 'rotated'}",
                 "--zeroshot-classnames", names, "--zeroshot-templates", TEMPLATES)
        checkpoints[loss] = str(base / "logs" / loss / "checkpoints" / f"epoch_{EPOCHS}.pt")
    wiseft = run([sys.executable, "-m", "m2mix_openclip.wiseft", "--model", model, "--checkpoint",
                  str(base / "zeroshot.pt"), "--finetuned", checkpoints["clip"], checkpoints["m2mix"],
                  "--labels", "clip", "m2mix", "--id", f"clean={data['test']['csv']}", "--ood",
                  f"rot3={base / 'rotated'}", "--ood", f"blur={data['test-blur']['csv']}", "--classnames", names,
                  "--templates", TEMPLATES, "--alphas", "0", "0.5", "1", "--device", "cpu",
                  "--out", str(base / "wiseft")])
    return {"base": base, "data": data, "model": model, "checkpoints": checkpoints, "convert": convert,
            "wiseft": wiseft, "records": json.loads((base / "wiseft" / "wiseft.json").read_text())}


def test_pairs_train_both_losses_and_the_hook_reads_the_tree(workflow):
    base = workflow["base"]
    assert "10 classes, 40 images (4 per class, seed 0), 40 training rows" in workflow["convert"].stdout
    assert "M2mix_loss" in read_log(base / "logs", "m2mix") and "M2mix_loss" not in read_log(base / "logs", "clip")
    rotated = sorted((int(c), os.path.join(base, "rotated", c, f)) for c in os.listdir(base / "rotated")
                     for f in os.listdir(base / "rotated" / c))
    images, labels = [p for _, p in rotated], [SUBSET.index(c) for c, _ in rotated]
    for loss in ("clip", "m2mix"):
        rows = results(base / "logs", loss)
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
        # the hook scores the tree over its three classes, as an independent computation does
        expected = independent_scores(workflow["model"], state(workflow["checkpoints"][loss]), images, labels, SUBSET)
        assert rows[-1]["rot3-zeroshot-top1"] == pytest.approx(expected["top1"], abs=1e-6)
        assert "rot3-zeroshot-top5" not in rows[-1]  # three classes


def test_wiseft_records_endpoints_and_figure(workflow):
    records, base = workflow["records"], workflow["base"]
    assert all(set(r) == {"model", "alpha", "set", "split", "top1", "top5", "ece"} for r in records)
    assert len(records) == 2 * 3 * 3  # models, alphas, sets
    assert {(r["set"], r["split"]) for r in records} == {("clean", "id"), ("rot3", "ood"), ("blur", "ood")}
    clean = load_labelled_set("clean", workflow["data"]["test"]["csv"], 10)
    for model, alpha in (("clip", 0.0), ("clip", 1.0), ("m2mix", 1.0)):
        weights = state(workflow["checkpoints"][model]) if alpha == 1 else torch.load(
            base / "zeroshot.pt", weights_only=True)
        expected = independent_scores(workflow["model"], weights, clean.images, clean.labels.tolist())
        got = next(r for r in records if (r["model"], r["alpha"], r["set"]) == (model, alpha, "clean"))
        assert got["top1"] == pytest.approx(expected["top1"], abs=1e-6)
        assert got["top5"] == pytest.approx(expected["top5"], abs=1e-6)
        assert got["ece"] == pytest.approx(expected["ece"], abs=1e-5)
    assert os.path.getsize(base / "wiseft" / "wiseft.png") > 10000
    out = workflow["wiseft"].stdout
    assert "best alpha by in-distribution top-1: clip alpha" in out and "best alpha by shifted top-1: " in out
    assert CLASS_NAMES  # the class names the sets were scored against
