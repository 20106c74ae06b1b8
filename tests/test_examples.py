"""The GPU recipes: the data script on tiny fake caption files, and the commands' arguments parse."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from m2mix_openclip.integration.launcher import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")


def _images(folder, names):
    from PIL import Image
    folder.mkdir()
    for n in names:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / n)


def test_prepare_flickr_token_and_coco_json(tmp_path):
    _images(tmp_path / "img", ["1.jpg", "2.jpg"])
    (tmp_path / "cap.token").write_text("1.jpg#0\tA dog runs .\n1.jpg#1\tA brown dog .\n2.jpg#0\tTwo cats sit .\n")
    (tmp_path / "split.txt").write_text("1.jpg\n")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(EX, "prepare_captions.py"), *a],
                                    capture_output=True, text=True)
    p = run("--format", "flickr-token", "--captions", str(tmp_path / "cap.token"), "--images", str(tmp_path / "img"),
            "--out", str(tmp_path / "f.csv"), "--split-file", str(tmp_path / "split.txt"),
            "--shards", str(tmp_path / "sh"), "--shard-size", "1")
    assert p.returncode == 0, p.stderr
    lines = (tmp_path / "f.csv").read_text().splitlines()
    assert lines[0] == "filepath\ttitle\timage_id" and len(lines) == 3 and lines[1].endswith("\tA dog runs .\t1.jpg")
    assert "shard-{000000..000001}.tar" in p.stdout
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "2.jpg"}], "annotations": [{"image_id": 7, "caption": " Cats. "}]}))
    p = run("--format", "coco-json", "--captions", str(tmp_path / "coco.json"), "--images", str(tmp_path / "img"),
            "--out", str(tmp_path / "c.csv"))
    assert p.returncode == 0 and (tmp_path / "c.csv").read_text().splitlines()[1].endswith("2.jpg\tCats.\t2.jpg")
    (tmp_path / "bad.token").write_text("no tab here\n")
    p = run("--format", "flickr-token", "--captions", str(tmp_path / "bad.token"), "--images", str(tmp_path / "img"),
            "--out", str(tmp_path / "x.csv"))
    assert p.returncode != 0 and "expected 'IMAGE.jpg#N<TAB>caption'" in p.stderr


def recipe_data(folder, rows=1):
    """A CSV of ``rows`` rows naming one real image, and one shard holding it with a caption: the
    launcher's pre-flight checks read them before parsing succeeds."""
    import tarfile
    _images(folder / "img", ["a.jpg"])
    csv_path = folder / "data.csv"
    csv_path.write_text("filepath\ttitle\n" + f"{folder / 'img' / 'a.jpg'}\ta picture\n" * rows)
    (folder / "shards").mkdir()
    (folder / "a.txt").write_text("a picture")
    with tarfile.open(folder / "shards" / "shard-000000.tar", "w") as tar:
        tar.add(folder / "img" / "a.jpg", arcname="000000.jpg")
        tar.add(folder / "a.txt", arcname="000000.txt")
    return {"TRAIN": str(csv_path), "VAL": str(csv_path)}


def recipe_args(script, env):
    out = subprocess.run(["bash", os.path.join(EX, script)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, DRY_RUN="1", **env)).stdout
    argv = shlex.split(out)
    train_argv = [a for a in argv[argv.index("m2mix_openclip.train") + 1:] if a != "--"]
    return train_argv, parse_args(train_argv)


@pytest.mark.parametrize("script,loss", [("train_single_node.sh", "m2mix"), ("train_single_node.sh", "clip"),
                                         ("slurm_m2mix.sbatch", "m2mix")])
def test_recipe_commands_parse(script, loss, tmp_path):
    env = dict(recipe_data(tmp_path), LOSS=loss)
    if script.endswith(".sbatch"):
        env["TRAIN"] = str(tmp_path / "shards" / "shard-{000000..000000}.tar")
    _, args = recipe_args(script, env)
    assert args.loss == loss and args.model == "ViT-B-32" and args.pretrained == "openai"
    assert (args.batch_size, args.lr, args.wd, args.epochs) == (128, 1e-5, 0.2, 9)
    if loss == "m2mix":
        assert (args.m2mix_weight, args.m2mix_alpha, args.m2mix_temperature) == (0.02, 0.5, 0.07)


def test_prepare_one_caption_per_image_and_grouped_loading(tmp_path):
    from m2mix_openclip.datasets import group_by_image, load_pairs
    _images(tmp_path / "img", ["1.jpg", "2.jpg"])
    (tmp_path / "cap.token").write_text("1.jpg#0\tA dog runs .\n2.jpg#0\tTwo cats .\n1.jpg#1\tA brown dog .\n"
                                        "2.jpg#1\tCats sit .\n1.jpg#2\tDog .\n")
    p = subprocess.run([sys.executable, os.path.join(EX, "prepare_captions.py"), "--format", "flickr-token",
                        "--captions", str(tmp_path / "cap.token"), "--images", str(tmp_path / "img"),
                        "--out", str(tmp_path / "all.csv"), "--one-caption-out", str(tmp_path / "one.csv")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "wrote 5 captions of 2 images" in p.stdout and "wrote 2 captions (one per image)" in p.stdout
    one = [line.split("\t")[1:] for line in (tmp_path / "one.csv").read_text().splitlines()[1:]]
    assert one == [["A dog runs .", "1.jpg"], ["Two cats .", "2.jpg"]]
    pairs = load_pairs(str(tmp_path / "all.csv"), image_id_key="image_id")
    assert group_by_image(pairs)[1].tolist() == [0, 1, 0, 1, 0]
    assert group_by_image(load_pairs(str(tmp_path / "all.csv")))[1].tolist() == [0, 1, 0, 1, 0]  # by path


@pytest.mark.parametrize("env,lr,wd,vlmix", [({}, 1e-5, 0.2, 0.05),
                                             ({"LR": "7e-6", "WD": "0.01", "VLMIX": "0.2"}, 7e-6, 0.01, 0.2)])
def test_m3mix_recipe_has_the_reference_values(tmp_path, env, lr, wd, vlmix):
    # 1000 training rows: 8 steps per epoch at batch 128, 72 steps, 10% warmup = 7 steps
    train_argv, args = recipe_args("train_m3mix.sh", dict(recipe_data(tmp_path, rows=1000), **env))
    assert train_argv[train_argv.index("--unimix-temperature") + 1] == "0.01"
    assert args.loss == "m2mix" and args.model == "ViT-B-32" and args.pretrained == "openai"
    assert (args.batch_size, args.lr, args.wd, args.epochs, args.warmup) == (128, lr, wd, 9, 7)
    assert (args.m2mix_weight, args.m2mix_alpha, args.m2mix_temperature) == (0.02, 0.2, 0.07)
    assert (args.vmix_weight, args.lmix_weight, args.vlmix_weight, args.unimix_alpha) == (0.05, 0.05, vlmix, 0.5)
    assert args.unimix_temperature == 0.01
    assert args.mix_pairing == "reverse" and args.mix_schedule == "inverse-epoch"  # the reference's
