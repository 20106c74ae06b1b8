#!/usr/bin/env python
"""ObjectNet's folders as classes of ImageNet's 1000, added to a class-folder map.

    python examples/objectnet_class_folders.py --mappings objectnet-1.0/mappings \\
        --class-folders pairs/class_folders.tsv --out class_folders.tsv

ObjectNet (objectnet.dev) names its 313 image folders by its own classes; 113 of them overlap
ImageNet's 1000 classes, 125 ImageNet classes in all, some several to one ObjectNet class
("Alarm clock": analog clock, digital clock). Its download has the mappings (also in WiSE-FT's
``src/datasets/objectnet_metadata``):

- ``folder_to_objectnet_label.json``: folder -> ObjectNet class;
- ``objectnet_to_imagenet_1k.json``: ObjectNet class -> ImageNet class names joined by "; ";
- ``imagenet_to_label_2012_v2``: line i names the ImageNet class of the 2012 label id i;
- ``pytorch_to_imagenet_2012_id.json``: PyTorch's class index (the sorted-wnid order, the order
  of ImageNet's class list in OpenCLIP and of ``m2mix-data --from imagenet/train``) -> 2012 id.

The output holds the lines of ``--class-folders`` (the wnids of the ImageNet trees, as
``m2mix-data --from`` wrote them), then one line per ObjectNet folder: the class indices of its
ImageNet classes joined by ";", or "-" for the 200 folders outside ImageNet, which are left out.
With it, ``m2mix-wiseft`` and ``--zeroshot-data`` score ObjectNet over its 113 classes, the logit of
each the largest of its ImageNet classes' logits, as WiSE-FT evaluates it (WiSE-FT also crops a
2-pixel border off ObjectNet's images; this package does not).
"""

import argparse
import json
import os
import sys


def objectnet_lines(mappings):
    """``FOLDER<TAB>CLASSES`` per ObjectNet folder, CLASSES the PyTorch indices joined by ';' or '-'."""
    def load(name):
        path = os.path.join(mappings, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (ObjectNet's mappings folder holds it)")
        with open(path) as f:
            return json.load(f) if name.endswith(".json") else [line.strip() for line in f]
    folder_label = load("folder_to_objectnet_label.json")
    to_imagenet = load("objectnet_to_imagenet_1k.json")
    names_2012 = load("imagenet_to_label_2012_v2")
    pytorch_of_2012 = {int(v): int(k) for k, v in load("pytorch_to_imagenet_2012_id.json").items()}
    index_of_name = {name: pytorch_of_2012[i] for i, name in enumerate(names_2012) if name}
    lines = []
    for folder in sorted(folder_label):
        label = folder_label[folder]
        if label not in to_imagenet:
            lines.append(f"{folder}\t-")
            continue
        names = [n.strip() for n in to_imagenet[label].split(";")]
        unknown = [n for n in names if n not in index_of_name]
        if unknown:
            raise ValueError(f"ObjectNet class {label!r}: ImageNet class(es) {unknown} are not in "
                             "imagenet_to_label_2012_v2")
        lines.append(f"{folder}\t{';'.join(str(i) for i in sorted(index_of_name[n] for n in names))}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mappings", required=True, help="ObjectNet's mappings folder (objectnet-1.0/mappings).")
    parser.add_argument("--class-folders", required=True, help="The ImageNet class-folder map (class_folders.tsv).")
    parser.add_argument("--out", required=True, help="The map with ObjectNet's folders added.")
    args = parser.parse_args(argv)
    try:
        lines = objectnet_lines(args.mappings)
        with open(args.class_folders) as f:
            imagenet = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, ValueError) as e:
        print(f"objectnet_class_folders: error: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        f.write("".join(f"{line}\n" for line in imagenet + lines))
    kept = sum(1 for line in lines if not line.endswith("\t-"))
    print(f"{args.out}: {len(imagenet)} ImageNet folders, {len(lines)} ObjectNet folders ({kept} mapped to ImageNet "
          f"classes, {len(lines) - kept} left out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
