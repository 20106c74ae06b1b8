"""m2mix-analyze on a tiny model: multi-caption retrieval against a plain grouped computation,
labels and table order, and the error path (one line, exit 2; the traceback with --debug)."""

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2mix_openclip.analyze import main, short_unique_names
from m2mix_openclip.demo import write_local_model
from m2mix_openclip.report import format_table

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange", "pink", "grey"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model, its checkpoint, and a CSV with five captions per image."""
    base = tmp_path_factory.mktemp("analyze")
    model_name = write_local_model(str(base / "model"))
    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               base / "ckpt.pt")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, colour in enumerate(COLOURS):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = base / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        for j, template in enumerate(["a {} square", "{} noise", "a photo of {}", "something {}", "{} {} {}"]):
            rows.append((str(path), template.format(colour, colour, colour) + f" {j}", i % 3))
    rows = [rows[k] for k in torch.randperm(len(rows), generator=g).tolist()]  # captions of one image apart
    with open(base / "data.csv", "w") as f:
        f.write("filepath\ttitle\tlabel\n" + "".join(f"{p}\t{c}\t{lab}\n" for p, c, lab in rows))
    return base, model_name, rows


def plain_grouped_recall(model, preprocess, tokenizer, rows):
    """Each image embedded once; i2t hit when any of its captions is the top caption,
    t2i hit when the caption's image is the top image."""
    paths = sorted({p for p, _, _ in rows})
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        x = F.normalize(model.encode_image(pixels), dim=-1)
        y = F.normalize(model.encode_text(tokenizer([c for _, c, _ in rows])), dim=-1)
    s = x @ y.T
    i2t = sum(rows[int(s[i].argmax())][0] == paths[i] for i in range(len(paths))) / len(paths)
    t2i = sum(paths[int(s[:, t].argmax())] == rows[t][0] for t in range(len(rows))) / len(rows)
    return i2t, t2i


def test_multi_caption_recall_equals_a_plain_grouped_computation(tiny, tmp_path, capsys):
    base, model_name, rows = tiny
    assert main(["--model", model_name, "--checkpoint", str(base / "ckpt.pt"), "--data", str(base / "data.csv"),
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert report["num_pairs"] == 50 and report["num_images"] == 10
    row = report["models"]["ckpt.pt"]
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    state = torch.load(base / "ckpt.pt", weights_only=True)["state_dict"]
    model.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    model.eval()
    i2t, t2i = plain_grouped_recall(model, preprocess, open_clip.get_tokenizer(model_name), rows)
    assert row["image_to_text_R@1"] == pytest.approx(i2t)
    assert row["text_to_image_R@1"] == pytest.approx(t2i)
    assert row["text_to_image_R@10"] == 1.0  # only 10 images
    out = capsys.readouterr()
    assert "initialized randomly" not in out.out + out.err
    assert "50 captions of 10 images" in out.out


def test_image_id_column_groups_rows(tiny, tmp_path):
    base, model_name, rows = tiny
    # one id for everything: a single image with 50 captions (every R@K is 1)
    with open(tmp_path / "ids.csv", "w") as f:
        f.write("filepath\ttitle\timg\n" + "".join(f"{p}\t{c}\tsame\n" for p, c, _ in rows))
    assert main(["--model", model_name, "--checkpoint", str(base / "ckpt.pt"), "--data", str(tmp_path / "ids.csv"),
                 "--image-id-key", "img", "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert report["num_images"] == 1 and report["models"]["ckpt.pt"]["image_to_text_R@1"] == 1.0


def test_labels_name_the_columns_and_the_table_is_ordered(tiny, tmp_path, capsys):
    base, model_name, _ = tiny
    ckpt = str(base / "ckpt.pt")
    args = ["--model", model_name, "--checkpoint", ckpt, "--compare", ckpt, "--data", str(base / "data.csv"),
            "--out", str(tmp_path), "--device", "cpu", "--limit", "10"]
    assert main(args + ["--labels", "base", "m2mix"]) == 0
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert list(report["models"]) == ["base", "m2mix"]
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert header.split()[-2:] == ["base", "m2mix"]
    positions = [table.index(name) for name in ("image->text R@1 ", "image->text R@5 ", "image->text R@10 ",
                                                "text->image R@1 ", "alignment (lower: better)")]
    assert positions == sorted(positions)
    assert main(args + ["--labels", "only-one"]) == 2
    assert "--labels has 1 name(s) for 2 model(s)" in capsys.readouterr().err


def test_short_unique_names_and_table():
    assert short_unique_names(["a/x/epoch_2.pt", "b/pretrained.pt"]) == ["epoch_2.pt", "pretrained.pt"]
    assert short_unique_names(["l/clip/checkpoints/epoch_10.pt", "l/m2mix/checkpoints/epoch_10.pt"]) == [
        "clip/checkpoints/epoch_10.pt", "m2mix/checkpoints/epoch_10.pt"]
    text = format_table({"a": {"zzz": 1.0, "text_to_image_R@1": 0.5, "image_to_text_R@10": 0.25}})
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["image->text", "text->image", "zzz"]


def test_checkpoint_that_does_not_fit_names_the_keys(tiny, tmp_path, capsys):
    base, model_name, _ = tiny
    state = torch.load(base / "ckpt.pt", weights_only=True)["state_dict"]
    state["module.extra.weight"] = torch.zeros(1)
    state["module.text_projection"] = torch.zeros(3, 3)
    del state["module.logit_scale"]
    torch.save(state, tmp_path / "bad.pt")
    code = main(["--model", model_name, "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(base / "data.csv"),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 missing key(s): logit_scale" in err and "1 unexpected key(s): extra.weight" in err
    assert "text_projection (3, 3) vs model (64, 64)" in err
    assert "Traceback" not in err and "--debug" in err


@pytest.mark.slow  # a fresh process
def test_debug_shows_the_traceback(tiny, tmp_path):
    base, model_name, _ = tiny
    cmd = [sys.executable, "-m", "m2mix_openclip.analyze", "--model", model_name, "--checkpoint",
           str(tmp_path / "missing.pt"), "--data", str(base / "data.csv"), "--out", str(tmp_path / "r")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines()[0] == f"m2mix-analyze: error: checkpoint not found: {tmp_path / 'missing.pt'}"
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_class_names_without_labels_is_an_error_not_an_exit(tiny, tmp_path):
    from argparse import Namespace

    from m2mix_openclip.analyze import analyze, build_parser
    base, model_name, _ = tiny
    with open(tmp_path / "nolabel.csv", "w") as f:
        f.write(f"filepath\ttitle\n{base / 'img0.png'}\ta red square\n")
    args = build_parser().parse_args(["--model", model_name, "--data", str(tmp_path / "nolabel.csv"),
                                      "--class-names", "a,b", "--out", str(tmp_path / "r")])
    assert isinstance(args, Namespace)
    with pytest.raises(ValueError, match="--class-names needs a label"):
        analyze(args)


@pytest.mark.parametrize("tag, hint", [
    ("openai", "(offline? the weights must already be in the Hugging Face / OpenCLIP cache"),
    ("no-such-tag", "(the tags of 'ViT-B-32': openai, "),
])
def test_pretrained_that_cannot_be_had_is_one_clean_error(tmp_path, tag, hint):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")  # the data is read, and checked, before the model
    (tmp_path / "d.csv").write_text(f"filepath\ttitle\n{tmp_path / 'x.png'}\ta cat\n")
    proc = subprocess.run([sys.executable, "-m", "m2mix_openclip.analyze", "--model", "ViT-B-32", "--pretrained",
                           tag, "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 2
    # our error and the --debug hint end the output, and OpenCLIP's own ERROR line is not before them
    *before, first, second = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and not [line for line in before if "Failed to download" in line
                                                   or "Pretrained tag or path" in line]
    assert first.startswith(f"m2mix-analyze: error: cannot load --pretrained '{tag}' for --model 'ViT-B-32': ")
    assert hint in first and second == "(run with --debug for the traceback)"


def test_metrics_figure_prefers_label_level_figures():
    from m2mix_openclip.analyze import figure_keys
    assert figure_keys(True, True)[:3] == ["zero_shot_accuracy", "image_to_text_label_precision@1",
                                           "text_to_image_label_precision@1"]
    assert figure_keys(False, False)[:2] == ["image_to_text_R@1", "text_to_image_R@1"]
