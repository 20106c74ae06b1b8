"""m2mix-data --from: labelled images (ImageFolder tree, CSV with labels, shards with .cls) to
class-prompt training pairs; K-shot draws; every bad input as one line naming the file."""

import csv
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from m2mix_openclip.data import main as data_main
from m2mix_openclip.datasets import load_image_folder, load_labelled_set, load_pairs, parse_class_folders
from m2mix_openclip.labelled_pairs import convert, image_problem

SIZES = {"cat": 7, "dog": 5, "eel": 2}
TEMPLATES = "a photo of a {c}.;a drawing of a {c}.;the {c}"


def png_bytes(seed):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (seed % 256, (7 * seed) % 256, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tree(root, sizes=SIZES):
    """An ImageFolder tree; image bytes differ across the whole tree."""
    n = 0
    for folder, count in sizes.items():
        os.makedirs(root / folder)
        for i in range(count):
            (root / folder / f"{i:03d}.png").write_bytes(png_bytes(n))
            n += 1
    return str(root)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def kept_images(out):
    """class label -> the source images kept (by file name under the class folder)."""
    kept = {}
    for row in rows(os.path.join(out, "labelled.csv")):
        kept.setdefault(int(row["label"]), []).append("/".join(row["filepath"].split("/")[-2:]))
    return kept


def test_kshot_is_exact_deterministic_and_nested(tmp_path, capsys):
    source = make_tree(tmp_path / "tree")
    assert data_main(["--from", source, "--shots", "3", "--seed", "4", "--out", str(tmp_path / "a")]) == 0
    warning = capsys.readouterr().err
    assert "class 'eel' (label 2) has 2 image(s), fewer than --shots 3: all kept" in warning
    a = kept_images(tmp_path / "a")
    assert {label: len(files) for label, files in a.items()} == {0: 3, 1: 3, 2: 2}
    assert all(f.split("/")[0] == name for label, name in enumerate(SIZES) for f in a[label])
    convert(source, str(tmp_path / "b"), shots=3, seed=4)
    assert kept_images(tmp_path / "b") == a  # the same seed, the same K-shot set
    convert(source, str(tmp_path / "c"), shots=2, seed=4)
    c = kept_images(tmp_path / "c")
    assert all(set(c[label]) <= set(a[label]) and len(c[label]) == 2 for label in c)  # K=2 inside K=3
    others = [kept_images(tmp_path / f"s{seed}") for seed in range(5) if convert(source, str(tmp_path / f"s{seed}"),
                                                                                  shots=3, seed=seed)]
    assert len({tuple(sorted(k[0])) for k in others}) > 1  # other seeds draw other images
    summary = json.loads((tmp_path / "a" / "conversion.json").read_text())
    assert summary["images_per_class"] == [3, 3, 2] and summary["short_classes"] == [
        {"label": 2, "class": "eel", "images": 2}]


def test_captions_fill_one_drawn_template_or_every_template(tmp_path):
    source = make_tree(tmp_path / "tree", {"cat": 30, "dog": 30})
    templates = TEMPLATES.split(";")
    one = convert(source, str(tmp_path / "one"), templates=TEMPLATES, seed=1)
    train = rows(tmp_path / "one" / "train.csv")
    assert one["num_rows"] == len(train) == 60 and list(train[0]) == ["filepath", "title", "label"]
    names = list(SIZES)
    for row in train:
        assert row["title"] in [t.replace("{c}", names[int(row["label"])]) for t in templates]
        assert os.path.isabs(row["filepath"]) and os.path.isfile(row["filepath"])
    assert len({r["title"] for r in train}) == 6  # each template drawn for each class
    convert(source, str(tmp_path / "again"), templates=TEMPLATES, seed=1)
    assert rows(tmp_path / "again" / "train.csv") == train
    convert(source, str(tmp_path / "all"), templates=TEMPLATES, all_templates=True)
    every = rows(tmp_path / "all" / "train.csv")
    assert len(every) == 60 * 3
    for image in {r["filepath"] for r in every}:
        titles = [r["title"] for r in every if r["filepath"] == image]
        label = {r["label"] for r in every if r["filepath"] == image}.pop()
        assert titles == [t.replace("{c}", names[int(label)]) for t in templates]
    assert len(rows(tmp_path / "all" / "labelled.csv")) == 60  # one row per image


def test_the_three_forms_give_the_same_pairs(tmp_path):
    source = make_tree(tmp_path / "tree")
    names = list(SIZES)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    # the same labelled images as a CSV (paths, integer labels) and as shards (png + cls)
    labelled = [(os.path.join(source, n, f), label) for label, n in enumerate(names)
                for f in sorted(os.listdir(os.path.join(source, n)))]
    with open(tmp_path / "src.csv", "w") as f:
        f.write("image\tclass\n" + "".join(f"{p}\t{label}\n" for p, label in labelled))
    with tarfile.open(tmp_path / "src.tar", "w") as tar:
        for i, (p, label) in enumerate(labelled):
            for ext, data in (("png", open(p, "rb").read()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args = ["--classnames", str(tmp_path / "names.txt"), "--templates", TEMPLATES, "--shots", "4", "--seed", "2"]
    assert data_main(["--from", source, "--out", str(tmp_path / "t"), "--shards", "--shard-size", "3", *args]) == 0
    assert data_main(["--from", str(tmp_path / "src.csv"), "--csv-img-key", "image", "--csv-label-key", "class",
                      "--out", str(tmp_path / "c"), *args]) == 0
    assert data_main(["--from", str(tmp_path / "src.tar"), "--out", str(tmp_path / "s"), *args]) == 0

    def content(out):
        """(image bytes, caption, label) of every training row."""
        return sorted((open(r["filepath"], "rb").read(), r["title"], r["label"]) for r in rows(out / "train.csv"))

    tree_rows = content(tmp_path / "t")
    assert len(tree_rows) == 4 + 4 + 2
    assert content(tmp_path / "c") == tree_rows and content(tmp_path / "s") == tree_rows
    assert all(r["filepath"].startswith(str(tmp_path / "s" / "images")) for r in rows(tmp_path / "s" / "train.csv"))
    for out in ("t", "c", "s"):
        assert (tmp_path / out / "classnames.txt").read_text() == "cat\ndog\neel\n"
        zero_shot = load_labelled_set("x", str(tmp_path / out / "labelled.csv"), 3)  # what --zeroshot-data reads
        assert sorted(zero_shot.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 2
    # the shards hold the same pairs as the CSV, as the package's reader (and OpenCLIP's) groups them
    shard_pairs = load_pairs(str(tmp_path / "t" / "shards" / "train-{000000..000003}.tar"))
    assert sorted((p["image"], p["caption"], str(p["label"])) for p in shard_pairs) == tree_rows


def test_class_names_of_a_tree_and_its_class_folder_map(tmp_path, capsys):
    source = make_tree(tmp_path / "train", {"n003": 2, "n001": 1, "n002": 1})
    (tmp_path / "train" / "n002" / "labels.txt").write_text("not an image")
    assert data_main(["--from", source, "--out", str(tmp_path / "by-folder")]) == 0
    assert (tmp_path / "by-folder" / "classnames.txt").read_text() == "n001\nn002\nn003\n"
    assert f"1 file(s) in class folders are not images by their suffix and are left out (conversion.json lists " \
           f"them), e.g. {source}/n002/labels.txt" in capsys.readouterr().err
    # as many names as folders: the i-th name for the i-th folder in sorted order (ImageNet's wnids)
    convert(source, str(tmp_path / "sorted"), class_names="tench,goldfish,shark")
    assert {r["title"] for r in rows(tmp_path / "sorted" / "train.csv") if r["filepath"].split("/")[-2] == "n003"} \
        == {"a photo of a shark."}
    mapping = parse_class_folders(str(tmp_path / "sorted" / "class_folders.tsv"), 3)
    assert mapping == {"n001": (0,), "n002": (1,), "n003": (2,)}
    # another tree of some of those classes (ImageNet-R's layout) reads through the map
    subset = make_tree(tmp_path / "shifted", {"n003": 2, "n001": 1})
    labelled = load_image_folder(subset, ["tench", "goldfish", "shark"], mapping)
    assert labelled.class_groups == [(0,), (2,)] and labelled.labels.tolist() == [0, 1, 1]
    # every folder named like a class: by name, whatever the order of the names
    named = make_tree(tmp_path / "named", {"dog": 1, "cat": 1})
    convert(named, str(tmp_path / "by-name"), class_names="eel,dog,cat")
    assert {(r["filepath"].split("/")[-2], r["label"]) for r in rows(tmp_path / "by-name" / "train.csv")} == {
        ("dog", "1"), ("cat", "2")}
    with pytest.raises(ValueError, match="3 class folders but 2 --classnames"):
        convert(source, str(tmp_path / "x"), class_names="a,b")


def broken_images(folder):
    """A truncated PNG and a text file named .png, in a class folder of four images."""
    good = png_bytes(1)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("not an image")
    return [str(folder / "text.png"), str(folder / "truncated.png")]


def test_unreadable_images_are_listed_and_stop_the_run_or_are_left_out(tmp_path, capsys):
    source = make_tree(tmp_path / "tree", {"cat": 4, "dog": 3})
    broken = broken_images(tmp_path / "tree" / "cat")
    assert all(image_problem(p) for p in broken) and image_problem(str(tmp_path / "tree" / "cat" / "000.png")) is None
    assert data_main(["--from", source, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith(f"m2mix-data: error: {source}: 2 image(s) cannot be read: ")
    assert all(p in error for p in broken) and "--skip-unreadable" in error
    assert not os.path.exists(tmp_path / "out") and sorted(os.listdir(tmp_path)) == ["tree"]  # nothing half-written
    assert data_main(["--from", source, "--out", str(tmp_path / "out"), "--shots", "4", "--skip-unreadable"]) == 0
    err = capsys.readouterr().err
    assert all(f"left out (--skip-unreadable): {p}" in err for p in broken)
    kept = kept_images(tmp_path / "out")
    assert len(kept[0]) == 4 and not any("truncated" in f or "text" in f for f in kept[0])  # 4 of the readable 4
    left_out = json.loads((tmp_path / "out" / "conversion.json").read_text())["unreadable_left_out"]
    assert sorted(left_out) == [[p, image_problem(p)] for p in broken]


@pytest.mark.parametrize("case", ["empty folder", "label outside", "template", "no classnames", "shots", "out exists",
                                  "missing image", "bad shard"])
def test_bad_input_is_one_line_naming_the_file(case, tmp_path, capsys):
    source = make_tree(tmp_path / "tree", {"cat": 2, "dog": 2})
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"filepath\tlabel\n{source}/cat/000.png\t0\n{source}/dog/000.png\t5\n")
    args, message = {
        "empty folder": (["--from", source], f"{source}/eel: empty class folder"),
        "label outside": (["--from", str(csv_path), "--classnames", "cat,dog"],
                          f"{csv_path}: labels range over 0..5, but the class list has 2 names"),
        "template": (["--from", source, "--templates", "a {c};a photo"], "every template needs {c}"),
        "no classnames": (["--from", str(csv_path)], f"{csv_path}: the labels of a CSV or of shards are class indices"),
        "shots": (["--from", source, "--shots", "0"], "--shots must be at least 1"),
        "out exists": (["--from", source], "already exists and is not an empty folder"),
        "missing image": (["--from", str(tmp_path / "gone.csv"), "--classnames", "a"], "gone.csv: file not found"),
        "bad shard": (["--from", str(tmp_path / "x.tar"), "--classnames", "a"], "x.tar is not a readable tar shard"),
    }[case]
    if case == "empty folder":
        (tmp_path / "tree" / "eel").mkdir()
    if case == "out exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    if case == "bad shard":
        (tmp_path / "x.tar").write_bytes(b"not a tar")
    assert data_main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("m2mix-data: error: ") and message in err, err
    if case == "out exists":
        assert os.listdir(tmp_path / "out") == ["keep.txt"]
    else:
        assert not os.path.exists(tmp_path / "out")


def test_conversion_flags_need_from(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        data_main(["--out", str(tmp_path / "d"), "--shots", "4"])
    assert exit_.value.code == 2 and "--shots need(s) --from SRC" in capsys.readouterr().err
