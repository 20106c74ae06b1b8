"""The data command, the demo end to end (fast mode), the analyzer, and the figures."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from m2mix_openclip.data import CLASS_NAMES, load_digits_arrays, split_indices
from m2mix_openclip.datasets import load_pairs
from m2mix_openclip.models import load_model

pytestmark = pytest.mark.slow


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 5000
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas


def test_data_command_splits_are_deterministic_disjoint_and_complete(tmp_path):
    _, labels = load_digits_arrays()
    a, b = split_indices(labels), split_indices(labels)
    assert all((a[s] == b[s]).all() for s in a)
    all_idx = torch.tensor(sorted(sum((v.tolist() for v in a.values()), [])))
    assert torch.equal(all_idx, torch.arange(len(labels)))  # disjoint and complete
    out = subprocess.run([sys.executable, "-m", "m2mix_openclip.data", "--out", str(tmp_path), "--limit", "20",
                          "--shard-size", "8"], capture_output=True, text=True, check=True).stdout
    assert "finetune" in out and "test-rotate" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["test"]["num_shards"] == 3 and "{000000..000002}" in manifest["test"]["shards"]
    csv_pairs, shard_pairs = load_pairs(manifest["test"]["csv"]), load_pairs(manifest["test"]["shards"])
    assert len(csv_pairs) == len(shard_pairs) == 20
    assert sorted(p["caption"] for p in csv_pairs) == sorted(p["caption"] for p in shard_pairs)
    assert len({p["caption"] for p in csv_pairs}) > 10  # captions differ
    assert all(CLASS_NAMES[p["label"]] in p["caption"] or str(p["label"]) in p["caption"] for p in csv_pairs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    outs = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "m2mix_openclip.demo", "--out", str(base / name), "--fast"],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append((base / name, proc.stdout, proc.stderr))
    return outs


def test_demo_writes_every_output_and_is_reproducible(demo):
    (out, stdout, stderr), (out_b, _, _) = demo
    result = json.loads((out / "results.json").read_text())
    assert list(result["models"]) == ["pretrained", "finetuned clip", "finetuned m2mix"]
    for row in result["models"].values():
        for key in ("image_to_text_R@1", "text_to_image_R@10", "image_to_text_label_precision@1",
                    "zero_shot_accuracy", "zero_shot_accuracy_rotate", "zero_shot_accuracy_blur",
                    "zero_shot_accuracy_noise", "zero_shot_ece", "alignment", "uniformity_joint", "modality_gap"):
            assert key in row and row[key] == row[key]  # present and not NaN
    for path in result["figures"].values():
        assert_png(path)
    assert "modality gap" in stdout and "alignment (lower: better)" in stdout and "finetuned m2mix" in stdout
    assert "--fast: a smoke test" in stdout  # nobody reads its numbers as results
    assert "M2mix_loss" in (out / "training.log").read_text()
    # stderr holds the progress and nothing else, as whole lines (not a terminal: no bars, no escape
    # sequences, no carriage returns), and no log line breaks them
    assert "\x1b" not in stderr and "\r" not in stderr
    lines = stderr.splitlines()
    assert lines and all(re.match(r"^[\w :-]+: \d+/\d+ \w+ \(\d+%\)", line) for line in lines), lines[:5]
    assert "m2mix-demo: 1/5 stages (20%) pre-training (standard CLIP loss)" in lines
    again = json.loads((out_b / "results.json").read_text())
    assert again["models"] == result["models"], "the same command twice must give the same numbers"


def test_demo_refuses_to_overwrite(demo):
    out = demo[0][0]
    proc = subprocess.run([sys.executable, "-m", "m2mix_openclip.demo", "--out", str(out), "--fast"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "already holds a demo run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_analyzer_compares_checkpoints_on_shards(demo, tmp_path):
    out = demo[0][0]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    report_dir = tmp_path / "report"
    proc = subprocess.run([
        sys.executable, "-m", "m2mix_openclip.analyze", "--model", f"local-dir:{out / 'model'}",
        "--checkpoint", str(out / "pretrained.pt"),
        "--compare", str(out / "logs" / "finetune-m2mix" / "checkpoints" / "epoch_2.pt"),
        "--data", manifest["test"]["shards"], "--class-names", ",".join(CLASS_NAMES),
        "--templates", "a handwritten digit {c}", "--out", str(report_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((report_dir / "analysis.json").read_text())
    assert list(report["models"]) == ["pretrained.pt", "epoch_2.pt"]
    row = report["models"]["pretrained.pt"]
    assert {"zero_shot_accuracy", "zero_shot_ece", "image_to_text_ece", "modality_gap", "alignment"} <= set(row)
    for path in report["figures"].values():
        assert_png(path)


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint", "cannot read checkpoint"),
    (None, "checkpoint not found"),
    ("wrong-model", "does not fit model"),
])
def test_analyzer_checkpoint_errors(demo, tmp_path, content, message):
    out = demo[0][0]
    ckpt = tmp_path / "c.pt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    elif content == "wrong-model":
        torch.save({"visual.proj": torch.zeros(3, 3)}, ckpt)
    proc = subprocess.run([sys.executable, "-m", "m2mix_openclip.analyze", "--model", f"local-dir:{out / 'model'}",
                           "--checkpoint", str(ckpt), "--data", str(out / "data" / "test.csv"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


def test_checkpoint_loading_round_trip(demo):
    out = demo[0][0]
    model, _, _ = load_model(f"local-dir:{out / 'model'}", str(out / "pretrained.pt"))
    saved = torch.load(out / "pretrained.pt", weights_only=True)
    assert torch.equal(model.state_dict()["logit_scale"], saved["logit_scale"])
    with pytest.raises(ValueError, match="ignores --pretrained"):
        load_model(f"local-dir:{out / 'model'}", pretrained="openai")


def test_readme_demo_table_uses_the_printed_names(demo):
    """The README's demo table names its rows and columns as m2mix-demo prints them."""
    from m2mix_openclip.report import METRICS
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = readme[readme.index("| metric (test split)"):].split("\n\n")[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    models = list(json.loads((demo[0][0] / "results.json").read_text())["models"])
    assert rows[0][1:] == models
    printed = {m.row_name for m in METRICS}
    assert [r[0] for r in rows[2:] if r[0] not in printed] == []
    assert len(rows) > 8
