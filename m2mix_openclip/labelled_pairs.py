"""Labelled images to image-caption pairs for OpenCLIP's trainer: ``m2mix-data --from SRC --out OUT``.

Fine-tuning CLIP on a classification set with the contrastive loss on class-prompt captions
(FLYP, Goyal et al. 2023) needs each image paired with a caption such as "a photo of a tench.";
this writes those pairs, with ``--loss clip`` and ``--loss m2mix`` training on them unchanged.

    m2mix-data --from imagenet/train --classnames names.txt --templates templates.txt \\
        --shots 16 --seed 0 --out pairs/

Sources, read by :mod:`m2mix_openclip.datasets` (the package's one data reader):

- an ImageFolder tree (a folder per class): class names are the folder names, or ``--classnames``:
  by name where every folder is one of the names, else the i-th name for the i-th folder in
  sorted order (torchvision's ImageFolder order, in which ImageNet's 1000 names follow its
  sorted wnids);
- a CSV (``.csv``/``.tsv``) with an image column and an integer label column, and ``--classnames``;
- webdataset shards with ``.cls`` members, and ``--classnames``; their images are written out to
  ``OUT/images/``.

Captions fill ``--templates`` (``{c}`` for the class name): one template per image, drawn with
``--seed``, or with ``--all-templates`` every template as its own row. ``--shots K`` keeps exactly
K images per class (every image of a class that has fewer, with a warning naming it): per class a
permutation drawn from (seed, label) and its first K readable images, so the same seed gives the
same K-shot set and a smaller K a subset of a larger one. Every kept image is decoded once
(unreadable ones are listed, and stop the run unless ``--skip-unreadable``).

Writes, all at once (the folder appears complete or not at all):

- ``OUT/train.csv``: tab-separated ``filepath`` (absolute), ``title``, ``label``, for
  ``--train-data`` (``--csv-img-key filepath --csv-caption-key title``);
- ``OUT/labelled.csv``: ``filepath``, ``label``, one row per image, a labelled set for
  ``--zeroshot-data`` and ``m2mix-wiseft``;
- ``OUT/classnames.txt``: one class name per line (``--zeroshot-classnames``, ``--classnames``);
- ``OUT/class_folders.tsv`` (ImageFolder sources): ``FOLDER<TAB>CLASS`` lines, how other trees
  of the same classes map (``--zeroshot-class-folders``, ``m2mix-wiseft --class-folders``);
- ``OUT/shards/train-NNNNNN.tar`` with ``--shards`` (image, ``txt``, ``cls`` per row);
- ``OUT/conversion.json``: the settings, counts per class, the warnings.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .datasets import (
    clip_benchmark_set,
    is_clip_benchmark_root,
    parse_class_names,
    parse_templates,
    read_image_folder,
    read_labelled,
)

__all__ = ["LabelledSource", "read_source", "image_problem", "draw_shots", "convert", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = "a photo of a {c}."
# what OpenCLIP's webdataset pipeline reads (image="jpg;png;jpeg;webp"); other formats go into shards as png
SHARD_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PIL_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "PPM": "ppm", "GIF": "gif"}


@dataclass
class LabelledSource:
    """Labelled images read from SRC: ``images[i]`` (a path or encoded bytes) has class
    ``labels[i]`` of ``class_names``; ``class_folders`` maps an ImageFolder's folders to classes."""
    form: str  # "imagefolder", "csv" or "shards"
    class_names: List[str]
    images: List[Union[str, bytes]]
    labels: List[int]
    class_folders: Optional[Dict[str, int]] = None
    origins: Optional[List[str]] = None  # shards: SHARD:KEY of each image, for messages
    not_images: Sequence[str] = ()  # files in a tree's class folders without an image suffix, left out


def _folder_class_names(root: str, folders: Sequence[str], class_names: Optional[List[str]]) -> Dict[str, int]:
    """Folder -> class index: the folder names themselves, or ``class_names`` by name (every folder
    one of the names, each name once) or by sorted order (as many names as folders)."""
    if class_names is None:
        return {folder: index for index, folder in enumerate(folders)}
    positions = {name: index for index, name in enumerate(class_names)}
    if all(folder in positions for folder in folders) and len(positions) == len(class_names):
        return {folder: positions[folder] for folder in folders}
    if len(class_names) == len(folders):
        return {folder: index for index, folder in enumerate(folders)}
    raise ValueError(f"{root}: {len(folders)} class folders but {len(class_names)} --classnames; the names map "
                     "to the folders by name (every folder named like a class) or in sorted folder order (as many "
                     "names as folders)")


def read_source(source: str, class_names: Optional[List[str]] = None, img_key: str = "filepath",
                label_key: str = "label", sep: str = "\t") -> LabelledSource:
    """The labelled images of ``source`` (see the module docstring for the forms and class names).

    Raises:
        FileNotFoundError, ValueError: naming the file: an empty class folder, a label outside the
            class list, a missing column or image, a CSV or shards without ``class_names``.
    """
    if is_clip_benchmark_root(source):
        splits = [entry.name for entry in sorted(os.scandir(source), key=lambda e: e.name) if entry.is_dir()]
        split = "train" if "train" in splits else (splits[0] if splits else "SPLIT")
        # CLIP_benchmark names a split's shards 0.tar .. {n-1}.tar
        count = len(clip_benchmark_set(source, split).shards) if split != "SPLIT" else 0
        shards = os.path.join(source, split, f"{{0..{count - 1}}}.tar" if count else "{0..N}.tar")
        raise ValueError(f"{source} is a CLIP_benchmark folder (splits: {', '.join(splits) or 'none'}), not an "
                         f"ImageFolder tree: convert one split's shards, e.g. --from '{shards}' "
                         f"--classnames {os.path.join(source, 'classnames.txt')}")
    if os.path.isdir(source):
        tree = read_image_folder(source)
        folders = list(tree.images)
        mapping = _folder_class_names(source, folders, class_names)
        names = class_names if class_names is not None else folders
        images, labels = [], []
        for folder, files in tree.images.items():
            images += files
            labels += [mapping[folder]] * len(files)
        return LabelledSource("imagefolder", list(names), images, labels, mapping, not_images=tree.left_out)
    if class_names is None:
        raise ValueError(f"{source}: the labels of a CSV or of shards are class indices: give --classnames "
                         "(a file with one name per line, or a comma list)")
    labelled = read_labelled(source, len(class_names), img_key, label_key, sep, ("--csv-img-key", "--csv-label-key"))
    form = "csv" if source.endswith((".csv", ".tsv")) else "shards"
    return LabelledSource(form, list(class_names), list(labelled.images), labelled.labels.tolist(),
                          origins=labelled.origins)


def image_problem(image: Union[str, bytes]) -> Optional[str]:
    """Why ``image`` (a path or encoded bytes) cannot be decoded, or None. A JPEG is decoded at a
    reduced scale (every byte still read), so a truncated file is found fast."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        return f"{type(e).__name__}: {e}"
    return None


def _problems_of(images: Sequence[Union[str, bytes]], workers: int) -> List[Optional[str]]:
    if workers <= 1 or len(images) < 256:
        return [image_problem(im) for im in images]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(image_problem, images, chunksize=64))


def draw_shots(labels: Sequence[int], num_classes: int, shots: Optional[int], seed: int,
               problem=lambda index: None) -> Tuple[List[int], Dict[int, int], List[Tuple[int, str]]]:
    """The images to keep, per class in order of label then of the source.

    Per class, the images in a permutation drawn from ``(seed, label)`` (the source order when
    ``shots`` is None), and of them the first ``shots`` for which ``problem(index)`` is None.

    Returns:
        kept indices; ``{label: count}`` of the classes with fewer than ``shots`` images kept (or,
        without ``shots``, with none); ``(index, problem)`` of every image found unreadable.
    """
    members: List[List[int]] = [[] for _ in range(num_classes)]
    for index, label in enumerate(labels):
        members[label].append(index)
    kept, short, unreadable = [], {}, []
    for label, indices in enumerate(members):
        if shots is not None:
            indices = [indices[j] for j in np.random.default_rng([seed, label]).permutation(len(indices))]
        chosen = []
        for index in indices:
            if shots is not None and len(chosen) == shots:
                break
            why = problem(index)
            if why is None:
                chosen.append(index)
            else:
                unreadable.append((index, why))
        if len(chosen) < (shots if shots is not None else 1):
            short[label] = len(chosen)
        kept += sorted(chosen)
    return kept, short, unreadable


def _describe(labelled: "LabelledSource", index: int) -> str:
    image = labelled.images[index]
    return image if isinstance(image, str) else f"sample {labelled.origins[index]}"


def _image_bytes(image: Union[str, bytes]) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    with open(image, "rb") as f:
        return f.read()


def _shard_member(payload: bytes) -> Tuple[str, bytes]:
    """(extension, bytes) of an image as a shard member OpenCLIP reads: jpg/png/webp as they are,
    other formats as png."""
    with Image.open(io.BytesIO(payload)) as im:
        if im.format in SHARD_IMAGE_FORMATS:
            return SHARD_IMAGE_FORMATS[im.format], payload
        out = io.BytesIO()
        im.convert("RGB").save(out, format="PNG")
        return "png", out.getvalue()


def _write_tsv(path: str, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose a new --out or remove it")


def convert(source: str, out: str, class_names: Optional[str] = None, templates: str = DEFAULT_TEMPLATES,
            all_templates: bool = False, shots: Optional[int] = None, seed: int = 0, shards: bool = False,
            shard_size: int = 1000, img_key: str = "filepath", label_key: str = "label", sep: str = "\t",
            skip_unreadable: bool = False, workers: int = 1) -> dict:
    """Writes the training pairs of ``source`` to ``out`` (see the module docstring); returns the
    summary written to ``out/conversion.json``.

    Raises:
        FileExistsError: ``out`` holds files. FileNotFoundError, ValueError: bad input, naming the
            file (a template without ``{c}``, an empty class folder, a label outside the class
            list, unreadable images: every one found listed).
    """
    if shots is not None and shots < 1:
        raise ValueError(f"--shots must be at least 1, got {shots}")
    if seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {seed}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    _check_out(out)
    template_list = parse_templates(templates)
    names = parse_class_names(class_names) if class_names is not None else None
    labelled = read_source(source, names, img_key, label_key, sep)
    names = labelled.class_names

    checked: Dict[int, Optional[str]] = {}
    if shots is None:  # every image is kept: check them all, in parallel where that pays
        checked = dict(enumerate(_problems_of(labelled.images, workers)))

    def problem(index: int) -> Optional[str]:
        if index not in checked:
            checked[index] = image_problem(labelled.images[index])
        return checked[index]

    kept, short, unreadable = draw_shots(labelled.labels, len(names), shots, seed, problem)
    if unreadable and not skip_unreadable:
        listed = "; ".join(f"{_describe(labelled, i)} ({why})" for i, why in unreadable[:5])
        more = f"; ... ({len(unreadable)} in all)" if len(unreadable) > 5 else ""
        raise ValueError(f"{source}: {len(unreadable)} image(s) cannot be read: {listed}{more} "
                         "(fix or remove them, or pass --skip-unreadable to leave them out)")
    if not kept:
        raise ValueError(f"{source}: no image to keep")

    draws = np.random.default_rng(seed).integers(len(template_list), size=len(kept))
    rows = []  # (image index, caption, label)
    for position, index in enumerate(kept):
        label = labelled.labels[index]
        chosen = template_list if all_templates else [template_list[draws[position]]]
        rows += [(index, t.replace("{c}", names[label]), label) for t in chosen]
    final = os.path.abspath(out)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".partial", dir=os.path.dirname(final))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp's is private)
    try:
        summary = _write(work, final, source, labelled, kept, rows, shards, shard_size)
        summary.update({
            "shots": shots, "seed": seed, "templates": template_list, "all_templates": all_templates,
            "short_classes": [{"label": label, "class": names[label], "images": count}
                              for label, count in short.items()],
            "unreadable_left_out": [[_describe(labelled, i), why] for i, why in unreadable],
            "not_images_left_out": list(labelled.not_images)})
        with open(os.path.join(work, "conversion.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _check_out(out)  # nothing appeared there meanwhile
        if os.path.isdir(final):
            os.rmdir(final)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _write(work: str, final: str, source: str, labelled: LabelledSource, kept: List[int],
           rows: List[Tuple[int, str, int]], shards: bool, shard_size: int) -> dict:
    """Writes the files into ``work`` naming paths as they will be in ``final``; the summary's counts."""
    names = labelled.class_names
    paths = {}
    for position, index in enumerate(kept):
        image = labelled.images[index]
        if isinstance(image, str):
            paths[index] = os.path.abspath(image)
        else:  # a shard's bytes: a file of its own
            with Image.open(io.BytesIO(image)) as im:
                file = f"{position:08d}.{PIL_SUFFIX.get(im.format, 'img')}"
            os.makedirs(os.path.join(work, "images"), exist_ok=True)
            with open(os.path.join(work, "images", file), "wb") as f:
                f.write(image)
            paths[index] = os.path.join(final, "images", file)
    _write_tsv(os.path.join(work, "train.csv"), ["filepath", "title", "label"],
               [(paths[index], title, label) for index, title, label in rows])
    _write_tsv(os.path.join(work, "labelled.csv"), ["filepath", "label"],
               [(paths[i], labelled.labels[i]) for i in kept])
    with open(os.path.join(work, "classnames.txt"), "w") as f:
        f.write("".join(f"{n}\n" for n in names))
    files = {"train": os.path.join(final, "train.csv"), "labelled": os.path.join(final, "labelled.csv"),
             "classnames": os.path.join(final, "classnames.txt")}
    if labelled.class_folders is not None:
        with open(os.path.join(work, "class_folders.tsv"), "w") as f:
            f.write("".join(f"{folder}\t{label}\n" for folder, label in labelled.class_folders.items()))
        files["class_folders"] = os.path.join(final, "class_folders.tsv")
    num_shards = -(-len(rows) // shard_size) if shards else 0
    if shards:
        os.makedirs(os.path.join(work, "shards"))
        for s in range(num_shards):
            last = None  # the rows of --all-templates follow each other: read and encode an image once
            with tarfile.open(os.path.join(work, "shards", f"train-{s:06d}.tar"), "w") as tar:
                for number in range(s * shard_size, min((s + 1) * shard_size, len(rows))):
                    index, title, label = rows[number]
                    if last is None or last[0] != index:
                        last = (index, *_shard_member(_image_bytes(labelled.images[index])))
                    for ext, data in ((last[1], last[2]), ("txt", title.encode()), ("cls", str(label).encode())):
                        info = tarfile.TarInfo(f"{number:08d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        files["shards"] = os.path.join(final, "shards", f"train-{{000000..{num_shards - 1:06d}}}.tar")
    return {"source": os.path.abspath(source), "form": labelled.form, "num_classes": len(names),
            "num_images": len(kept), "num_rows": len(rows), "num_shards": num_shards,
            "images_per_class": np.bincount([labelled.labels[i] for i in kept], minlength=len(names)).tolist(),
            "files": files}


def report(summary: dict, shots: Optional[int]) -> List[str]:
    """The lines ``m2mix-data --from`` prints: what was written and how to use it."""
    files = summary["files"]
    per = f"{shots} per class, seed {summary['seed']}" if shots is not None else "all"
    rows = ("every template as a row" if summary["all_templates"]
            else f"one of {len(summary['templates'])} template(s) per image")
    lines = [f"{summary['num_classes']} classes, {summary['num_images']} images ({per}), "
             f"{summary['num_rows']} training rows ({rows})",
             f"  train.csv      {files['train']}  (--train-data; --csv-img-key filepath --csv-caption-key title)",
             f"  labelled.csv   {files['labelled']}  (--zeroshot-data NAME=..., m2mix-wiseft --id NAME=...)",
             f"  classnames.txt {files['classnames']}  (--zeroshot-classnames, m2mix-wiseft --classnames)"]
    if "class_folders" in files:
        lines.append(f"  class folders  {files['class_folders']}  (--zeroshot-class-folders, "
                     "m2mix-wiseft --class-folders)")
    if "shards" in files:
        lines.append(f"  shards         {files['shards']}  (--train-data; --train-num-samples {summary['num_rows']})")
    return lines


def warnings_of(summary: dict, shots: Optional[int]) -> List[str]:
    """The warnings to print: classes with fewer images than asked, images left out."""
    lines = []
    for short in summary["short_classes"]:
        lines.append(f"warning: class {short['class']!r} (label {short['label']}) has "
                     + (f"{short['images']} image(s), fewer than --shots {shots}: all kept"
                        if shots is not None else "no image"))
    for image, why in summary["unreadable_left_out"]:
        lines.append(f"warning: left out (--skip-unreadable): {image} ({why})")
    not_images = summary["not_images_left_out"]
    if not_images:
        lines.append(f"warning: {len(not_images)} file(s) in class folders are not images by their suffix and are "
                     f"left out (conversion.json lists them), e.g. {not_images[0]}")
    return lines
