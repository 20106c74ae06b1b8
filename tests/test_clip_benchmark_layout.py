"""CLIP_benchmark's webdataset layout, read as it is: m2mix-data writes it, CLIP_benchmark's own reader
reads it the same, and --zeroshot-data and m2mix-analyze take a folder with its class names and
templates (unless flags override), retrieval folders with several captions per image too."""

import argparse
import io
import json
import os
import tarfile

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2mix_openclip.analyze import main as analyze_main
from m2mix_openclip.data import CLASS_NAMES, ZERO_SHOT_TEMPLATES, write_clip_benchmark_layout
from m2mix_openclip.datasets import clip_benchmark_set, load_labelled_set, load_pairs
from m2mix_openclip.demo import write_local_model
from m2mix_openclip.integration import zeroshot_hook


def png_bytes(value):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, value // 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = tmp_path_factory.mktemp("cb")
    return write_clip_benchmark_layout(str(out), splits=("finetune", "test"), limit=30, shard_size=12,
                                       shifts=("rotate",))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    name = write_local_model(str(tmp_path_factory.mktemp("model") / "m"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    return name, model, preprocess, open_clip.get_tokenizer(name)


def test_written_folders_are_read_alike_by_clip_benchmark_and_by_us(folders):
    builder = pytest.importorskip("clip_benchmark.datasets.builder",
                                  reason="clip-benchmark is not installed (pip install --no-deps clip-benchmark)")
    digits = folders["digits"]["root"]
    assert folders["digits"]["splits"] == {"finetune": 30, "test": 30}
    theirs = builder.build_wds_dataset("digits", transform=lambda image: image.tobytes(), split="test",
                                       data_dir=digits)
    ours = clip_benchmark_set(digits, "test")
    assert (theirs.classes, theirs.templates) == (ours.class_names, ours.templates) == (CLASS_NAMES,
                                                                                        ZERO_SHOT_TEMPLATES)
    samples = list(theirs)
    labelled = load_labelled_set("d", digits, 10)
    assert [label for _, label in samples] == labelled.labels.tolist()
    assert [pixels for pixels, _ in samples] == [Image.open(io.BytesIO(b)).convert("RGB").tobytes()
                                                 for b in labelled.images]
    captions = builder.build_wds_dataset("digits_captions", transform=lambda image: image.tobytes(), split="test",
                                         data_dir=folders["digits_captions"]["root"])
    pairs = load_pairs(folders["digits_captions"]["root"])
    assert [c for _, texts in captions for c in texts] == [p["caption"] for p in pairs]
    assert all(p["label"] is None for p in pairs)


def test_the_hook_reads_folders_with_their_own_class_names_and_templates(folders, tiny_model, tmp_path):
    name, model, preprocess, tokenizer = tiny_model
    # a second folder with three classes of its own and one template: each set gets its own classifier
    other = tmp_path / "other"
    (other / "test").mkdir(parents=True)
    write_tar(other / "test" / "0.tar", [(f"{i}.webp", png_bytes(40 * i)) for i in range(6)]
              + [(f"{i}.cls", str(i % 3).encode()) for i in range(6)])
    (other / "test" / "nshards.txt").write_text("1\n")
    (other / "classnames.txt").write_text("red\ngreen\nblue\n")
    (other / "zeroshot_classification_templates.txt").write_text("a {c} square\n")
    args = argparse.Namespace(
        zeroshot_data=[("digits", folders["digits"]["root"]), ("rot", folders["digits_rotate"]["root"]),
                       ("colours", str(other))],
        zeroshot_classnames=None, zeroshot_templates=None, zeroshot_split="test", zeroshot_label_key="label",
        csv_img_key="filepath", csv_separator="\t", val_data="val.csv", imagenet_val=None, imagenet_v2=None,
        device="cpu", precision="fp32", batch_size=7)
    assert zeroshot_hook.validate(args) is None
    out = zeroshot_hook.zeroshot_metrics(model, tokenizer, preprocess, 1, args)
    assert set(out) == ({f"{name}-zeroshot-{score}" for name in ("digits", "rot", "colours")
                         for score in ("top1", "top5", "ece")} - {"colours-zeroshot-top5"})  # 3 classes: no top-5

    def independent_top1(names, templates, labels, images):
        with torch.no_grad():
            classes = F.normalize(torch.stack([F.normalize(model.encode_text(tokenizer(
                [t.replace("{c}", c) for t in templates])), dim=-1).mean(0) for c in names]), dim=-1)
            x = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                                                             for b in images])), dim=-1)
        return (((x @ classes.T).argmax(1) == labels).float().mean().item())

    digits = load_labelled_set("d", folders["digits"]["root"], 10)
    assert out["digits-zeroshot-top1"] == pytest.approx(
        independent_top1(CLASS_NAMES, ZERO_SHOT_TEMPLATES, digits.labels, digits.images), abs=1e-6)
    colours = load_labelled_set("c", str(other), 3)
    assert out["colours-zeroshot-top1"] == pytest.approx(
        independent_top1(["red", "green", "blue"], ["a {c} square"], colours.labels, colours.images), abs=1e-6)

    # flags override the folders' files: then every set is scored with the flags' names and templates
    args.zeroshot_classnames, args.zeroshot_templates = ",".join(f"c{i}" for i in range(10)), "{c}"
    assert zeroshot_hook.validate(args) is None
    overridden = zeroshot_hook.zeroshot_metrics(model, tokenizer, preprocess, 1, args)
    assert overridden["colours-zeroshot-top1"] == pytest.approx(independent_top1(
        [f"c{i}" for i in range(10)], ["{c}"], colours.labels, colours.images), abs=1e-6)


def hook_args(path, **overrides):
    args = argparse.Namespace(zeroshot_data=[("x", path)], zeroshot_classnames=None, zeroshot_templates=None,
                              zeroshot_split="test", zeroshot_label_key="label", csv_img_key="filepath",
                              csv_separator="\t", val_data="val.csv", imagenet_val=None, imagenet_v2=None)
    vars(args).update(overrides)
    return args


def test_folder_problems_are_named_before_training(folders, tmp_path):
    captions = folders["digits_captions"]["root"]
    for names in (None, "a,b"):
        message = zeroshot_hook.validate(hook_args(captions, zeroshot_classnames=names))
        assert message.startswith(f"--zeroshot-data: zero-shot set 'x': {captions} is a retrieval set "
                                  "(dataset_type.txt)") and "m2mix-analyze --data ROOT" in message
    message = zeroshot_hook.validate(hook_args(folders["digits"]["root"], zeroshot_split="validation"))
    assert "no split 'validation'" in message and "splits there: finetune, test" in message
    assert "--zeroshot-split" in message
    assert zeroshot_hook.validate(hook_args(folders["digits"]["root"], zeroshot_split="finetune")) is None
    # a CSV set still needs the flag
    message = zeroshot_hook.validate(hook_args(str(tmp_path / "set.csv")))
    assert "needs --zeroshot-classnames" in message

    broken = tmp_path / "broken"
    (broken / "test").mkdir(parents=True)
    write_tar(broken / "test" / "0.tar", [("0.png", png_bytes(1)), ("0.cls", b"0")])
    (broken / "test" / "nshards.txt").write_text("2\n")
    (broken / "classnames.txt").write_text("a\n")
    assert "counts 2 shards (0.tar to 1.tar), but 1 are missing" in zeroshot_hook.validate(hook_args(str(broken)))
    (broken / "test" / "nshards.txt").unlink()  # without it: every .tar of the split
    assert zeroshot_hook.validate(hook_args(str(broken))) is None
    (broken / "dataset_type.txt").write_text("multilabel\n")
    assert "only classification" in zeroshot_hook.validate(hook_args(str(broken)))
    (broken / "dataset_type.txt").unlink()
    (broken / "zeroshot_classification_templates.txt").write_text("a photo of a {c}\na photo\n")
    assert "['a photo'] lack it" in zeroshot_hook.validate(hook_args(str(broken)))


def test_retrieval_folders_group_the_lines_of_each_txt(tmp_path):
    root = tmp_path / "flickr"
    (root / "test").mkdir(parents=True)
    write_tar(root / "test" / "0.tar", [("a.jpg", png_bytes(10)), ("a.txt", b"one\ntwo\nthree"),
                                        ("b.webp", png_bytes(20)), ("b.png", png_bytes(30)), ("b.txt", b"four\n")])
    write_tar(root / "test" / "1.tar", [("c.png", png_bytes(40)), ("c.txt", b"five\nsix\n")])
    (root / "test" / "nshards.txt").write_text("2")
    (root / "dataset_type.txt").write_text("retrieval\n")
    pairs = load_pairs(str(root))
    assert [p["caption"] for p in pairs] == ["one", "two", "three", "four", "five", "six"]
    assert len({p["image_id"] for p in pairs}) == 3 and pairs[0]["image_id"] == pairs[2]["image_id"]
    assert pairs[3]["image"] == png_bytes(20)  # webp before png, as CLIP_benchmark takes them


def test_the_analyzer_reads_a_folder_with_its_class_names_and_templates(folders, tiny_model, tmp_path, capsys):
    name, model, preprocess, tokenizer = tiny_model
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    root = folders["digits"]["root"]
    assert analyze_main(["--model", name, "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", root,
                         "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert report["data_source"] == {"layout": "clip_benchmark", "task": "classification", "split": "test",
                                     "class_names": "classnames.txt",
                                     "templates": "zeroshot_classification_templates.txt"}
    assert report["class_names"] == CLASS_NAMES and report["templates"] == ZERO_SHOT_TEMPLATES
    assert "class names from classnames.txt, templates from zeroshot_classification_templates.txt" in \
        capsys.readouterr().out
    # the same figure as the hook's, which scores the folder's templates too
    args = hook_args(root)
    assert zeroshot_hook.validate(args) is None
    hook = zeroshot_hook.zeroshot_metrics(model, tokenizer, preprocess, 1, argparse.Namespace(
        **vars(args), device="cpu", precision="fp32", batch_size=16))
    row = report["models"]["ckpt.pt"]
    assert row["zero_shot_accuracy"] == pytest.approx(hook["x-zeroshot-top1"], abs=1e-6)
    # the captions of the samples' .txt members, one per image
    assert report["num_pairs"] == report["num_images"] == 30

    # --templates (a file) and --class-names override the folder's
    (tmp_path / "t.txt").write_text("{c}\n")
    assert analyze_main(["--model", name, "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", root,
                         "--templates", str(tmp_path / "t.txt"), "--class-names", ",".join("abcdefghij"),
                         "--out", str(tmp_path / "r2"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r2" / "analysis.json").read_text())
    assert report["templates"] == ["{c}"] and report["class_names"] == list("abcdefghij")
    assert report["data_source"]["class_names"] == report["data_source"]["templates"] == "flag"

    # a retrieval folder: captions from the .txt members, no zero-shot
    assert analyze_main(["--model", name, "--checkpoint", str(tmp_path / "ckpt.pt"), "--data",
                         folders["digits_captions"]["root"], "--out", str(tmp_path / "r3"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r3" / "analysis.json").read_text())
    assert report["data_source"]["task"] == "retrieval" and "zero_shot_accuracy" not in report["models"]["ckpt.pt"]
    assert analyze_main(["--model", name, "--data", root, "--split", "nope", "--out", str(tmp_path / "r4")]) == 2
    assert "no split 'nope'" in capsys.readouterr().err


def test_a_folder_without_captions_gets_them_from_the_first_template(tmp_path):
    root = tmp_path / "plain"
    (root / "test").mkdir(parents=True)
    write_tar(root / "test" / "0.tar", [("0.png", png_bytes(1)), ("0.cls", b"1"), ("1.png", png_bytes(2)),
                                        ("1.cls", b"0")])
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}\n")
    pairs = load_pairs(str(root))
    assert [(p["caption"], p["label"]) for p in pairs] == [("a photo of a dog.", 1), ("a photo of a cat.", 0)]
    os.remove(root / "classnames.txt")
    with pytest.raises(ValueError, match=r"classnames\.txt is missing \(or give --class-names"):
        load_pairs(str(root))
