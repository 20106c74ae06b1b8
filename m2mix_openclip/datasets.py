"""Reading data: image-caption pairs and labelled sets from CSV files and webdataset shards.

The one place that turns files into samples, for the training pre-flight checks
(:mod:`m2mix_openclip.integration.preflight`), evaluation (``m2mix-analyze``, ``m2mix-demo``) and
zero-shot classification (the ``--zeroshot-data`` hook, ``m2mix-wiseft``) and the converter of
labelled images to training pairs (``m2mix-data --from``). A new data form is a new branch of
:func:`load_pairs` / :func:`read_labelled` here and nowhere else; a folder is read as
CLIP_benchmark's webdataset layout (:func:`clip_benchmark_set`) where it has one, else as an
ImageFolder tree (:func:`load_image_folder`).

Evaluation in layers (each module imports only from the floors below it; ``tests/test_layers.py``):

    3 tools    analyze.py, demo.py, export.py, results.py (how a tool ends a run),
               integration/zeroshot_hook.py, integration/metrics.py
    2 tasks    evaluation.py (a table row from features), zeroshot.py (labelled sets), simat.py
    1 inputs   datasets.py (reading), models.py (loading), encode.py (embedding)
    0 maths    metrics.py (geometry, calibration, zero-shot scores), retrieval.py (ranks)

The figures, the table and atomic files (plots.py, report.py, atomic.py) serve the tools only;
progress.py (a bar on a terminal, plain lines elsewhere) serves encode.py and the tools.

Conventions, the same as OpenCLIP's trainer uses for the same files:

- CSV: a header row, then one sample per row, columns split at ``sep`` (tab by default, as
  ``--csv-separator``). Row ``i`` (0-based) is reported as line ``i + 2``.
- Image paths in a CSV are opened as written: a relative path is read from the current directory,
  as OpenCLIP's ``CsvDataset`` opens it for training (never from the CSV's folder). Where a
  relative path exists only beside the CSV, the error says so. :func:`resolve_image` is this
  rule, used by every reader and by the pre-flight check.
- Shards: local ``.tar`` files named by a path, a glob or a brace pattern
  (``shard-{000000..000009}.tar``); several sources joined by ``::``, as OpenCLIP joins them.
  Members group into samples as webdataset groups them for OpenCLIP: the key is the member's
  path up to the first dot of its file name, the extension is the rest, lower-cased
  (``a/0001.seg.png`` is sample ``a/0001``, member ``seg.png``); here a sample's members may
  stand anywhere in its shard, where webdataset needs them next to each other. A sample's image
  is its first member of :data:`IMAGE_EXTENSIONS` (OpenCLIP's order), its caption ``txt``, its
  label ``cls``.
  :func:`iter_shard_members` is the one tar reader (:func:`read_shard_samples` collects its samples).
- A folder: CLIP_benchmark's webdataset layout, read as its ``wds/NAME`` datasets are read from
  ``--dataset_root`` (:func:`clip_benchmark_set`): ``ROOT/SPLIT/0.tar ... ROOT/SPLIT/{n-1}.tar``
  with ``n`` in ``ROOT/SPLIT/nshards.txt`` (without that file, every ``ROOT/SPLIT/*.tar`` in
  numeric order), ``ROOT/classnames.txt`` and ``ROOT/zeroshot_classification_templates.txt`` (one
  per line, ``{c}`` for the class; lines taken as its reader takes them: every line, stripped) and
  ``ROOT/dataset_type.txt`` (``retrieval``; missing: classification). A sample's image is its
  first ``webp``/``png``/``jpg``/``jpeg`` member (its order), its label ``cls``, and in a retrieval
  set its captions the lines of ``txt`` (``str.splitlines``), all of one image.
- ImageFolder trees (torchvision's layout, :func:`read_image_folder`): one folder per class under
  the root, its images anywhere below it (files with torchvision's image suffixes, sorted);
  files at the root and hidden files are not read. As a labelled set
  (:func:`load_image_folder`) a folder maps to classes of the class list, folder by folder, by
  the first rule that fits: the ``--class-folders`` map (``FOLDER<TAB>CLASSES`` lines, 0-based
  class indices joined by ``;``, or ``-`` to leave the folder out), the folder's name equal to
  one class name, the folder's name a class index (ImageNet-V2's ``0`` .. ``999``). A tree whose
  folders cover only some of the classes (ImageNet-R, -A: 200 of ImageNet's 1000) or map to
  several classes each (ObjectNet: 113 of its folders to 125 ImageNet classes) is scored over
  its own classes only: :attr:`LabelledSet.class_groups`, the projection of WiSE-FT's evaluation
  (:func:`m2mix_openclip.metrics.restrict_to_class_groups`).

Every function raises (``ValueError``, ``FileNotFoundError``) with a message that names the file,
the line or sample, and the fix; the tools turn it into one line.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "MissingImageError", "missing_image_error", "resolve_image", "read_csv_rows",
           "shard_patterns", "shard_files", "iter_shard_members", "read_shard_samples", "load_pairs", "group_by_image",
           "open_image", "LabelledSet", "read_labelled", "load_labelled_set", "parse_class_names", "parse_templates",
           "CLIP_BENCHMARK_IMAGE_EXTENSIONS", "ClipBenchmarkSet", "is_clip_benchmark_root", "clip_benchmark_set",
           "load_clip_benchmark_pairs", "IMAGE_FILE_SUFFIXES", "ImageFolderTree", "read_image_folder",
           "parse_class_folders", "map_class_folders", "load_image_folder"]

# the image members OpenCLIP's webdataset pipeline takes, in its order of preference (image="jpg;png;jpeg;webp")
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
# the image members CLIP_benchmark's wds reader takes, in its order (to_tuple(["webp", "png", "jpg", "jpeg"], ...))
CLIP_BENCHMARK_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
# the files torchvision's ImageFolder takes (torchvision.datasets.folder.IMG_EXTENSIONS), any case
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CSV_SUFFIXES = (".csv", ".tsv")
SHARD_HELP = ("a .csv/.tsv file, or .tar shards as a path, a glob or a brace pattern such as "
              "'shard-{000000..000009}.tar'")
# webdataset's rule for member names (tariterators.base_plus_ext): key up to the first dot of the file name
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# -- images named by CSV rows ---------------------------------------------------------------------
class MissingImageError(FileNotFoundError):
    """An image that a CSV row names does not exist (the message names the file, line and image).

    Constructed from its message alone, so that a DataLoader worker can re-raise it;
    :func:`missing_image_error` builds the message."""


def missing_image_error(csv_path: str, line: int, image: str) -> MissingImageError:
    """The error for a missing image of ``csv_path`` line ``line``: for a relative path, where it
    was looked for (the current directory) and, when it exists beside the CSV, that it does."""
    message = f"{csv_path} line {line}: image {image!r} not found"
    if not os.path.isabs(image):
        message += (f" (relative paths are read from the current directory, {os.getcwd()}, as OpenCLIP's "
                    "trainer reads them")
        folder = os.path.dirname(os.path.abspath(csv_path))
        if os.path.isfile(os.path.join(folder, image)):
            message += f"; it exists beside the CSV, in {folder}: run from that folder or write absolute paths"
        message += ")"
    return MissingImageError(message)


def resolve_image(image: str, csv_path: str, line: int) -> str:
    """The image file a CSV row names, by the one rule of this package: the path as written, a
    relative one read from the current directory (as OpenCLIP's ``CsvDataset`` opens it).

    Raises:
        MissingImageError: no such file (see :func:`missing_image_error`).
    """
    if not os.path.isfile(image):
        raise missing_image_error(csv_path, line, image)
    return image


def open_image(image) -> Image.Image:
    """An RGB PIL image from a path or from encoded bytes (a shard member)."""
    return Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image).convert("RGB")


# -- CSV ------------------------------------------------------------------------------------------
def _sniff_separator(header: str) -> Optional[str]:
    counts = {sep: header.count(sep) for sep in ("\t", ",", ";", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def read_csv_rows(path: str, columns: Mapping[str, str], sep: str = "\t",
                  limit: Optional[int] = None) -> List[Tuple[int, Dict[str, str]]]:
    """(line number, row) for the rows of a CSV, at most ``limit`` of them.

    Args:
        columns: each column the caller needs -> the flag that names it (for the error message).
    Raises:
        FileNotFoundError: no such file. ValueError: it cannot be read as text, a column is
            missing (naming the separator, the columns found, and the separator the header seems
            to use), a row lacks a needed value, or it holds a header and no rows.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # UTF-8, a byte-order mark read as pandas reads it
            header = f.readline().rstrip("\r\n")
            f.seek(0)
            reader = csv.DictReader(f, delimiter=sep)
            found = reader.fieldnames or []
            missing = [c for c in columns if c not in found]
            if missing:
                seen = _sniff_separator(header)
                hint = ""
                if seen is not None and seen != sep:
                    looks = "tab" if seen == "\t" else repr(seen)
                    hint = f"; the file looks {looks}-separated: pass --csv-separator {seen!r}"
                flags = " / ".join(dict.fromkeys(columns.values()))
                raise ValueError(f"{path}: no column {missing[0]!r} with separator {sep!r} (columns found: {found})"
                                 f"{hint}; or set {flags}")
            rows = []
            for index, row in enumerate(reader):
                if limit is not None and index >= limit:
                    break
                line = index + 2  # line 1 is the header
                empty = [c for c in columns if row.get(c) is None]
                if empty:
                    raise ValueError(f"{path} line {line}: no value for column {empty[0]!r} (fewer fields than the "
                                     "header)")
                rows.append((line, row))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as text ({e})") from None
    if not rows:
        raise ValueError(f"{path}: the CSV holds a header and no rows")
    return rows


def _label(text: Union[str, bytes], where: str) -> int:
    try:
        return int(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{where}: label {text[:20]!r} is not an integer") from None


# -- webdataset shards ----------------------------------------------------------------------------
def shard_patterns(source: str) -> List[str]:
    """The paths or globs one shard source names (its brace pattern expanded, in order)."""
    import braceexpand
    return list(braceexpand.braceexpand(source))


def shard_files(spec: str) -> List[str]:
    """The local files a shard spec names: ``::``-separated sources, each a path, a glob or a
    brace pattern, in order (each glob sorted)."""
    return [path for source in spec.split("::") for pattern in shard_patterns(source)
            for path in sorted(glob.glob(pattern))]


def iter_shard_members(path: str, extensions: Optional[Collection[str]] = None):
    """The members of one shard, in the order they stand, as ``(key, extension, data)`` (see the
    module docstring for the key and extension); ``data`` is the member's bytes where its
    extension is in ``extensions`` (all, where None), else None (not read into memory).

    Raises:
        ValueError: the file is not a readable tar. OSError: it cannot be opened.
    """
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streamed: shards can be large
            for member in tar:
                named = _MEMBER_NAME.match(member.name) if member.isfile() else None
                if named is None:
                    continue
                key, extension = named.group(1), named.group(2).lower()
                wanted = extensions is None or extension in extensions
                yield key, extension, tar.extractfile(member).read() if wanted else None
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path} is not a readable tar shard: {e}") from None


def read_shard_samples(spec: Union[str, Sequence[str]], extensions: Collection[str]) -> Dict[str, Dict[str, bytes]]:
    """The samples of webdataset shards, ``{"SHARD:KEY": {extension: bytes}}`` in shard order,
    holding the members whose extension is in ``extensions`` (see the module docstring for how
    members group into samples). A sample with none of them is left out. ``spec`` is a shard spec
    (:func:`shard_files`) or the list of files itself.

    Raises:
        FileNotFoundError: no file matches ``spec``. ValueError: a file is not a readable tar.
    """
    files = shard_files(spec) if isinstance(spec, str) else list(spec)
    if not files:
        raise FileNotFoundError(f"{spec}: no file matches it ({SHARD_HELP})")
    samples: Dict[str, Dict[str, bytes]] = {}
    for path in files:
        for key, extension, data in iter_shard_members(path, extensions):
            if data is not None:
                samples.setdefault(f"{path}:{key}", {})[extension] = data
    return samples


def _shard_image(sample: Dict[str, bytes], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Optional[bytes]:
    return next((sample[e] for e in extensions if e in sample), None)


def _is_csv(source: str) -> bool:
    return source.endswith(CSV_SUFFIXES)


# -- image-caption pairs --------------------------------------------------------------------------
def load_pairs(data: str, img_key: str = "filepath", caption_key: str = "title", label_key: str = "label",
               sep: str = "\t", image_id_key: Optional[str] = None, limit: Optional[int] = None,
               split: str = "test") -> List[dict]:
    """Image-caption pairs from a CSV file, webdataset shards or a CLIP_benchmark folder (its
    ``split``; :func:`load_clip_benchmark_pairs` with the folder's class names and templates), the
    first ``limit`` of them.

    Each pair is a dict with ``image`` (a path, checked by :func:`resolve_image`, or the encoded
    bytes), ``caption``, ``label`` (int, or None where the row has none) and ``image_id`` (str),
    the image's identity that groups the captions of one image: the ``image_id_key`` column (CSV)
    or member extension (shards, e.g. ``KEY.imgid``) when given, else the image path as written in
    the CSV, else the SHA-1 of the image bytes in shards. Shard samples without an image or a
    caption are left out, as OpenCLIP's trainer leaves them out.
    """
    if os.path.isdir(data):  # image-caption pairs come in one folder form: CLIP_benchmark's
        return load_clip_benchmark_pairs(clip_benchmark_set(data, split), limit=limit)
    if _is_csv(data):
        columns = {img_key: "--csv-img-key", caption_key: "--csv-caption-key"}
        if image_id_key is not None:
            columns[image_id_key] = "--image-id-key"
        pairs = []
        for line, row in read_csv_rows(data, columns, sep, limit):
            label = row.get(label_key)
            pairs.append({"image": resolve_image(row[img_key], data, line), "caption": row[caption_key],
                          "label": _label(label, f"{data} line {line}") if label not in (None, "") else None,
                          "image_id": row[image_id_key] if image_id_key is not None
                          else os.path.normpath(row[img_key])})
        return pairs
    extensions = IMAGE_EXTENSIONS + ("txt", "cls") + ((image_id_key,) if image_id_key else ())
    pairs = []
    for key, sample in read_shard_samples(data, extensions).items():
        image = _shard_image(sample)
        if image is None or "txt" not in sample:
            continue
        if image_id_key is not None and image_id_key not in sample:
            raise ValueError(f"{key}: no .{image_id_key} member for --image-id-key {image_id_key!r}")
        pairs.append({"image": image, "caption": sample["txt"].decode(),
                      "label": _label(sample["cls"], f"sample {key} .cls") if "cls" in sample else None,
                      "image_id": sample[image_id_key].decode().strip() if image_id_key is not None
                      else hashlib.sha1(image).hexdigest()})
    if not pairs:
        raise ValueError(f"{data}: the shards hold no sample with both an image ({'/'.join(IMAGE_EXTENSIONS)}) "
                         "and a txt caption")
    return pairs[:limit]


def group_by_image(pairs: Sequence[dict]) -> Tuple[List[int], torch.Tensor]:
    """Groups pairs by ``image_id`` (pairs without one are their own image).

    Returns:
        first_rows: for each unique image g (in order of first appearance), the index of its
            first pair; caption_image: (T,) long, the unique image g of each pair t.
    """
    index: Dict[str, int] = {}
    first_rows, caption_image = [], []
    for t, pair in enumerate(pairs):
        key = pair.get("image_id")
        key = f"row:{t}" if key is None else f"id:{key}"
        if key not in index:
            index[key] = len(first_rows)
            first_rows.append(t)
        caption_image.append(index[key])
    return first_rows, torch.tensor(caption_image, dtype=torch.long)


# -- labelled sets --------------------------------------------------------------------------------
@dataclass
class LabelledSet:
    """Images (paths or encoded bytes) with integer labels.

    ``class_names`` / ``templates``: what the set is scored with where they belong to the set (a
    CLIP_benchmark folder's, or the flags' given for it). ``class_groups`` None: a label is an
    index of the class list. Otherwise the set is scored over its own classes only: label g stands
    for the classes ``class_groups[g]`` (indices of the class list; one for a folder of
    ImageNet-R, several for a folder of ObjectNet), and a zero-shot logit of g is the largest of
    its classes' logits."""
    name: str
    source: str
    images: List[Union[str, bytes]]
    labels: torch.Tensor  # (N,) int64
    class_names: Optional[List[str]] = None
    templates: Optional[List[str]] = None
    class_groups: Optional[List[Tuple[int, ...]]] = None
    origins: Optional[List[str]] = None  # where each image of bytes came from, for messages: SHARD:KEY

    @property
    def num_classes(self) -> Optional[int]:
        """The classes the set is scored over: its groups, or None for the whole class list."""
        return None if self.class_groups is None else len(self.class_groups)


def _labelled_from_csv(path: str, img_key: str, label_key: str, sep: str, column_flags: Tuple[str, str]):
    images, labels = [], []
    for line, row in read_csv_rows(path, {img_key: column_flags[0], label_key: column_flags[1]}, sep):
        images.append(resolve_image(row[img_key], path, line))
        labels.append(_label(row[label_key], f"{path} line {line}"))
    return images, labels


def _labelled_from_shards(spec: Union[str, Sequence[str]], extensions: Sequence[str] = IMAGE_EXTENSIONS):
    images, labels, keys = [], [], []
    for key, sample in read_shard_samples(spec, tuple(extensions) + ("cls",)).items():
        image = _shard_image(sample, extensions)
        if image is None or "cls" not in sample:
            raise ValueError(f"sample {key} lacks an image ({'/'.join(extensions)}) or a .cls label")
        images.append(image)
        labels.append(_label(sample["cls"], f"sample {key} .cls"))
        keys.append(key)
    return images, labels, keys


def read_labelled(source: str, num_classes: int, img_key: str = "filepath", label_key: str = "label",
                  sep: str = "\t", column_flags: Tuple[str, str] = ("--csv-img-key", "--zeroshot-label-key"),
                  class_names: Optional[Sequence[str]] = None,
                  class_folders: Optional[Mapping[str, Tuple[int, ...]]] = None, split: str = "test") -> LabelledSet:
    """Reads and checks a labelled set: a CSV (an image column and an integer label column),
    webdataset shards (an image and a ``cls`` member per sample), a CLIP_benchmark classification
    folder (its ``split``; :func:`clip_benchmark_set`), or any other folder as an ImageFolder tree
    (:func:`load_image_folder`, which needs ``class_names``).

    Raises:
        FileNotFoundError, ValueError: naming the file and the problem: a missing file or image,
            a missing column, a sample without an image or label, a label that is not an
            integer or lies outside ``0..num_classes - 1``, a folder that maps to no class, or
            no sample at all.
    """
    origins = None
    if is_clip_benchmark_root(source):
        images, labels, origins = _labelled_from_clip_benchmark(clip_benchmark_set(source, split))
    elif os.path.isdir(source):
        if class_names is None:
            raise ValueError(f"{source} is a folder (an ImageFolder tree): its folders map to classes by name, "
                             "so it needs the class names")
        return load_image_folder(source, class_names, class_folders)
    elif _is_csv(source):
        images, labels = _labelled_from_csv(source, img_key, label_key, sep, column_flags)
    else:
        images, labels, origins = _labelled_from_shards(source)
    if not images:
        raise ValueError(f"{source}: holds no sample")
    labels_t = torch.tensor(labels, dtype=torch.int64)
    low, high = int(labels_t.min()), int(labels_t.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{source}: labels range over {low}..{high}, but the class list has {num_classes} "
                         f"names (labels must lie in 0..{num_classes - 1})")
    return LabelledSet(source, source, images, labels_t, origins=origins)


def load_labelled_set(name: str, source: str, num_classes: int, img_key: str = "filepath",
                      label_key: str = "label", sep: str = "\t",
                      column_flags: Tuple[str, str] = ("--csv-img-key", "--zeroshot-label-key"),
                      class_names: Optional[Sequence[str]] = None,
                      class_folders: Optional[Mapping[str, Tuple[int, ...]]] = None,
                      split: str = "test") -> LabelledSet:
    """:func:`read_labelled` under the set's name.

    Raises:
        ValueError: ``zero-shot set 'NAME': `` and the problem (see :func:`read_labelled`).
    """
    try:
        labelled = read_labelled(source, num_classes, img_key, label_key, sep, column_flags, class_names,
                                 class_folders, split)
    except (OSError, ValueError) as e:
        raise ValueError(f"zero-shot set {name!r}: {e}") from None
    labelled.name = name
    return labelled


# -- ImageFolder trees ----------------------------------------------------------------------------
@dataclass
class ImageFolderTree:
    """An ImageFolder tree: ``images`` maps each class folder's name (sorted) to its image files
    (sorted paths under ``root``); ``left_out`` lists the files in class folders that are not
    images by their suffix (:data:`IMAGE_FILE_SUFFIXES`)."""
    root: str
    images: Dict[str, List[str]]
    left_out: List[str]


def read_image_folder(root: str) -> ImageFolderTree:
    """The class folders of ``root`` and their images, as torchvision's ``ImageFolder`` finds
    them (see the module docstring); hidden files and folders are skipped.

    Raises:
        FileNotFoundError: no such folder. ValueError: no class folder, or an empty one (named).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: holds no class folder (an ImageFolder tree has one folder per class, "
                         "its images inside)")
    images: Dict[str, List[str]] = {}
    left_out: List[str] = []
    for folder in folders:
        found = []
        for path, subfolders, files in os.walk(os.path.join(root, folder), followlinks=True):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for file in sorted(f for f in files if not f.startswith(".")):
                (found if file.lower().endswith(IMAGE_FILE_SUFFIXES) else left_out).append(os.path.join(path, file))
        if not found:
            raise ValueError(f"{os.path.join(root, folder)}: empty class folder (no image file: "
                             f"{'/'.join(s[1:] for s in IMAGE_FILE_SUFFIXES)}); remove it or add its images")
        images[folder] = found
    return ImageFolderTree(root, images, left_out)


def parse_class_folders(path: str, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """A class-folder map: lines ``FOLDER<TAB>CLASSES``, CLASSES the 0-based indices of the
    folder's classes joined by ``;`` (ObjectNet's folders map to several ImageNet classes), or
    ``-`` for a folder to leave out. ``m2mix-data --from`` writes one for an ImageFolder source.

    Raises:
        FileNotFoundError: no such file. ValueError: naming the line: no tab, an index that is
            not a whole number or lies outside ``0..num_classes - 1``, a folder listed twice.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: class-folder map not found")
    mapping: Dict[str, Tuple[int, ...]] = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            folder, tab, classes = line.partition("\t")
            where = f"{path} line {line_number}"
            if not tab or not folder or not classes.strip():
                raise ValueError(f"{where}: expected FOLDER<TAB>CLASSES (class indices joined by ';', or '-'), "
                                 f"got {line[:80]!r}")
            if folder in mapping:
                raise ValueError(f"{where}: folder {folder!r} is listed twice")
            indices = []
            for part in ([] if classes.strip() == "-" else classes.split(";")):
                part = part.strip()
                if not part.isdigit() or int(part) >= num_classes:
                    raise ValueError(f"{where}: {part!r} is not a class index 0..{num_classes - 1} "
                                     f"(the class list has {num_classes} names)")
                indices.append(int(part))
            mapping[folder] = tuple(sorted(set(indices)))
    return mapping


def map_class_folders(folders: Sequence[str], class_names: Sequence[str],
                      class_folders: Optional[Mapping[str, Tuple[int, ...]]] = None,
                      where: str = "") -> Dict[str, Tuple[int, ...]]:
    """Folder -> its classes (indices of ``class_names``; empty: left out), each folder by the
    first rule that fits: ``class_folders``, its name equal to one class name, its name a class
    index.

    Raises:
        ValueError: folders that fit no rule (the first few named, with the fix), or a folder
            named like a class whose name the list holds twice.
    """
    by_name: Dict[str, List[int]] = {}
    for index, name in enumerate(class_names):
        by_name.setdefault(name, []).append(index)
    mapped: Dict[str, Tuple[int, ...]] = {}
    unmatched = []
    for folder in folders:
        if class_folders is not None and folder in class_folders:
            mapped[folder] = tuple(class_folders[folder])
        elif folder in by_name:
            if len(by_name[folder]) > 1:
                raise ValueError(f"{where}folder {folder!r} is named like classes {by_name[folder]}, which share "
                                 "that name: map it with a class-folder map (FOLDER<TAB>CLASS lines)")
            mapped[folder] = (by_name[folder][0],)
        elif folder.isdigit() and int(folder) < len(class_names):
            mapped[folder] = (int(folder),)
        else:
            unmatched.append(folder)
    if unmatched:
        listed = ", ".join(repr(f) for f in unmatched[:5]) + (f", ... ({len(unmatched)} in all)"
                                                               if len(unmatched) > 5 else "")
        raise ValueError(f"{where}folder(s) {listed} match no class: a folder maps to classes by a class-folder map "
                         f"(FOLDER<TAB>CLASSES lines; m2mix-data --from writes one, class_folders.tsv), by its name "
                         f"equal to a class name, or by its name a class index 0..{len(class_names) - 1}")
    return mapped


def load_image_folder(root: str, class_names: Sequence[str],
                      class_folders: Optional[Mapping[str, Tuple[int, ...]]] = None) -> LabelledSet:
    """An ImageFolder tree as a labelled set over the class list ``class_names``
    (:func:`map_class_folders`). Folders that map to the same classes share a label; labels
    follow the order of their classes. Where the folders map one to one onto the whole list,
    labels are class indices and ``class_groups`` is None, else the set is scored over its own
    classes
    (:class:`LabelledSet`). Files in class folders that are not images are left out with a
    warning.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_image_folder`, :func:`map_class_folders`;
            every folder left out (``-``).
    """
    tree = read_image_folder(root)
    if tree.left_out:
        warnings.warn(f"{root}: {len(tree.left_out)} file(s) in class folders are not images by their suffix and "
                      f"are left out, e.g. {tree.left_out[0]}", stacklevel=2)
    mapped = map_class_folders(list(tree.images), class_names, class_folders, where=f"{root}: ")
    # '-' in the class-folder map leaves a folder out (ObjectNet's 200 folders outside ImageNet's classes)
    class_groups: Optional[List[Tuple[int, ...]]] = sorted({classes for classes in mapped.values() if classes})
    if not class_groups:
        raise ValueError(f"{root}: the class-folder map leaves out every folder")
    label_of = {classes: label for label, classes in enumerate(class_groups)}
    images, labels = [], []
    for folder, files in tree.images.items():
        if mapped[folder]:
            images += files
            labels += [label_of[mapped[folder]]] * len(files)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    if class_groups == [(c,) for c in range(len(class_names))]:
        class_groups = None  # the whole class list, in its order: labels are class indices already
    return LabelledSet(root, root, images, labels_t, class_groups=class_groups)


def _items(text: str, separator: str) -> List[str]:
    """Non-empty stripped lines of a file, or the parts of ``text`` split at ``separator``."""
    if os.path.isfile(text):
        with open(text) as f:
            return [line.strip() for line in f if line.strip()]
    return [part.strip() for part in text.split(separator) if part.strip()]


def parse_class_names(text: str) -> List[str]:
    """Class names from a file (one per line) or a comma-separated list."""
    names = _items(text, ",")
    if not names:
        raise ValueError(f"no class names in {text!r} (give a file with one name per line, or a comma list)")
    return names


def parse_templates(text: str) -> List[str]:
    """Prompt templates from a file (one per line) or a ``;``-separated list; each needs ``{c}``."""
    templates = _items(text, ";")
    if not templates:
        raise ValueError(f"no templates in {text!r}")
    missing = [t for t in templates if "{c}" not in t]
    if missing:
        raise ValueError(f"every template needs {{c}} for the class name; {missing} lack it "
                         "(e.g. 'a photo of the number {c}')")
    return templates


# -- CLIP_benchmark's webdataset layout ------------------------------------------------------------
CLIP_BENCHMARK_TASKS = ("classification", "retrieval")


@dataclass
class ClipBenchmarkSet:
    """One split of a CLIP_benchmark webdataset folder (``clip_benchmark eval --dataset wds/NAME
    --dataset_root ROOT``): its shards in order, its task, and the folder's class names and
    templates (None where the folder has no such file)."""
    root: str
    split: str
    task: str  # "classification" or "retrieval"
    shards: List[str]
    class_names: Optional[List[str]]
    templates: Optional[List[str]]


CLIP_BENCHMARK_ROOT_FILES = ("dataset_type.txt", "zeroshot_classification_templates.txt")


def is_clip_benchmark_root(source: str) -> bool:
    """Whether a folder is read as CLIP_benchmark's layout rather than as an ImageFolder tree: it
    holds a file only CLIP_benchmark's layout has (:data:`CLIP_BENCHMARK_ROOT_FILES`), or a
    sub-folder holds ``nshards.txt`` or ``0.tar`` (a split's shards, as CLIP_benchmark names
    them). Files and shard patterns are not folders."""
    if not os.path.isdir(source):
        return False
    if any(os.path.isfile(os.path.join(source, name)) for name in CLIP_BENCHMARK_ROOT_FILES):
        return True
    with os.scandir(source) as entries:
        folders = [entry.path for entry in entries if entry.is_dir()]
    return any(os.path.isfile(os.path.join(folder, "nshards.txt")) or os.path.isfile(os.path.join(folder, "0.tar"))
               for folder in folders)


def _lines_as_clip_benchmark_reads_them(path: str) -> Optional[List[str]]:
    """Every line of a text file, stripped (its reader's ``[line.strip() for line in
    read().splitlines()]``), or None where there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()]


def _split_folders(root: str) -> List[str]:
    return sorted(entry for entry in os.listdir(root) if os.path.isdir(os.path.join(root, entry))
                  and any(name.endswith(".tar") for name in os.listdir(os.path.join(root, entry))))


def _numeric_order(name: str):
    stem = name[:-len(".tar")]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def clip_benchmark_set(root: str, split: str = "test") -> ClipBenchmarkSet:
    """The metadata of a CLIP_benchmark folder's ``split`` (no image is read).

    Raises:
        FileNotFoundError: no such folder, no ``ROOT/SPLIT`` folder (the message lists the splits
            there), or a shard that ``nshards.txt`` counts is missing.
        ValueError: ``nshards.txt`` is not a whole number, the split holds no shard, a dataset type
            other than classification or retrieval (multi-label sets are not read), or a template
            without ``{c}``.
    """
    where = f"CLIP_benchmark folder {root}"
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{where}: no such folder")
    kind = _lines_as_clip_benchmark_reads_them(os.path.join(root, "dataset_type.txt"))
    task = " ".join(kind).strip().lower() if kind is not None else "classification"
    if task not in CLIP_BENCHMARK_TASKS:
        raise ValueError(f"{where}: dataset_type.txt says {task!r}; only classification (no file, or "
                         "'classification') and 'retrieval' sets are read (multi-label sets are not)")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        found = _split_folders(root)
        raise FileNotFoundError(f"{where}: no split {split!r} (no folder {folder}); splits there: "
                                f"{', '.join(found) if found else 'none (no sub-folder holds .tar shards)'}; "
                                "choose one with --split (m2mix-analyze) or --zeroshot-split (--zeroshot-data)")
    count_file = os.path.join(folder, "nshards.txt")
    if os.path.isfile(count_file):
        with open(count_file, encoding="utf-8") as f:
            text = f.read().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{count_file}: expected the number of shards (a whole number >= 1), got {text[:20]!r}")
        shards = [os.path.join(folder, f"{i}.tar") for i in range(int(text))]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"{count_file} counts {len(shards)} shards (0.tar to {len(shards) - 1}.tar), "
                                    f"but {len(missing)} are missing (first: {missing[0]})")
    else:
        shards = [os.path.join(folder, name) for name in sorted(os.listdir(folder), key=_numeric_order)
                  if name.endswith(".tar")]
        if not shards:
            raise ValueError(f"{where}: {folder} holds no .tar shard")
    class_names = templates = None
    if task == "classification":
        class_names = _lines_as_clip_benchmark_reads_them(os.path.join(root, "classnames.txt"))
        templates = _lines_as_clip_benchmark_reads_them(os.path.join(root, "zeroshot_classification_templates.txt"))
        lacking = [t for t in templates or [] if "{c}" not in t]
        if lacking:
            raise ValueError(f"{root}/zeroshot_classification_templates.txt: every template needs {{c}} for the class "
                             f"name; {lacking[:3]} lack it")
    return ClipBenchmarkSet(root, split, task, shards, class_names, templates)


def _labelled_from_clip_benchmark(dataset: ClipBenchmarkSet):
    if dataset.task != "classification":
        raise ValueError(f"{dataset.root} is a {dataset.task} set (dataset_type.txt): it has captions, not labels; "
                         "zero-shot classification needs a classification set (evaluate retrieval sets with "
                         "m2mix-analyze --data ROOT)")
    return _labelled_from_shards(dataset.shards, CLIP_BENCHMARK_IMAGE_EXTENSIONS)


def load_clip_benchmark_pairs(dataset: ClipBenchmarkSet, class_names: Optional[Sequence[str]] = None,
                              templates: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> List[dict]:
    """Image-caption pairs of a CLIP_benchmark split, as :func:`load_pairs` gives them (the first
    ``limit``).

    - retrieval: a pair per caption (each line of the sample's ``txt``), all captions of a sample
      sharing its ``image_id`` (``SHARD:KEY``), no label;
    - classification: a pair per sample with its ``cls`` label; the caption is the sample's
      ``txt`` where it has one, else the first template filled with its class name
      (``class_names`` and ``templates`` default to the folder's).

    Raises:
        ValueError: a sample without an image, caption or label, or (classification without
            captions) no class names or templates to make captions from, or a label outside them.
    """
    extensions = CLIP_BENCHMARK_IMAGE_EXTENSIONS + ("txt", "cls")
    pairs: List[dict] = []
    names = list(class_names) if class_names is not None else dataset.class_names
    prompts = list(templates) if templates is not None else dataset.templates
    for key, sample in read_shard_samples(dataset.shards, extensions).items():
        if limit is not None and len(pairs) >= limit:
            break
        image = _shard_image(sample, CLIP_BENCHMARK_IMAGE_EXTENSIONS)
        if image is None:
            raise ValueError(f"sample {key} has no image ({'/'.join(CLIP_BENCHMARK_IMAGE_EXTENSIONS)})")
        image_id = key
        if dataset.task == "retrieval":
            if "txt" not in sample:
                raise ValueError(f"sample {key} of the retrieval set {dataset.root} has no .txt captions")
            captions = sample["txt"].decode("utf-8").splitlines()
            if not captions:
                raise ValueError(f"sample {key} of the retrieval set {dataset.root}: its .txt holds no caption")
            pairs.extend({"image": image, "caption": c, "label": None, "image_id": image_id} for c in captions)
            continue
        if "cls" not in sample:
            raise ValueError(f"sample {key} of the classification set {dataset.root} has no .cls label")
        label = _label(sample["cls"], f"sample {key} .cls")
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        else:
            if not names or not prompts:
                raise ValueError(f"{dataset.root}: its samples have no .txt caption, and captions are made from the "
                                 "class names and the first template, but "
                                 f"{'classnames.txt' if not names else 'zeroshot_classification_templates.txt'} "
                                 "is missing (or give --class-names and --templates)")
            if not 0 <= label < len(names):
                raise ValueError(f"sample {key} .cls: label {label} outside the {len(names)} class names")
            caption = prompts[0].replace("{c}", names[label])
        pairs.append({"image": image, "caption": caption, "label": label, "image_id": image_id})
    if not pairs:
        raise ValueError(f"{dataset.root}: split {dataset.split!r} holds no sample")
    return pairs[:limit]
