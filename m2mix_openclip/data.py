"""Real image-caption pairs that need no download: scikit-learn's 1,797 handwritten digit scans.

Each 8x8 scan (16 grey levels) is upsampled to a 32x32 RGB PNG and paired with a caption drawn
from varied templates, so captions differ between samples of one class. Splits are
deterministic: ``pretrain`` (50%), ``finetune`` (25%), ``test`` (25%), stratified by digit.

    m2mix-data --out DIR            # DIR/<split>.csv, DIR/<split>/*.png, DIR/shards/<split>-000000.tar ...
    m2mix-data --out DIR --layout clip_benchmark   # DIR/digits/test/0.tar ..., as CLIP_benchmark's wds/ sets

With ``--layout clip_benchmark`` every set is a CLIP_benchmark webdataset folder
(``clip_benchmark eval --dataset wds/digits --dataset_root DIR/digits``, ``--zeroshot-data NAME=DIR/digits``,
``m2mix-analyze --data DIR/digits``): ``digits`` (splits pretrain, finetune, test), ``digits_rotate``,
``digits_blur``, ``digits_noise`` (test) with ``classnames.txt`` and
``zeroshot_classification_templates.txt``, and ``digits_captions`` (test, a retrieval set).

With ``--from SRC`` it turns your own labelled images (an ImageFolder tree, a CSV with an integer
label column, or webdataset shards with .cls members) into class-prompt training pairs, optionally
K-shot (:mod:`m2mix_openclip.labelled_pairs`):

    m2mix-data --from imagenet/train --classnames names.txt --templates 'a photo of a {c}.' \
        --shots 16 --seed 0 --out pairs   # pairs/train.csv, labelled.csv, classnames.txt, class_folders.tsv
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tarfile
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter

from .atomic import write_atomically, write_json

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a handwritten digit {name}",
    "a scan of the number {digit}",
    "the digit {digit}, written by hand",
    "a blurry {name}",
    "a small grey image of a {name}",
    "handwriting showing {name}",
    "number {name} in pen",
    "a low resolution {digit}",
]
# {c} only (the class name), as CLIP_benchmark's template files take them: the demo, m2mix-analyze with
# the written zeroshot_classification_templates.txt and clip_benchmark eval score the same prompts
ZERO_SHOT_TEMPLATES = ["a handwritten digit {c}", "a scan of the number {c}", "the digit {c}, written by hand"]
SPLITS = ("pretrain", "finetune", "test")
SHIFTS = ("rotate", "blur", "noise")


def load_digits_arrays():
    """(images (N, 8, 8) float in [0, 16], labels (N,)) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = 0) -> Dict[str, np.ndarray]:
    """Stratified, deterministic pretrain / finetune / test indices (50 / 25 / 25%)."""
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = len(idx) // 2, (3 * len(idx)) // 4
        out["pretrain"] += idx[:a].tolist()
        out["finetune"] += idx[a:b].tolist()
        out["test"] += idx[b:].tolist()
    return {s: np.array(sorted(v)) for s, v in out.items()}


def caption(label: int, index: int) -> str:
    template = CAPTION_TEMPLATES[(index * 7 + label) % len(CAPTION_TEMPLATES)]
    return template.format(name=CLASS_NAMES[label], digit=label)


def to_image(scan: np.ndarray, size: int = 32, shift: Optional[str] = None, seed: int = 0) -> Image.Image:
    """An 8x8 scan (0..16) as a size x size RGB image, optionally under a distribution shift."""
    grey = Image.fromarray((scan * (255.0 / 16.0)).clip(0, 255).astype(np.uint8))
    img = grey.resize((size, size), Image.BILINEAR)
    if shift == "rotate":
        img = img.rotate(30, resample=Image.BILINEAR)
    elif shift == "blur":
        img = img.filter(ImageFilter.GaussianBlur(radius=2))
    elif shift == "noise":
        rng = np.random.default_rng(seed)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 60, (size, size))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    elif shift is not None:
        raise ValueError(f"unknown shift {shift!r}; choose one of {list(SHIFTS)}")
    return img.convert("RGB")


def write_dataset(out_dir: str, splits: Sequence[str] = SPLITS, limit: Optional[int] = None,
                  shard_size: int = 256, shifts: Sequence[str] = SHIFTS, size: int = 32) -> Dict[str, dict]:
    """Writes every split as CSV (tab-separated, ``filepath`` / ``title`` / ``label``) and as
    webdataset shards (``png``, ``txt``, ``cls``), plus shifted copies of the test split (labelled
    sets for ``--zeroshot-data``), ``classnames.txt`` (one class name per line) and
    ``zeroshot_classification_templates.txt`` (the zero-shot templates of the demo, one per line).

    Returns a manifest ``{split: {"csv", "shards", "num_samples", "num_shards"}}``, also written
    to ``out_dir/manifest.json``.
    """
    images, labels = load_digits_arrays()
    idx_by_split = split_indices(labels)
    manifest = {}
    todo = [(s, None) for s in splits] + [("test", sh) for sh in shifts if "test" in splits]
    for split, shift in todo:
        name = split if shift is None else f"{split}-{shift}"
        idx = idx_by_split[split][:limit] if limit else idx_by_split[split]
        img_dir = os.path.join(out_dir, name)
        shard_dir = os.path.join(out_dir, "shards")
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(shard_dir, exist_ok=True)
        rows = []
        for i in idx:
            path = os.path.join(img_dir, f"{i:05d}.png")
            image = to_image(images[i], size, shift, seed=int(i))
            write_atomically(path, lambda f, image=image: image.save(f, format="PNG"))
            rows.append((os.path.abspath(path), caption(int(labels[i]), int(i)), int(labels[i]), int(i)))
        csv_path = os.path.join(out_dir, f"{name}.csv")
        _write_text(csv_path, _tsv([("filepath", "title", "label")] + [r[:3] for r in rows]))
        num_shards = max(1, -(-len(rows) // shard_size))
        for s in range(num_shards):
            members = []
            for path, text, label, i in rows[s * shard_size:(s + 1) * shard_size]:
                with open(path, "rb") as image_file:
                    members += [(f"{i:05d}.png", image_file.read()), (f"{i:05d}.txt", text.encode()),
                                (f"{i:05d}.cls", str(label).encode())]
            _write_tar(os.path.join(shard_dir, f"{name}-{s:06d}.tar"), members)
        manifest[name] = {
            "csv": os.path.abspath(csv_path),
            "shards": os.path.abspath(os.path.join(shard_dir, f"{name}-{{000000..{num_shards - 1:06d}}}.tar")),
            "num_samples": len(rows),
            "num_shards": num_shards,
        }
    _write_class_files(out_dir)  # for --zeroshot-classnames, --zeroshot-templates, m2mix-analyze
    write_json(os.path.join(out_dir, "manifest.json"), manifest)  # last: its presence means every file is whole
    return manifest


def _write_text(path: str, text: str) -> None:
    """``text`` as UTF-8 at ``path``, whole or not at all."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def _tsv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def _write_class_files(folder: str) -> None:
    _write_text(os.path.join(folder, "classnames.txt"), "\n".join(CLASS_NAMES) + "\n")
    _write_text(os.path.join(folder, "zeroshot_classification_templates.txt"), "\n".join(ZERO_SHOT_TEMPLATES) + "\n")


def _write_tar(path: str, members: Sequence) -> None:
    """A tar of (name, bytes) members at ``path``, whole or not at all."""
    def write(f):
        with tarfile.open(fileobj=f, mode="w") as tar:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_atomically(path, write)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


CLIP_BENCHMARK_NAME = "digits"


def write_clip_benchmark_layout(out_dir: str, splits: Sequence[str] = SPLITS, limit: Optional[int] = None,
                                shard_size: int = 256, shifts: Sequence[str] = SHIFTS,
                                size: int = 32) -> Dict[str, dict]:
    """Writes the digits as CLIP_benchmark webdataset folders (its ``wds/NAME`` layout), one per set:

    - ``digits``: every split as ``digits/SPLIT/0.tar ...`` with ``SPLIT/nshards.txt``; samples
      ``KEY.png``, ``KEY.cls`` (the label) and ``KEY.txt`` (the caption, which CLIP_benchmark's
      classification ignores and ``m2mix-analyze`` reads); ``classnames.txt`` and
      ``zeroshot_classification_templates.txt`` (the demo's templates, ``{c}`` for the class);
    - ``digits_rotate``, ``digits_blur``, ``digits_noise``: the test split under each shift, alike;
    - ``digits_captions``: the test split as a retrieval set (``dataset_type.txt``: retrieval),
      each image with its caption in ``KEY.txt`` (one line per caption).

    Returns a manifest ``{set: {"root", "task", "splits": {split: num_samples}}}``, also written
    to ``out_dir/manifest.json``.
    """
    images, labels = load_digits_arrays()
    idx_by_split = split_indices(labels)
    sets = [(CLIP_BENCHMARK_NAME, "classification", None, list(splits))]
    if "test" in splits:
        sets += [(f"{CLIP_BENCHMARK_NAME}_{shift}", "classification", shift, ["test"]) for shift in shifts]
        sets.append((f"{CLIP_BENCHMARK_NAME}_captions", "retrieval", None, ["test"]))
    manifest = {}
    for name, task, shift, set_splits in sets:
        root = os.path.join(out_dir, name)
        counts = {}
        for split in set_splits:
            folder = os.path.join(root, split)
            os.makedirs(folder, exist_ok=True)
            idx = idx_by_split[split][:limit] if limit else idx_by_split[split]
            samples = [(int(i), _png(to_image(images[i], size, shift, seed=int(i))), caption(int(labels[i]), int(i)),
                        int(labels[i])) for i in idx]
            num_shards = max(1, -(-len(samples) // shard_size))
            for s in range(num_shards):
                members = []
                for i, png, text, label in samples[s * shard_size:(s + 1) * shard_size]:
                    members += [(f"{i:05d}.png", png), (f"{i:05d}.txt", text.encode())]
                    if task == "classification":
                        members.append((f"{i:05d}.cls", str(label).encode()))
                _write_tar(os.path.join(folder, f"{s}.tar"), members)
            _write_text(os.path.join(folder, "nshards.txt"), f"{num_shards}\n")
            counts[split] = len(samples)
        if task == "classification":
            _write_class_files(root)
        else:
            _write_text(os.path.join(root, "dataset_type.txt"), "retrieval\n")
        manifest[name] = {"root": os.path.abspath(root), "task": task, "splits": counts}
    write_json(os.path.join(out_dir, "manifest.json"), manifest)  # last: its presence means every file is whole
    return manifest


# the flags of --from, and their defaults (each must keep its default without --from)
CONVERSION_DEFAULTS = {"classnames": None, "templates": None, "all_templates": False, "shots": None, "seed": 0,
                       "shards": False, "csv_img_key": "filepath", "csv_label_key": "label", "csv_separator": "\t",
                       "skip_unreadable": False, "workers": 1}


def add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``--from`` (labelled images to training pairs)."""
    group = parser.add_argument_group("your labelled images to training pairs (--from)")
    group.add_argument("--from", dest="source", default=None, metavar="SRC",
                       help="Labelled images: an ImageFolder tree (a folder per class), a CSV with an image and an "
                            "integer label column, or webdataset shards with .cls members.")
    group.add_argument("--classnames", default=None, metavar="FILE_OR_LIST",
                       help="Class names (a file, one per line, or a comma list); needed for a CSV or shards. For a "
                            "tree: by folder name, else in sorted folder order. Default: the folder names.")
    group.add_argument("--templates", default=None, metavar="FILE_OR_LIST",
                       help="Caption templates with {c} for the class name: a file, one per line, or a ';' list. "
                            "Default: 'a photo of a {c}.'")
    group.add_argument("--all-templates", action="store_true",
                       help="Every template as its own row (default: one drawn per image with --seed).")
    group.add_argument("--shots", type=int, default=None, metavar="K",
                       help="Keep exactly K images per class (all of a class that has fewer, with a warning).")
    group.add_argument("--seed", type=int, default=0, help="Seed of the K-shot draw and of the templates. Default 0.")
    group.add_argument("--shards", action="store_true", help="Also write webdataset shards (OUT/shards/).")
    group.add_argument("--csv-img-key", default="filepath", help="Image column of a CSV source. Default filepath.")
    group.add_argument("--csv-label-key", default="label", help="Integer label column of a CSV source. Default label.")
    group.add_argument("--csv-separator", default="\t", help="Separator of a CSV source. Default tab.")
    group.add_argument("--skip-unreadable", action="store_true",
                       help="Leave out images that cannot be decoded (listed as warnings) instead of stopping.")
    group.add_argument("--workers", type=int, default=1,
                       help="Processes that decode the images to check them (without --shots). Default 1.")


def run_conversion(args) -> int:
    """``m2mix-data --from``: one line and exit 2 on bad input."""
    from .labelled_pairs import DEFAULT_TEMPLATES, convert, report, warnings_of
    try:
        summary = convert(args.source, args.out, args.classnames, args.templates or DEFAULT_TEMPLATES,
                          args.all_templates, args.shots, args.seed, args.shards,
                          args.shard_size if args.shard_size is not None else 1000, args.csv_img_key,
                          args.csv_label_key, args.csv_separator, args.skip_unreadable, args.workers)
    except (OSError, ValueError) as e:
        print(f"m2mix-data: error: {e}", file=sys.stderr)
        return 2
    for line in warnings_of(summary, args.shots):
        print(line, file=sys.stderr)
    print("\n".join(report(summary, args.shots)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2mix-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--limit", type=int, default=None, help="At most this many samples per split.")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="Samples per webdataset shard (default 256; with --from, 1000).")
    parser.add_argument("--layout", choices=["openclip", "clip_benchmark"], default="openclip",
                        help="openclip (default): CSV files and shards for OpenCLIP's trainer; clip_benchmark: "
                             "CLIP_benchmark webdataset folders (clip_benchmark eval --dataset wds/digits "
                             "--dataset_root OUT/digits), also read by --zeroshot-data and m2mix-analyze --data.")
    add_conversion_arguments(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source is not None:
        if args.limit is not None:
            parser.error("--limit is for the bundled digits; with --from use --shots")
        if args.layout != "openclip":
            parser.error("--layout clip_benchmark is for the bundled digits; --from writes OpenCLIP's layout "
                         "(train.csv, labelled.csv, shards with --shards)")
        return run_conversion(args)
    given = [f"--{k.replace('_', '-')}" for k, default in CONVERSION_DEFAULTS.items() if getattr(args, k) != default]
    if given:
        parser.error(f"{', '.join(given)} need(s) --from SRC (without it m2mix-data writes the bundled digits)")
    shard_size = args.shard_size or 256
    if args.layout == "clip_benchmark":
        for name, m in write_clip_benchmark_layout(args.out, limit=args.limit, shard_size=shard_size).items():
            splits = ", ".join(f"{split} {count}" for split, count in m["splits"].items())
            print(f"{name:16s} {m['task']:14s} {splits}  {m['root']}")
        return 0
    manifest = write_dataset(args.out, limit=args.limit, shard_size=shard_size)
    for name, m in manifest.items():
        print(f"{name:16s} {m['num_samples']:5d} samples  {m['csv']}  {m['shards']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
