"""Retrieval benchmark: multi-caption R@K (``grouped_retrieval``) on 5,000 images x 25,000
captions (five per image, the size of the Flickr30k / COCO 5k test splits), time and extra peak
memory, each setting in a fresh subprocess (peak RSS above the RSS with the inputs allocated).

    python benchmarks/bench_retrieval.py [--images 5000 --per-image 5 --dim 512]

The default blocks hold about 2**22 scores; ``--chunks`` adds settings (0 = the whole matrix in
one block, what an unchunked computation would hold at once).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import _rss_kib  # noqa: E402

from m2mix_openclip.evaluation import grouped_retrieval  # noqa: E402


def child(images, per_image, dim, chunk):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(images, dim, generator=g), dim=1)
    caption_image = torch.arange(images).repeat_interleave(per_image)
    y = F.normalize(x[caption_image] + 0.25 * torch.randn(len(caption_image), dim, generator=g), dim=1)
    labels = caption_image % 10
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS high-water mark (Linux)
        f.write("5")
    base = _rss_kib("VmHWM")
    start = time.perf_counter()
    r = grouped_retrieval(x, y, caption_image, labels=labels,
                          chunk_size=None if chunk < 0 else (chunk or max(images, len(caption_image))))
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(json.dumps({"chunk": chunk, "seconds": seconds, "extra_peak_mib": (peak - base) / 1024,
                      "i2t_R@1": r["image_to_text_R@1"], "t2i_R@1": r["text_to_image_R@1"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="*", default=[0], help="Extra block sizes (0: one block).")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.images, args.per_image, args.dim, args.child)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; grouped_retrieval "
          f"(R@1/5/10, label precision, ECE, both directions) on {args.images} images x "
          f"{args.images * args.per_image} captions, D={args.dim}")
    for chunk in [-1] + list(args.chunks):
        out = subprocess.run([sys.executable, __file__, "--child", str(chunk), "--images", str(args.images),
                              "--per-image", str(args.per_image), "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        what = "default blocks" if chunk < 0 else ("one block (unchunked)" if chunk == 0 else f"{chunk} rows/block")
        print(f"  {what:24s}: {r['seconds']:6.2f} s, extra peak memory {r['extra_peak_mib']:8.1f} MiB "
              f"(i2t R@1 {r['i2t_R@1']:.3f}, t2i R@1 {r['t2i_R@1']:.3f})")


if __name__ == "__main__":
    main()
