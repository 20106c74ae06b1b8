"""Zero-shot classification of labelled sets: loading and checks, scores, the evaluation hook."""

import argparse
import io
import tarfile

import pytest
import torch
import torch.nn.functional as F

from m2mix_openclip.data import CLASS_NAMES, write_dataset
from m2mix_openclip.datasets import load_labelled_set, parse_class_names, parse_templates
from m2mix_openclip.integration import zeroshot_hook
from m2mix_openclip.metrics import zero_shot_scores


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return write_dataset(str(out), splits=("test",), limit=24, shifts=("rotate",))


def test_scores_against_a_hand_count():
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],
                        [0.2, 0.1, 0.8, 0.0, 0.0, 0.0],
                        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([0, 1, 0])
    scores = zero_shot_scores(sim, labels, logit_scale=10.0)
    assert scores["top1"] == pytest.approx(1 / 3)
    # row 1: label 1 ranks 3rd (0.8, 0.2, 0.1); row 2: label 0 ranks last (6th)
    assert scores["top5"] == pytest.approx(2 / 3)
    conf = (10.0 * sim).softmax(1).max(1).values
    # 15 equal-width bins: rows 0 and 1 share the top bin (right, wrong), row 2 sits alone
    assert conf[0] > 14 / 15 and conf[1] > 14 / 15 and conf[2] < 14 / 15
    expected = (2 / 3) * abs(0.5 - float(conf[:2].mean())) + (1 / 3) * abs(0.0 - float(conf[2]))
    assert scores["ece"] == pytest.approx(expected, abs=1e-6)
    assert "top5" not in zero_shot_scores(sim[:, :4], labels, 10.0)  # fewer than 5 classes


def test_parsing_names_and_templates(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n\ntwo\n")
    assert parse_class_names(str(names)) == ["zero", "one", "two"]
    assert parse_class_names("a, b,c") == ["a", "b", "c"]
    assert parse_templates("a {c};the number {c}") == ["a {c}", "the number {c}"]
    with pytest.raises(ValueError, match=r"\{c\}"):
        parse_templates("a photo of a {name}")


def test_csv_and_shards_load_the_same_labels(digits):
    from_csv = load_labelled_set("clean", digits["test"]["csv"], 10)
    from_shards = load_labelled_set("clean", digits["test"]["shards"], 10)
    assert len(from_csv.images) == 24 and from_csv.labels.tolist() == from_shards.labels.tolist()
    assert isinstance(from_shards.images[0], bytes)


def test_bad_sets_name_the_set_and_the_problem(digits, tmp_path):
    with pytest.raises(ValueError, match=r"'rot'.*labels range over 0\.\.\d.*class list has 3 names"):
        load_labelled_set("rot", digits["test-rotate"]["csv"], 3)
    with pytest.raises(ValueError, match=r"'gone'.*file not found"):
        load_labelled_set("gone", str(tmp_path / "missing.csv"), 10)
    bad = tmp_path / "bad.csv"
    bad.write_text("filepath\tlabel\n/nowhere/x.png\t1\n")
    with pytest.raises(ValueError, match=r"line 2: image '/nowhere/x.png' not found"):
        load_labelled_set("bad", str(bad), 10)
    bad.write_text("path,label\nx.png,1\n")
    with pytest.raises(ValueError, match=r"no column 'filepath'"):
        load_labelled_set("bad", str(bad), 10)
    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match=r"'sh'.*lacks an image .* or a \.cls label"):
        load_labelled_set("sh", str(tmp_path / "s-{000000..000000}.tar"), 10)
    with pytest.raises(ValueError, match=r"'none'.*no file matches"):
        load_labelled_set("none", str(tmp_path / "nothing-{0..3}.tar"), 10)


def _args(digits, names, **overrides):
    args = argparse.Namespace(
        zeroshot_data=[("clean", digits["test"]["csv"]), ("rot", digits["test-rotate"]["shards"])],
        zeroshot_classnames=names, zeroshot_templates="a handwritten digit {c};the number {c}",
        zeroshot_label_key="label", csv_img_key="filepath", csv_separator="\t", val_data="val.csv",
        imagenet_val=None, imagenet_v2=None, device="cpu", precision="fp32", batch_size=7)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_validate_reports_each_problem_before_training(digits):
    names = ",".join(CLASS_NAMES)
    assert zeroshot_hook.validate(_args(digits, names)) is None
    assert "set 'clean'" in zeroshot_hook.validate(_args(digits, "zero,one"))
    assert "--val-data" in zeroshot_hook.validate(_args(digits, names, val_data=None))
    assert "--zeroshot-classnames" in zeroshot_hook.validate(_args(digits, None))
    assert "{c}" in zeroshot_hook.validate(_args(digits, names, zeroshot_templates="a {name}"))
    dup = _args(digits, names, zeroshot_data=[("a", digits["test"]["csv"])] * 2)
    assert "unique" in zeroshot_hook.validate(dup)


def test_flag_parsing():
    parser = argparse.ArgumentParser()
    zeroshot_hook.add_arguments(parser)
    args = parser.parse_args(["--zeroshot-data", "rot=a.csv", "--zeroshot-data", "clean=b.csv"])
    assert args.zeroshot_data == [("rot", "a.csv"), ("clean", "b.csv")]
    with pytest.raises(SystemExit):
        parser.parse_args(["--zeroshot-data", "a.csv"])


def test_hook_equals_an_independent_computation(digits, tmp_path):
    import open_clip
    from PIL import Image

    from m2mix_openclip.demo import write_local_model
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(write_local_model(str(tmp_path / "m")))
    tokenizer = open_clip.get_tokenizer(write_local_model(str(tmp_path / "m")))
    args = _args(digits, ",".join(CLASS_NAMES))
    assert zeroshot_hook.validate(args) is None
    out = zeroshot_hook.zeroshot_metrics(model, tokenizer, preprocess, 1, args)
    assert set(out) == {f"{name}-zeroshot-{score}" for name in ("clean", "rot") for score in ("top1", "top5", "ece")}
    # independent: one image at a time, prompts embedded one by one
    model.eval()
    with torch.no_grad():
        classes = []
        for c in CLASS_NAMES:
            embs = [F.normalize(model.encode_text(tokenizer([t.replace("{c}", c)])), dim=-1)[0]
                    for t in ("a handwritten digit {c}", "the number {c}")]
            classes.append(F.normalize(torch.stack(embs).mean(0), dim=0))
        classifier = torch.stack(classes)
        rows = load_labelled_set("clean", digits["test"]["csv"], 10)
        hits = 0
        for path, label in zip(rows.images, rows.labels.tolist()):
            x = F.normalize(model.encode_image(preprocess(Image.open(path).convert("RGB"))[None]), dim=-1)[0]
            hits += int(int((classifier @ x).argmax()) == label)
    assert out["clean-zeroshot-top1"] == pytest.approx(hits / len(rows.images), abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_m2mix_data_writes_the_class_names(digits):
    import os
    folder = os.path.dirname(digits["test"]["csv"])
    assert parse_class_names(os.path.join(folder, "classnames.txt")) == CLASS_NAMES
