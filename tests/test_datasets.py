"""The one data reader: the image-path rule and its error in the pre-flight check, evaluation, the
zero-shot sets and training; the one tar reader, grouping members as webdataset does for OpenCLIP."""

import argparse
import ast
import io
import os
import tarfile

import pytest
from PIL import Image

import m2mix_openclip
from m2mix_openclip.datasets import (
    load_labelled_set,
    load_pairs,
    read_csv_rows,
    read_shard_samples,
)
from m2mix_openclip.integration import zeroshot_hook
from m2mix_openclip.integration.preflight import MissingImageError, PreflightError, check_args
from m2mix_openclip.integration.sample_errors import report_bad_samples


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def preflight_args(train_data):
    return argparse.Namespace(train_data=train_data, val_data=None, dataset_type="auto", csv_separator="\t",
                              csv_img_key="filepath", csv_caption_key="title", batch_size=8, loss="clip")


def hook_args(path):
    return argparse.Namespace(zeroshot_data=[("z", path)], zeroshot_classnames="a,b", zeroshot_templates="a {c}",
                              zeroshot_label_key="label", csv_img_key="filepath", csv_separator="\t",
                              val_data="val.csv", imagenet_val=None, imagenet_v2=None)


class RowDataset:
    """Stands in for OpenCLIP's CsvDataset: opens the CSV's image paths as written."""
    def __init__(self, input_filename, images):
        self.images = images

    def __getitem__(self, idx):
        return Image.open(str(self.images[idx]))


def every_reader(csv):
    """The message of each reader's error for ``csv`` (None where it reads it), and what it resolved."""
    errors, resolved = {}, {}
    try:
        check_args(preflight_args(csv))
        errors["preflight"] = None
    except PreflightError as e:
        errors["preflight"] = str(e).removeprefix("--train-data ")
    try:
        resolved["evaluation"] = load_pairs(csv)[0]["image"]
        errors["evaluation"] = None
    except MissingImageError as e:
        errors["evaluation"] = str(e)
    try:
        resolved["zero-shot"] = load_labelled_set("z", csv, 2).images[0]
        errors["zero-shot"] = None
    except ValueError as e:
        errors["zero-shot"] = str(e).removeprefix("zero-shot set 'z': ")
    hook = zeroshot_hook.validate(hook_args(csv))
    errors["zero-shot hook"] = hook and hook.removeprefix("--zeroshot-data: zero-shot set 'z': ")
    with report_bad_samples(RowDataset):
        try:
            RowDataset(csv, [line.split("\t")[0] for line in open(csv).read().splitlines()[1:]])[0]
            errors["training"] = None
        except MissingImageError as e:
            errors["training"] = str(e)
    return errors, resolved


def test_relative_image_paths_resolve_one_way_with_one_error_everywhere(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(png_bytes(10))
    csv = str(data / "set.csv")
    with open(csv, "w") as f:
        f.write("filepath\ttitle\tlabel\nimg/a.png\ta grey square\t1\n")

    # from the folder above, img/a.png exists only beside the CSV: every reader refuses it alike
    monkeypatch.chdir(tmp_path)
    errors, _ = every_reader(csv)
    message = errors["evaluation"]
    assert message.startswith(f"{csv} line 2: image 'img/a.png' not found (relative paths are read from the "
                              f"current directory, {tmp_path}, as OpenCLIP's trainer reads them")
    assert f"it exists beside the CSV, in {data}: run from that folder or write absolute paths" in message
    assert errors == dict.fromkeys(errors, message), errors

    # from the CSV's folder every reader takes it, as the path is written (OpenCLIP opens it so)
    monkeypatch.chdir(data)
    errors, resolved = every_reader(csv)
    assert errors == dict.fromkeys(errors), errors
    assert resolved == {"evaluation": "img/a.png", "zero-shot": "img/a.png"}

    # nowhere at all: the same error, without the hint
    os.remove(data / "img" / "a.png")
    errors, _ = every_reader(csv)
    assert errors["evaluation"] == (f"{csv} line 2: image 'img/a.png' not found (relative paths are read from the "
                                    f"current directory, {data}, as OpenCLIP's trainer reads them)")
    assert errors == dict.fromkeys(errors, errors["evaluation"]), errors


def test_csv_problems_read_alike(tmp_path):
    comma = tmp_path / "comma.csv"
    comma.write_text("filepath,title,label\nx.png,a caption,1\n")
    expected = (f"{comma}: no column 'filepath' with separator '\\t' (columns found: ['filepath,title,label']); "
                "the file looks ','-separated: pass --csv-separator ','; or set --csv-img-key / ")
    with pytest.raises(PreflightError) as preflight:
        check_args(preflight_args(str(comma)))
    with pytest.raises(ValueError) as evaluation:
        load_pairs(str(comma))
    with pytest.raises(ValueError) as zero_shot:
        load_labelled_set("z", str(comma), 2)
    assert str(preflight.value) == f"--train-data {expected}--csv-caption-key"
    assert str(evaluation.value) == f"{expected}--csv-caption-key"
    assert str(zero_shot.value) == f"zero-shot set 'z': {expected}--zeroshot-label-key"

    header_only = tmp_path / "empty.csv"
    header_only.write_text("filepath\ttitle\tlabel\n")
    for read in (lambda p: load_pairs(p), lambda p: load_labelled_set("z", p, 2),
                 lambda p: check_args(preflight_args(p))):
        with pytest.raises(ValueError, match=r"empty\.csv: the CSV holds a header and no rows$"):
            read(str(header_only))

    short = tmp_path / "short.csv"
    short.write_text(f"filepath\ttitle\tlabel\n{tmp_path}/x.png\n")
    with pytest.raises(ValueError, match=r"short\.csv line 2: no value for column 'title'"):
        read_csv_rows(str(short), {"filepath": "--csv-img-key", "title": "--csv-caption-key"})
    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text("filepath\ttitle\tlabel\n" + f"{tmp_path / 'a.png'}\tcap\tseven\n")
    (tmp_path / "a.png").write_bytes(png_bytes(3))
    with pytest.raises(ValueError, match=r"bad_label\.csv line 2: label 'seven' is not an integer"):
        load_pairs(str(bad_label))


def write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    jpg, png = png_bytes(1), png_bytes(2)  # the bytes' format does not matter to the reader
    write_shard(tmp_path / "s-0.tar", [
        ("a/0001.JPG", jpg), ("a/0001.seg.png", png), ("a/0001.txt", b"one caption"), ("a/0001.cls", b"1"),
        ("x.y/0002.png", png), ("x.y/0002.txt", b"two"), ("x.y/0002.cls", b" 0\n"), ("notes", b"no extension"),
        ("0003.txt", b"a caption without an image")])
    write_shard(tmp_path / "t-0.tar", [("0004.webp", png_bytes(4)), ("0004.png", png_bytes(5)),
                                       ("0004.txt", b"four"), ("0004.cls", b"1")])
    return tmp_path, jpg


def test_shard_members_group_as_webdataset_groups_them_for_openclip(shards):
    import webdataset as wds
    folder, _ = shards
    spec = f"{folder}/s-{{0..0}}.tar::{folder}/t-*.tar"
    ours = read_shard_samples(spec, {"jpg", "png", "seg.png", "txt", "cls", "webp"})
    theirs = {}
    for url in (f"{folder}/s-0.tar", f"{folder}/t-0.tar"):
        for sample in wds.WebDataset(url, shardshuffle=False):
            theirs[f"{sample['__url__']}:{sample['__key__']}"] = {k: v for k, v in sample.items()
                                                                 if not k.startswith("__")}
    assert ours == theirs
    assert list(ours) == [f"{folder}/s-0.tar:a/0001", f"{folder}/s-0.tar:x.y/0002", f"{folder}/s-0.tar:0003",
                          f"{folder}/t-0.tar:0004"]


def test_pairs_and_labelled_sets_read_the_same_shard_samples(shards):
    folder, jpg = shards
    spec = f"{folder}/s-0.tar::{folder}/t-0.tar"
    pairs = load_pairs(spec)  # 0003 has no image: left out, as OpenCLIP's trainer leaves it out
    assert [p["caption"] for p in pairs] == ["one caption", "two", "four"]
    assert pairs[0]["image"] == jpg  # jpg before png, as OpenCLIP's image="jpg;png;jpeg;webp"
    assert pairs[2]["image"] == png_bytes(5)
    write_shard(folder / "u-0.tar", [("0005.cls", b"1")])
    with pytest.raises(ValueError, match=r"'z'.*u-0\.tar:0005 lacks an image .* or a \.cls label"):
        load_labelled_set("z", str(folder / "u-0.tar"), 2)
    os.remove(folder / "s-0.tar")
    write_shard(folder / "s-0.tar", [("a/0001.jpg", jpg), ("a/0001.cls", b"1"), ("x.y/0002.png", jpg),
                                     ("x.y/0002.cls", b"0")])
    labelled = load_labelled_set("z", spec, 2)
    assert labelled.labels.tolist() == [1, 0, 1] and labelled.images[2] == png_bytes(5)
    with pytest.raises(ValueError, match=r"'z'.*labels range over 0\.\.1, but the class list has 1 names"):
        load_labelled_set("z", spec, 1)
    (folder / "broken.tar").write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match=r"broken\.tar is not a readable tar shard"):
        load_pairs(str(folder / "broken.tar"))
    with pytest.raises(FileNotFoundError, match=r"none-\{0\.\.3\}\.tar: no file matches it"):
        load_pairs(str(folder / "none-{0..3}.tar"))


def test_one_tar_reader_in_the_package():
    """Only datasets.read_shard_samples opens tar files to read them (m2mix-data writes its own)."""
    root = os.path.dirname(os.path.abspath(m2mix_openclip.__file__))
    readers = []
    for folder, _, files in os.walk(root):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            tree = ast.parse(open(path).read())
            for function in ast.walk(tree):
                if not isinstance(function, ast.FunctionDef):
                    continue
                for call in ast.walk(function):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr == "open" and getattr(call.func.value, "id", None) == "tarfile"):
                        given = call.args[1] if len(call.args) > 1 else next(
                            (k.value for k in call.keywords if k.arg == "mode"), None)
                        mode = given.value if isinstance(given, ast.Constant) else "r"
                        if not mode.startswith("w"):
                            readers.append(f"{os.path.relpath(path, root)}:{function.name}")
    assert readers == ["datasets.py:iter_shard_members"]


def test_labels_of_csv_pairs_are_integers_or_none(tmp_path):
    image = str(tmp_path / "a.png")
    (tmp_path / "a.png").write_bytes(png_bytes(7))
    csv = tmp_path / "p.csv"
    csv.write_text(f"filepath\ttitle\tlabel\n{image}\tone\t3\n{image}\ttwo\t\n")
    assert [(p["caption"], p["label"], p["image_id"]) for p in load_pairs(str(csv))] == [
        ("one", 3, image), ("two", None, image)]
    assert [p["caption"] for p in load_pairs(str(csv), limit=1)] == ["one"]
