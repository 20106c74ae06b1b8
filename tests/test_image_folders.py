"""ImageFolder trees as labelled sets: how folders map to classes (name, index, class-folder map),
sets scored over their own classes (ImageNet-R / ObjectNet style), and the errors."""

import argparse
import io
import os

import pytest
import torch
from PIL import Image

from m2mix_openclip.datasets import (
    load_image_folder,
    load_labelled_set,
    map_class_folders,
    parse_class_folders,
    read_image_folder,
)
from m2mix_openclip.integration import zeroshot_hook
from m2mix_openclip.metrics import restrict_to_class_groups, zero_shot_scores

NAMES = ["cat", "dog", "bird", "fish", "frog", "crane", "crane"]  # a name twice, as ImageNet's "crane"


def png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def tree(root, folders):
    """folders: name -> number of images (or a list of file names)."""
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True)
        for i, file in enumerate(files if isinstance(files, list) else [f"{j}.png" for j in range(files)]):
            (root / folder / file).write_bytes(png(i))
    return str(root)


def test_the_tree_is_read_as_torchvision_reads_it(tmp_path):
    root = tree(tmp_path / "t", {"b": ["2.JPG", "1.png", "notes.txt", ".hidden.png"], "a": 1, ".cache": 1})
    (tmp_path / "t" / "README.txt").write_text("at the root: not read")
    (tmp_path / "t" / "b" / "deeper").mkdir()
    (tmp_path / "t" / "b" / "deeper" / "0.webp").write_bytes(png(9))
    found = read_image_folder(root)
    assert list(found.images) == ["a", "b"]  # sorted, hidden folders skipped
    assert [p[len(root) + 1:] for p in found.images["b"]] == ["b/1.png", "b/2.JPG", "b/deeper/0.webp"]
    assert [p[len(root) + 1:] for p in found.left_out] == ["b/notes.txt"]


def test_bad_trees_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match=r"t/empty: empty class folder"):
        read_image_folder(tree(tmp_path / "t", {"full": 2, "empty": ["only.txt"]}))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="holds no class folder"):
        read_image_folder(str(tmp_path / "flat"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_image_folder(str(tmp_path / "none"))


def test_folders_map_by_the_first_rule_that_fits():
    class_folders = {"n01": (1,), "objnet_bird": (2, 3), "junk": ()}
    assert map_class_folders(["cat", "3", "n01", "objnet_bird", "junk"], NAMES, class_folders) == {
        "cat": (0,), "3": (3,), "n01": (1,), "objnet_bird": (2, 3), "junk": ()}
    with pytest.raises(ValueError, match=r"folder\(s\) 'n02', '99' match no class.*class-folder map"):
        map_class_folders(["cat", "n02", "99"], NAMES)
    with pytest.raises(ValueError, match=r"'crane' is named like classes \[5, 6\]"):
        map_class_folders(["crane"], NAMES)


def test_class_folder_map_file(tmp_path):
    path = tmp_path / "map.tsv"
    path.write_text("n01\t0\nobj\t3;1;3\nother\t-\n\n")
    assert parse_class_folders(str(path), 7) == {"n01": (0,), "obj": (1, 3), "other": ()}
    for text, message in [("n01 0\n", "line 1: expected FOLDER<TAB>CLASSES"), ("a\t0\na\t1\n", "line 2: folder 'a' "
                          "is listed twice"), ("a\t7\n", r"line 1: '7' is not a class index 0\.\.6"),
                          ("a\tcat\n", "'cat' is not a class index")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            parse_class_folders(str(path), 7)


def test_a_subset_tree_is_scored_over_its_own_classes(tmp_path):
    root = tree(tmp_path / "r", {"fish": 2, "dog": 1, "0": 1, "wnid_frog": 2, "left_out": 1})
    labelled = load_image_folder(root, NAMES, {"wnid_frog": (4,), "left_out": ()})
    # groups in class order: cat (folder 0), dog, fish, frog; labels follow them
    assert labelled.class_groups == [(0,), (1,), (3,), (4,)]
    assert labelled.labels.tolist() == [0, 1, 2, 2, 3, 3]
    assert [p.split("/")[-2] for p in labelled.images] == ["0", "dog", "fish", "fish", "wnid_frog", "wnid_frog"]
    # a tree of every class, one folder each, in order: labels are class indices, no groups
    whole = load_image_folder(tree(tmp_path / "w", {str(i): 1 for i in range(5)}), NAMES[:5])
    assert whole.class_groups is None and whole.labels.tolist() == [0, 1, 2, 3, 4]


def test_restriction_matches_a_hand_projection():
    g = torch.Generator().manual_seed(0)
    similarity = torch.randn(6, 7, generator=g)
    groups = [(1,), (2, 5), (6,)]
    expected = torch.stack([similarity[:, 1], torch.maximum(similarity[:, 2], similarity[:, 5]), similarity[:, 6]], 1)
    assert torch.equal(restrict_to_class_groups(similarity, groups), expected)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    # scores over the 3 classes of the set: argmax and softmax over those columns only
    scores = zero_shot_scores(restrict_to_class_groups(similarity, groups), labels, 10.0)
    assert scores["top1"] == pytest.approx((expected.argmax(1) == labels).float().mean().item())
    assert "top5" not in scores  # 3 classes
    with pytest.raises(ValueError, match="at least one class"):
        restrict_to_class_groups(similarity, [(1,), ()])
    with pytest.raises(ValueError, match=r"outside 0\.\.6"):
        restrict_to_class_groups(similarity, [(7,)])


def test_zeroshot_data_reads_a_tree_with_its_class_folders(tmp_path):
    root = tree(tmp_path / "sketch", {"n01": 2, "n03": 1})
    (tmp_path / "map.tsv").write_text("n01\t0\nn02\t1\nn03\t2\n")
    args = argparse.Namespace(zeroshot_data=[("sketch", root)], val_data="val.csv", zeroshot_classnames="cat,dog,bird",
                              zeroshot_templates="a {c}", zeroshot_label_key="label", csv_img_key="filepath",
                              csv_separator="\t", zeroshot_class_folders=str(tmp_path / "map.tsv"))
    assert zeroshot_hook.validate(args) is None
    labelled = zeroshot_hook._loaded[("sketch", root)]
    assert labelled.class_groups == [(0,), (2,)] and labelled.labels.tolist() == [0, 0, 1]
    args.zeroshot_class_folders = None
    assert "folder(s) 'n01', 'n03' match no class" in zeroshot_hook.validate(args)
    args.zeroshot_class_folders = str(tmp_path / "gone.tsv")
    assert "gone.tsv: class-folder map not found" in zeroshot_hook.validate(args)
    with pytest.raises(ValueError, match="zero-shot set 'x'.*is a folder"):
        load_labelled_set("x", root, 3)


def test_a_folder_is_clip_benchmark_layout_only_with_its_files(tmp_path):
    """An ImageFolder tree is read as one, a CLIP_benchmark folder (a split of shards, or its
    files at the root) as CLIP_benchmark's layout, and m2mix-data --from names the shards to
    convert instead of reading the splits as classes."""
    from m2mix_openclip.data import write_clip_benchmark_layout
    from m2mix_openclip.datasets import is_clip_benchmark_root
    from m2mix_openclip.labelled_pairs import read_source

    images = tree(tmp_path / "t", {"cat": 2, "dog": 1})
    bench = write_clip_benchmark_layout(str(tmp_path / "cb"), splits=("finetune", "test"), limit=20, shard_size=8)
    root = bench["digits"]["root"]
    bare = tmp_path / "bare"
    (bare / "test").mkdir(parents=True)
    (bare / "test" / "0.tar").write_bytes(open(os.path.join(root, "test", "0.tar"), "rb").read())
    assert (is_clip_benchmark_root(images), is_clip_benchmark_root(root), is_clip_benchmark_root(str(bare))) == \
        (False, True, True)
    assert load_labelled_set("t", images, 3, class_names=["cat", "dog", "bird"]).labels.tolist() == [0, 0, 1]
    assert len(load_labelled_set("d", root, 10).images) == bench["digits"]["splits"]["test"]
    with pytest.raises(ValueError, match=r"CLIP_benchmark folder \(splits: finetune, test\), not an ImageFolder tree: "
                                         r".*--from .*finetune/\{0\.\.2\}\.tar"):
        read_source(root)
