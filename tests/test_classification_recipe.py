"""The classification recipes: the commands they print (DRY_RUN=1) parse, and every shifted set of the
ImageNet recipe reads through its class-folder map; the ObjectNet map helper against a hand-made mapping."""

import json
import os
import shlex
import subprocess
import sys

from PIL import Image

from m2mix_openclip import wiseft
from m2mix_openclip.data import build_parser as data_parser
from m2mix_openclip.datasets import parse_class_folders
from m2mix_openclip.integration import zeroshot_hook
from m2mix_openclip.integration.launcher import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")


def image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return str(path)


def printed_commands(script, env):
    out = subprocess.run(["bash", os.path.join(EX, script)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, DRY_RUN="1", **env)).stdout
    return [line for line in out.splitlines() if line.strip()]


def objectnet_mappings(folder):
    """A hand-made ObjectNet mapping: three folders, two of them ImageNet classes; 2012 ids are
    not PyTorch's order (id i is PyTorch class 999 - i here)."""
    os.makedirs(folder)
    names = [f"imagenet class {i}" for i in range(1000)]
    files = {
        "folder_to_objectnet_label.json": {"alarm_clock": "Alarm clock", "banana": "Banana", "air_freshener": "Air"},
        "objectnet_to_imagenet_1k.json": {"Alarm clock": "imagenet class 3; imagenet class 10", "Banana":
                                          "imagenet class 7"},
        "pytorch_to_imagenet_2012_id.json": {str(999 - i): i for i in range(1000)},
    }
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    with open(os.path.join(folder, "imagenet_to_label_2012_v2"), "w") as f:
        f.write("\n".join(names) + "\n")


def test_objectnet_map_follows_the_2012_ids_to_pytorch_classes(tmp_path):
    objectnet_mappings(tmp_path / "mappings")
    (tmp_path / "imagenet.tsv").write_text("n01440764\t0\nn01443537\t1\n")
    proc = subprocess.run([sys.executable, os.path.join(EX, "objectnet_class_folders.py"), "--mappings",
                           str(tmp_path / "mappings"), "--class-folders", str(tmp_path / "imagenet.tsv"),
                           "--out", str(tmp_path / "all.tsv")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 ImageNet folders, 3 ObjectNet folders (2 mapped to ImageNet classes, 1 left out)" in proc.stdout
    assert parse_class_folders(str(tmp_path / "all.tsv"), 1000) == {
        "n01440764": (0,), "n01443537": (1,), "air_freshener": (), "alarm_clock": (989, 996), "banana": (992,)}
    os.remove(tmp_path / "mappings" / "pytorch_to_imagenet_2012_id.json")
    proc = subprocess.run([sys.executable, os.path.join(EX, "objectnet_class_folders.py"), "--mappings",
                           str(tmp_path / "mappings"), "--class-folders", str(tmp_path / "imagenet.tsv"),
                           "--out", str(tmp_path / "x.tsv")], capture_output=True, text=True)
    assert proc.returncode == 2 and "pytorch_to_imagenet_2012_id.json: not found" in proc.stderr


def test_imagenet_recipe_k_shot():
    commands = printed_commands("imagenet_wiseft.sh", {"SHOTS": "16", "SEED": "3"})
    convert = data_parser().parse_args(shlex.split(commands[2])[1:])
    assert (convert.shots, convert.seed, convert.out) == (16, 3, "runs/imagenet-16shot/pairs")
    assert not convert.all_templates
    assert data_parser().parse_args(shlex.split(printed_commands("imagenet_wiseft.sh", {"ALL_TEMPLATES": "1"})[2])[
        1:]).all_templates


def test_imagenet_recipe_commands_parse_and_read_every_set(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    env = {"IMAGENET": str(data / "imagenet"), "IMAGENET_V2": str(data / "v2"), "IMAGENET_R": str(data / "r"),
           "IMAGENET_SKETCH": str(data / "sketch"), "IMAGENET_A": str(data / "a"),
           "OBJECTNET": str(data / "objectnet"), "OUT": str(out)}
    commands = printed_commands("imagenet_wiseft.sh", env)
    assert [c.split()[0] + " " + c.split()[1] for c in commands] == [
        "mkdir -p", "python -c", "m2mix-data --from", f"python {EX}/objectnet_class_folders.py",
        "python -m", "python -m", "m2mix-wiseft --model"]
    # what the recipe's first steps write: the class list and templates (run for real), the maps
    venv = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # its python
    subprocess.run(commands[0], shell=True, check=True)
    subprocess.run(commands[1], shell=True, check=True, executable="/bin/bash", env=venv)
    names = (out / "classnames.txt").read_text().splitlines()
    templates = (out / "templates.txt").read_text().splitlines()
    assert len(names) == 1000 and names[0] == "tench" and len(templates) == 80
    assert all("{c}" in t for t in templates)
    convert = data_parser().parse_args(shlex.split(commands[2])[1:])
    assert convert.source == f"{data}/imagenet/train" and convert.templates == str(out / "templates.txt")
    assert convert.shots is None and convert.seed == 0
    os.makedirs(out / "pairs")
    (out / "pairs" / "class_folders.tsv").write_text("".join(f"n{i:08d}\t{i}\n" for i in range(1000)))
    objectnet_mappings(data / "objectnet" / "mappings")
    subprocess.run(shlex.split(commands[3]), check=True, capture_output=True, env=venv)
    # one image per tree, in folders named as each set names them
    image(data / "imagenet" / "val" / "n00000000" / "a.JPEG")
    image(data / "v2" / "999" / "a.jpeg")
    image(data / "r" / "n00000005" / "a.jpg")
    image(data / "sketch" / "n00000007" / "a.JPEG")
    image(data / "a" / "n00000009" / "a.jpg")
    image(data / "objectnet" / "images" / "alarm_clock" / "a.png")
    image(data / "objectnet" / "images" / "air_freshener" / "a.png")
    train = image(out / "pairs" / "img.png")
    (out / "pairs" / "train.csv").write_text(f"filepath\ttitle\tlabel\n{train}\ta photo of a tench.\t0\n")
    for loss, command in zip(("clip", "m2mix"), commands[4:6]):
        argv = shlex.split(command)
        args = parse_args(argv[argv.index("--") + 1:])  # the launcher reads and checks every set here
        assert args.loss == loss and (args.model, args.pretrained) == ("ViT-B-32", "openai")
        assert (args.batch_size, args.lr, args.wd, args.epochs, args.warmup) == (64, 1e-5, 0.1, 10, 500)
        assert [name for name, _ in args.zeroshot_data] == ["imagenet_v2", "imagenet_r", "imagenet_sketch",
                                                            "imagenet_a", "objectnet"]
    loaded = {name: s for (name, _), s in zeroshot_hook._loaded.items()}
    assert loaded["imagenet_v2"].class_groups == [(999,)]
    assert loaded["imagenet_r"].class_groups == [(5,)] and loaded["imagenet_sketch"].class_groups == [(7,)]
    assert loaded["objectnet"].class_groups == [(989, 996)] and len(loaded["objectnet"].images) == 1
    args = wiseft.build_parser().parse_args(shlex.split(commands[6])[1:])
    assert args.id == [("imagenet", f"{data}/imagenet/val")] and len(args.ood) == 5
    assert args.finetuned == [f"{out}/logs/{loss}/checkpoints/epoch_10.pt" for loss in ("clip", "m2mix")]
    assert args.class_folders == str(out / "class_folders.tsv") and args.alphas == list(wiseft.DEFAULT_ALPHAS)


def test_digits_recipe_prints_the_readme_workflow(tmp_path):
    commands = printed_commands("digits_wiseft.sh", {"OUT": str(tmp_path / "w")})
    assert [c.split()[0] for c in commands] == ["m2mix-demo", "m2mix-data", "m2mix-data", "m2mix-train",
                                                "m2mix-train", "m2mix-wiseft"]
    convert = data_parser().parse_args(shlex.split(commands[2])[1:])
    assert convert.shots == 16 and convert.templates.count("{c}") == 3
    train = [shlex.split(c) for c in commands[3:5]]
    assert [t[t.index("--loss") + 1] for t in train] == ["clip", "m2mix"]
    assert "--m2mix-weight" in train[1] and "--m2mix-weight" not in train[0]
    args = wiseft.build_parser().parse_args(shlex.split(commands[5])[1:])
    assert [name for name, _ in args.ood] == ["rotated", "blurred", "noisy"] and args.labels == ["clip", "m2mix"]
