"""Core benchmark: M2MixLoss over ClipLoss and M2MixSigLipLoss over SigLipLoss (fwd + bwd), and
embedding_geometry time and memory.

    python benchmarks/bench_core.py [--sizes 256 1024 4096] [--geometry 5000 25000]
    python benchmarks/bench_core.py --device cuda --geometry   # on a GPU: also proves no host sync

With ``--device cuda`` every M2MixLoss and M2MixSigLipLoss step runs under ``torch.cuda.set_sync_debug_mode("error")``,
so any device-to-host synchronisation inside the loss raises.

Ratios are measured in one run with the two losses interleaved (medians of repeats),
so a noisy machine moves both sides alike. Peak memory of embedding_geometry is measured
in a fresh subprocess per N (peak RSS above the RSS with the inputs already allocated).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from m2mix_openclip import M2MixLoss, M2MixSigLipLoss, embedding_geometry


def step_time(loss_fn, x0, y0, scale, strict_sync=False, bias=None):
    x = x0.clone().requires_grad_()
    y = y0.clone().requires_grad_()
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    if strict_sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        extra = () if bias is None else (bias,)
        loss = loss_fn(F.normalize(x, dim=1), F.normalize(y, dim=1), scale, *extra)
        loss.backward()
    finally:
        if strict_sync:
            torch.cuda.set_sync_debug_mode(0)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def loss_ratio(batch, dim, repeats, device="cpu", family="clip"):
    """Median fwd+bwd time of the m²-Mix loss over OpenCLIP's (``family``: clip or siglip)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, dim, generator=g).to(device), torch.randn(batch, dim, generator=g).to(device)
    if family == "siglip":  # SigLIP's initial scale and bias; the m²-Mix term at its defaults
        scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
        clip, m2mix = SigLipLoss(), M2MixSigLipLoss()
    else:
        scale, bias = torch.tensor(100.0, device=device), None
        clip, m2mix = ClipLoss(), M2MixLoss()
    strict = device == "cuda"
    step_time(clip, x, y, scale, bias=bias)  # warm-up; the first m²-Mix call checks its inputs once (one sync)
    step_time(m2mix, x, y, scale, bias=bias)
    clip_t, m2mix_t = [], []
    for _ in range(repeats):
        clip_t.append(step_time(clip, x, y, scale, bias=bias))
        m2mix_t.append(step_time(m2mix, x, y, scale, strict_sync=strict, bias=bias))
    c, m = statistics.median(clip_t), statistics.median(m2mix_t)
    return {"batch": batch, "dim": dim, "clip_ms": 1e3 * c, "m2mix_ms": 1e3 * m, "ratio": m / c}


def geometry_child(n, dim):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    y = F.normalize(x + torch.randn(n, dim, generator=g), dim=1)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS high-water mark (Linux)
        f.write("5")
    base = _rss_kib("VmHWM")
    start = time.perf_counter()
    embedding_geometry(x, y)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(json.dumps({"n": n, "dim": dim, "seconds": seconds, "extra_peak_mib": (peak - base) / 1024}))


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--geometry", type=int, nargs="*", default=[5000, 25000])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: sync debug mode 'error').")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return geometry_child(args.child, args.dim)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"M2MixLoss (m2mix on, defaults) vs ClipLoss on {args.device}, forward + backward, target ratio <= 2.0"
          + (" (M2MixLoss steps under sync debug mode 'error')" if args.device == "cuda" else ""))
    for batch in args.sizes:
        r = loss_ratio(batch, args.dim, args.repeats if batch < 4096 else max(3, args.repeats // 2), args.device)
        print(f"  B={r['batch']:5d} D={r['dim']}: ClipLoss {r['clip_ms']:8.1f} ms  "
              f"M2MixLoss {r['m2mix_ms']:8.1f} ms  ratio {r['ratio']:.2f}")
    print(f"M2MixSigLipLoss (sigmoid m²-Mix on, defaults) vs SigLipLoss on {args.device}, forward + backward, "
          "target ratio <= 2.0")
    for batch in args.sizes:
        r = loss_ratio(batch, args.dim, args.repeats if batch < 4096 else max(3, args.repeats // 2), args.device,
                       family="siglip")
        print(f"  B={r['batch']:5d} D={r['dim']}: SigLipLoss {r['clip_ms']:8.1f} ms  "
              f"M2MixSigLipLoss {r['m2mix_ms']:8.1f} ms  ratio {r['ratio']:.2f}")
    print("embedding_geometry (all 8 metrics), fresh process per N")
    for n in args.geometry:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  N={r['n']:6d} D={r['dim']}: {r['seconds']:6.2f} s, extra peak memory {r['extra_peak_mib']:7.1f} MiB")


if __name__ == "__main__":
    main()
