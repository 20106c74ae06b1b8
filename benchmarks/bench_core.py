"""Core benchmark: each m²-Mix loss over OpenCLIP's loss of its family (forward + backward), and
embedding_geometry time and memory.

    python benchmarks/bench_core.py [--sizes 256 1024 4096] [--families clip siglip] [--geometry 5000 25000]
    python benchmarks/bench_core.py --device cuda --autocast bf16 --geometry   # on a GPU: also proves no host sync

Families: clip (M2MixLoss / ClipLoss), siglip (M2MixSigLipLoss at the --siglip default weight /
SigLipLoss; siglip-apart: the same with ``reuse_products = False``), coca (M2MixCoCaLoss /
CoCaLoss, small caption logits) and distill (M2MixDistillLoss / DistillClipLoss). With
``--device cuda`` every m²-Mix step runs under
``torch.cuda.set_sync_debug_mode("error")``, so any device-to-host synchronisation inside the
loss raises, and TF32 matmuls are on, as OpenCLIP's trainer sets them.

Ratios are measured in one run with the two losses interleaved (medians of repeats),
so a noisy machine moves both sides alike; ``--clock cpu`` times the CPU of one thread, which
other work on a shared machine barely moves. Peak memory of embedding_geometry is measured
in a fresh subprocess per N (peak RSS above the RSS with the inputs already allocated).
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from m2mix_openclip import M2MixLoss, M2MixSigLipLoss, embedding_geometry

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_time(loss_fn, x0, y0, rest, strict_sync=False, autocast_dtype=None, clock="wall"):
    """Seconds of one forward (under autocast when ``autocast_dtype``, as the trainer runs it)
    and backward of ``loss_fn(normalize(x), normalize(y), *rest)``; ``clock="cpu"``: the
    process's CPU time (with one thread: what other processes on a shared machine barely move)."""
    x = x0.clone().requires_grad_()
    y = y0.clone().requires_grad_()
    cuda = x.device.type == "cuda"
    autocast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    if cuda:
        torch.cuda.synchronize()
    now = CLOCKS[clock]
    start = now()
    if strict_sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with autocast:
            loss = loss_fn(F.normalize(x, dim=1), F.normalize(y, dim=1), *rest)
            total = sum(loss) if isinstance(loss, tuple) else loss
        total.backward()
    finally:
        if strict_sync:
            torch.cuda.set_sync_debug_mode(0)
    if cuda:
        torch.cuda.synchronize()
    return now() - start


def family_losses(family, batch, dim, device):
    """(OpenCLIP's loss, the m²-Mix loss at its defaults, the arguments after the two features)."""
    from open_clip.loss import CoCaLoss, DistillClipLoss

    from m2mix_openclip import M2MixCoCaLoss, M2MixDistillLoss
    from m2mix_openclip.losses.options import siglip_default_weight

    g = torch.Generator().manual_seed(1)
    if family in ("siglip", "siglip-apart"):  # SigLIP's initial scale and bias; the --siglip default weight
        rest = (torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device))
        m2mix = M2MixSigLipLoss(m2mix_weight=siglip_default_weight(batch))
        m2mix.reuse_products = family == "siglip"  # siglip-apart: the two terms computed apart
        return SigLipLoss(), m2mix, rest
    scale = torch.tensor(100.0, device=device)
    if family == "clip":
        return ClipLoss(), M2MixLoss(), (scale,)
    if family == "distill":
        teacher = [F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device) for _ in range(2)]
        return DistillClipLoss(), M2MixDistillLoss(), (scale, *teacher, torch.tensor(100.0, device=device))
    if family == "coca":  # small caption logits (8 tokens, 64 words): the contrastive and mixing parts dominate
        logits = torch.randn(batch, 8, 64, generator=g).to(device)
        labels = torch.randint(0, 64, (batch, 8), generator=g).to(device)
        return CoCaLoss(2.0, 1.0), M2MixCoCaLoss(2.0, 1.0), (logits, labels, scale)
    raise ValueError(f"unknown family {family!r}")


def loss_ratio(batch, dim, repeats, device="cpu", family="clip", autocast_dtype=None, strict=None, clock="wall"):
    """Median fwd+bwd time of the m²-Mix loss over OpenCLIP's loss of ``family`` (clip, siglip,
    coca, distill), interleaved; on CUDA (or with ``strict``) the m²-Mix steps run under
    ``torch.cuda.set_sync_debug_mode("error")``."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, dim, generator=g).to(device), torch.randn(batch, dim, generator=g).to(device)
    reference, m2mix, rest = family_losses(family, batch, dim, device)
    strict = device == "cuda" if strict is None else strict
    # warm-up; the first m²-Mix call checks its inputs once (one sync)
    step_time(reference, x, y, rest, autocast_dtype=autocast_dtype)
    step_time(m2mix, x, y, rest, autocast_dtype=autocast_dtype)
    reference_t, m2mix_t = [], []
    for _ in range(repeats):
        reference_t.append(step_time(reference, x, y, rest, autocast_dtype=autocast_dtype, clock=clock))
        m2mix_t.append(step_time(m2mix, x, y, rest, strict_sync=strict, autocast_dtype=autocast_dtype, clock=clock))
    c, m = statistics.median(reference_t), statistics.median(m2mix_t)
    return {"batch": batch, "dim": dim, "clip_ms": 1e3 * c, "m2mix_ms": 1e3 * m, "ratio": m / c}


def products_floor(batch, dim, repeats, device="cpu", clock="wall"):
    """What the (B, B, D) products alone cost: the seven of M2MixSigLipLoss's own block (three
    forward, four backward) over SigLIP's three, in one interleaved run (medians): the ratio the
    sigmoid loss would have if nothing but its products took time."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, dim, generator=g).to(device), torch.randn(batch, dim, generator=g).to(device)
    gram = torch.rand(batch, batch, generator=g).to(device)

    def timed(count):
        if device == "cuda":
            torch.cuda.synchronize()
        start = CLOCKS[clock]()
        for i in range(count):
            (x @ y.T) if i % 3 == 0 else (gram @ y) if i % 3 == 1 else (gram.T @ x)
        if device == "cuda":
            torch.cuda.synchronize()
        return CLOCKS[clock]() - start

    timed(3)
    siglip_t, ours_t = [], []
    for _ in range(repeats):
        siglip_t.append(timed(3))
        ours_t.append(timed(7))
    return statistics.median(ours_t) / statistics.median(siglip_t)


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


LOSS_NAMES = {"clip": ("ClipLoss", "M2MixLoss"), "siglip": ("SigLipLoss", "M2MixSigLipLoss"),
              "siglip-apart": ("SigLipLoss", "M2MixSigLipLoss (reuse_products=False)"),
              "coca": ("CoCaLoss", "M2MixCoCaLoss"), "distill": ("DistillClipLoss", "M2MixDistillLoss")}
# what each ratio is held to: the softmax term's target, and the sigmoid term's floor in B x B x D
# products (7 against SigLIP's 3: docs/performance.md)
LOSS_TARGETS = {"clip": "target <= 2.0", "siglip": "floor of the products 7/3 = 2.33",
                "siglip-apart": "floor of the products 9/3 = 3", "coca": "as clip", "distill": "as clip"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families", nargs="+", choices=list(LOSS_NAMES), default=["clip", "siglip"])
    parser.add_argument("--geometry", type=int, nargs="*", default=[5000, 25000])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: sync debug mode 'error').")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="Forward passes under torch.autocast, as the trainer's --precision amp_bf16 runs them.")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall (default), or cpu: the CPU time of one thread (torch.set_num_threads(1)), "
                             "for a CPU shared with other work.")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return geometry_child(args.child, args.dim)
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu measures the CPU")
        torch.set_num_threads(1)

    autocast_dtype = torch.bfloat16 if args.autocast == "bf16" else None
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as OpenCLIP's trainer sets it on a GPU
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, autocast {args.autocast}, "
          f"{args.clock} clock")
    for family in args.families:
        reference, ours = LOSS_NAMES[family]
        print(f"{ours} (defaults) vs {reference}, forward + backward ({LOSS_TARGETS[family]})"
              + (f" ({ours} steps under sync debug mode 'error')" if args.device == "cuda" else ""))
        for batch in args.sizes:
            repeats = args.repeats if batch < 4096 else max(3, args.repeats // 2)
            r = loss_ratio(batch, args.dim, repeats, args.device, family=family, autocast_dtype=autocast_dtype,
                           clock=args.clock)
            floor = ("  (its products alone: "
                     f"{products_floor(batch, args.dim, args.repeats, args.device, args.clock):.2f})"
                     if family == "siglip" else "")
            print(f"  B={r['batch']:5d} D={r['dim']}: {reference} {r['clip_ms']:8.1f} ms  "
                  f"{ours} {r['m2mix_ms']:8.1f} ms  ratio {r['ratio']:.2f}{floor}", flush=True)
    print("embedding_geometry (all 8 metrics), fresh process per N")
    for n in args.geometry:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  N={r['n']:6d} D={r['dim']}: {r['seconds']:6.2f} s, extra peak memory {r['extra_peak_mib']:7.1f} MiB")


if __name__ == "__main__":
    main()
