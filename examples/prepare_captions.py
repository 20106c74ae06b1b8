#!/usr/bin/env python
"""Flickr30k or MS-COCO captions -> OpenCLIP CSV (and optionally webdataset shards).

    # Flickr30k: the token file (``1000092795.jpg#0<TAB>Two young guys ...``) and the image folder
    python examples/prepare_captions.py --format flickr-token --captions results_20130124.token \\
        --images flickr30k-images --out data/flickr30k_train.csv [--split-file train.txt] [--shards data/shards]

    # MS-COCO: captions_train2017.json and train2017/
    python examples/prepare_captions.py --format coco-json --captions annotations/captions_train2017.json \\
        --images train2017 --out data/coco_train.csv

One row per caption (an image with 5 captions gives 5 rows), tab-separated, columns
``filepath``, ``title`` and ``image_id`` (the image's file name): use
``--csv-img-key filepath --csv-caption-key title`` to train, and ``m2mix-analyze --image-id-key image_id``
(or the default grouping by path) so that retrieval counts any of an image's captions.

``--one-caption-out PATH`` also writes a CSV with one caption per image (the first listed), as the
reference implementation (changdaeoh/multimodal-mixup) fine-tunes:

    python examples/prepare_captions.py --format flickr-token --captions results_20130124.token \
        --images flickr30k-images --split-file train.txt --out data/flickr30k_train.csv \
        --one-caption-out data/flickr30k_train_onecap.csv
"""

import argparse
import csv
import io
import json
import os
import tarfile


def read_flickr_token(path, split_images=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            if "\t" not in line or "#" not in line.split("\t", 1)[0]:
                raise ValueError(f"{path}:{line_no}: expected 'IMAGE.jpg#N<TAB>caption', got {line[:80]!r}")
            key, caption = line.split("\t", 1)
            image = key.split("#", 1)[0]
            if split_images is None or image in split_images:
                rows.append((image, caption.strip()))
    return rows


def read_coco_json(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    names = {im["id"]: im["file_name"] for im in data["images"]}
    return [(names[a["image_id"]], a["caption"].strip()) for a in data["annotations"]]


def write_csv(rows, images_dir, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    missing = [img for img, _ in rows if not os.path.exists(os.path.join(images_dir, img))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing from {images_dir}, e.g. {missing[0]}")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title", "image_id"])
        for img, caption in rows:
            w.writerow([os.path.abspath(os.path.join(images_dir, img)), caption, img])


def first_caption_per_image(rows):
    """The first (image, caption) row of each image, in the order images first appear."""
    seen = set()
    return [(img, caption) for img, caption in rows if not (img in seen or seen.add(img))]


def write_shards(rows, images_dir, folder, shard_size):
    os.makedirs(folder, exist_ok=True)
    n = 0
    for start in range(0, len(rows), shard_size):
        with tarfile.open(os.path.join(folder, f"shard-{n:06d}.tar"), "w") as tar:
            for i, (img, caption) in enumerate(rows[start:start + shard_size], start):
                ext = os.path.splitext(img)[1].lstrip(".").lower() or "jpg"
                for member, payload in ((f"{i:09d}.{ext}", open(os.path.join(images_dir, img), "rb").read()),
                                        (f"{i:09d}.txt", caption.encode("utf-8"))):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        n += 1
    return os.path.join(folder, f"shard-{{000000..{n - 1:06d}}}.tar"), len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["flickr-token", "coco-json"], required=True)
    p.add_argument("--captions", required=True)
    p.add_argument("--images", required=True, help="Folder holding the image files.")
    p.add_argument("--out", required=True, help="CSV to write.")
    p.add_argument("--split-file", help="Flickr30k: a file listing this split's image names, one per line.")
    p.add_argument("--one-caption-out", help="Also write a CSV with one caption (the first) per image here.")
    p.add_argument("--shards", help="Also write webdataset shards into this folder.")
    p.add_argument("--shard-size", type=int, default=10000)
    args = p.parse_args(argv)
    if args.format == "flickr-token":
        split = None
        if args.split_file:
            with open(args.split_file) as f:
                split = {line.strip() for line in f if line.strip()}
        rows = read_flickr_token(args.captions, split)
    else:
        rows = read_coco_json(args.captions)
    write_csv(rows, args.images, args.out)
    print(f"wrote {len(rows)} captions of {len({img for img, _ in rows})} images to {args.out}")
    if args.one_caption_out:
        single = first_caption_per_image(rows)
        write_csv(single, args.images, args.one_caption_out)
        print(f"wrote {len(single)} captions (one per image) to {args.one_caption_out}")
    if args.shards:
        pattern, n = write_shards(rows, args.images, args.shards, args.shard_size)
        print(f"wrote {n} samples to {pattern} (use --train-num-samples {n})")


if __name__ == "__main__":
    main()
