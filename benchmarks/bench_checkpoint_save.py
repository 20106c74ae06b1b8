"""What writing a checkpoint whole costs: ``plugins.save_checkpoint`` (the finite-weights check, a
temporary file, a flush to the disk, a rename) over OpenCLIP's plain ``torch.save`` to the same folder.

    python benchmarks/bench_checkpoint_save.py [--megabytes 400] [--dir logs] [--repeats 5]

The two saves alternate (medians of repeats), so a noisy machine moves both sides alike; the
finite-weights check is timed on its own too. Use ``--dir`` on the disk your runs write to: the
flush to the disk is most of the cost, and it depends on the disk.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from m2mix_openclip.integration.plugins import nonfinite_tensor, save_checkpoint


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=400, help="checkpoint size (float32 tensors of 4 MB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tensors = max(1, args.megabytes // 4)
    checkpoint = {"epoch": 1, "state_dict": {f"layer{i}.weight": torch.randn(1000, 1000) for i in range(tensors)},
                  "optimizer": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        plain, whole = [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: torch.save(checkpoint, os.path.join(folder, "plain.pt"))))
            whole.append(timed(lambda: save_checkpoint(checkpoint, os.path.join(folder, "whole.pt"))))
        check = [timed(lambda: nonfinite_tensor(checkpoint["state_dict"])) for _ in range(args.repeats)]
        size = os.path.getsize(os.path.join(folder, "whole.pt"))
    result = {"megabytes": round(size / 1e6, 1), "torch_save_s": statistics.median(plain),
              "save_checkpoint_s": statistics.median(whole), "finite_check_s": statistics.median(check),
              "ratio": statistics.median(whole) / statistics.median(plain)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
