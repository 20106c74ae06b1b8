"""The GPU acceptance run of m2mix-openclip; ``bash benchmarks/gpu_check.sh`` installs and runs it.

    python benchmarks/gpu_check.py install --wheels DIR --site SITE   # stdlib only: before anything imports
    PYTHONPATH=SITE python benchmarks/gpu_check.py run [--cpu-smoke] [--out DIR]

``run`` checks, on CUDA with bf16 autocast (``--cpu-smoke``: the same steps on the CPU at tiny sizes):

1. every family's m²-Mix loss (clip, siglip, coca, distill; defaults) forward and backward under
   ``torch.cuda.set_sync_debug_mode("error")`` (on the CPU: on ``meta`` tensors, which fail at
   any host read), after one warm-up call (the first call checks its inputs, one sync);
2. the fwd+bwd time of each m²-Mix loss over OpenCLIP's loss of its family at B = 4096 and 16384
   (``bench_core.loss_ratio``, D = 512; TF32 matmuls on, as OpenCLIP's trainer sets them), for
   SigLIP also with ``reuse_products = False`` (the terms apart: which of the two a GPU prefers);
3. training throughput and peak memory of ``--loss m2mix`` over ``--loss clip`` for each family
   through OpenCLIP's trainer at ViT-B-32 (random weights), batch 256, synthetic data,
   ``--precision amp_bf16`` (``bench_train.measure``); a second round only when it fits the
   time budget;

then prints one markdown table with a row per family and writes it, with every figure, to
``OUT/gpu_check.md`` and ``OUT/gpu_check.json``. Exit status 1 when a check fails (a host sync,
a step that raises, a non-finite loss), and on a GPU also when a target is missed (throughput
ratio < 0.97, peak memory ratio > 1.10, softmax loss ratio > 2.0); the smoke run's ratios are
too small to judge and are not held to the targets.
"""

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FAMILIES = ("clip", "siglip", "coca", "distill")
# What the run needs besides torch (and numpy, pillow, tqdm, huggingface_hub, timm, which OpenCLIP's
# wheel asks for and a GPU machine with torch has): (module, distribution), in installation order.
NEEDED = [("six", "six"), ("dateutil", "python-dateutil"), ("pytz", "pytz"), ("tzdata", "tzdata"),
          ("pandas", "pandas"), ("fsspec", "fsspec"), ("regex", "regex"), ("wcwidth", "wcwidth"), ("ftfy", "ftfy"),
          ("braceexpand", "braceexpand"), ("webdataset", "webdataset"), ("open_clip", "open_clip_torch")]
NEVER_INSTALLED = ("torch", "torchvision", "triton", "nvidia", "numpy")  # the machine's own, left alone
TARGETS = {"throughput": 0.97, "memory": 1.10, "softmax_loss": 2.0}


# -- install: the standard library only ---------------------------------------------------------------
def _normalised(distribution):
    return distribution.lower().replace("_", "-")


def install(wheels, site):
    """Installs from ``wheels`` (no index, no dependencies) into ``site`` what is not importable
    yet of :data:`NEEDED`, and this package: built from this checkout where setuptools is at hand
    (so that the code checked is the checkout's), else its wheel from the folder; never torch.
    Returns an exit status."""
    if not os.path.isdir(wheels):
        print(f"gpu_check: error: --wheels {wheels} is not a folder (docs/performance.md: the wheel folder)",
              file=sys.stderr)
        return 2
    files = {_normalised(f.split("-")[0]): os.path.join(wheels, f) for f in sorted(os.listdir(wheels))
             if f.endswith(".whl")}
    ignored = [d for d in files if d.startswith(NEVER_INSTALLED)]
    if ignored:
        print(f"gpu_check: left alone (the machine's own): {', '.join(ignored)}")
    os.makedirs(site, exist_ok=True)
    chosen, missing = [], []
    for module, distribution in NEEDED:
        if importlib.util.find_spec(module) is None:
            wheel = files.get(_normalised(distribution))
            (chosen if wheel else missing).append(wheel or distribution)
    if missing:
        print(f"gpu_check: error: not importable here and no wheel in {wheels}: {', '.join(missing)} "
              "(docs/performance.md: the wheel folder)", file=sys.stderr)
        return 2
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--no-index", "--no-deps", "--target", site]
    if chosen:
        print(f"gpu_check: installing {', '.join(os.path.basename(w) for w in chosen)}", flush=True)
        if subprocess.run(pip + chosen).returncode != 0:
            print("gpu_check: error: pip could not install them", file=sys.stderr)
            return 2
    ours = files.get("m2mix-openclip")
    if importlib.util.find_spec("setuptools") is not None:
        print(f"gpu_check: installing m2mix-openclip from {REPO}", flush=True)
        if subprocess.run(pip + ["--no-build-isolation", REPO]).returncode == 0:
            return 0
    if ours is None:
        print(f"gpu_check: error: m2mix-openclip cannot be built here (setuptools >= 64 missing) and {wheels} "
              "holds no wheel of it: `pip wheel --no-deps --wheel-dir DIR .` in this checkout", file=sys.stderr)
        return 2
    print(f"gpu_check: installing {os.path.basename(ours)} (make it from this checkout: it is what is checked)",
          flush=True)
    return 0 if subprocess.run(pip + [ours]).returncode == 0 else 2


# -- run ------------------------------------------------------------------------------------------------
def environment_line(device):
    import open_clip
    import torch

    import m2mix_openclip
    where = os.path.dirname(os.path.dirname(open_clip.__file__))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU (CPU smoke run)"
    return (f"{datetime.date.today().isoformat()}, {gpu}, torch {torch.__version__}, open_clip_torch "
            f"{open_clip.__version__} ({where}), m2mix-openclip {m2mix_openclip.__version__} "
            f"({os.path.dirname(os.path.dirname(m2mix_openclip.__file__))})")


def sync_check(family, device, batch, dim):
    """None, or what went wrong: forward and backward of the family's m²-Mix loss at its defaults
    with no host sync (CUDA: sync debug mode 'error' under bf16 autocast; CPU: meta tensors)."""
    import torch
    import torch.nn.functional as F
    from bench_core import family_losses

    on_meta = device != "cuda"
    where = "meta" if on_meta else device
    _, loss_fn, rest = family_losses(family, batch, dim, where)
    g = torch.Generator().manual_seed(2)
    x0, y0 = torch.randn(batch, dim, generator=g).to(where), torch.randn(batch, dim, generator=g).to(where)

    def step():
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        if on_meta:
            total = loss_fn(F.normalize(x, dim=1), F.normalize(y, dim=1), *rest, output_dict=True)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total = loss_fn(F.normalize(x, dim=1), F.normalize(y, dim=1), *rest, output_dict=True)
        total = sum(total.values())
        total.backward()
        return total, x.grad

    try:
        step()  # the first call checks unit norms once (one sync)
        if not on_meta:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            results = [step() for _ in range(3)]
        finally:
            if not on_meta:
                torch.cuda.set_sync_debug_mode(0)
        if not on_meta:
            bad = [v for v, grad in results if not (torch.isfinite(v) and torch.isfinite(grad).all())]
            if bad:
                return "a non-finite loss or gradient"
    except Exception as e:  # the check's verdict: reported in the table, the run goes on
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def run(args):
    sys.path.insert(0, HERE)
    import torch
    from bench_core import loss_ratio
    from bench_train import measure

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; --cpu-smoke runs the same steps on the CPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget_minutes * 60
    out = args.out
    os.makedirs(out, exist_ok=True)
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True  # as OpenCLIP's trainer sets it on a GPU
    settings = {
        "loss_sizes": [64, 128] if smoke else [4096, 16384], "dim": 64 if smoke else 512,
        "repeats": 2 if smoke else 5, "sync_batch": 16 if smoke else 4096,
        "train": dict(size="tiny", device="cpu", precision="fp32", batch_size=8, steps=5, warmup=2, rounds=1,
                      data="synthetic", workers=0) if smoke else
        dict(size="ViT-B-32", device="cuda", precision="amp_bf16", batch_size=256, steps=25, warmup=5, rounds=2,
             data="synthetic", workers=8),
    }
    header = environment_line(device)
    print(f"gpu_check: {header}", flush=True)
    failures, report = [], {"environment": header, "settings": settings, "families": {f: {} for f in FAMILIES}}

    print("1. host syncs in forward + backward (defaults)", flush=True)
    for family in FAMILIES:
        problem = sync_check(family, device, settings["sync_batch"], settings["dim"])
        report["families"][family]["sync"] = problem or "none"
        print(f"  {family:7s}: {'no host sync' if problem is None else 'FAILED: ' + problem}", flush=True)
        if problem:
            failures.append(f"{family}: host sync check: {problem}")

    print("2. loss forward + backward, m2mix / OpenCLIP's", flush=True)
    autocast = None if smoke else torch.bfloat16
    for family in ("clip", "siglip", "siglip-apart", "coca", "distill"):
        for batch in settings["loss_sizes"]:
            try:
                r = loss_ratio(batch, settings["dim"], settings["repeats"], device, family, autocast)
            except Exception as e:
                failures.append(f"{family}: loss ratio at B={batch}: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            # siglip-apart: M2MixSigLipLoss with reuse_products = False, shown beside siglip's
            row, key = ("siglip", "loss_ratio_apart") if family == "siglip-apart" else (family, "loss_ratio")
            report["families"][row][f"{key}_{batch}"] = r
            print(f"  {family:7s} B={batch:6d}: {r['clip_ms']:8.2f} ms -> {r['m2mix_ms']:8.2f} ms, "
                  f"ratio {r['ratio']:.2f}", flush=True)
            if not smoke and family == "clip" and r["ratio"] > TARGETS["softmax_loss"]:
                failures.append(f"clip: loss ratio {r['ratio']:.2f} at B={batch} > {TARGETS['softmax_loss']}")

    print("3. training through OpenCLIP's trainer, --loss m2mix / --loss clip", flush=True)
    try:
        trained = measure(FAMILIES, work=os.path.join(out, "train"), deadline=deadline, **settings["train"])
    except Exception as e:
        failures.append(f"training runs: {type(e).__name__}: {e}")
        traceback.print_exc()
        trained = {}
    for family, r in trained.items():
        report["families"][family]["train"] = {k: r[k] for k in ("median", "rounds", "throughput_ratio",
                                                                 "memory_ratio")}
        if not smoke and r["throughput_ratio"] < TARGETS["throughput"]:
            failures.append(f"{family}: throughput ratio {r['throughput_ratio']:.3f} < {TARGETS['throughput']}")
        if not smoke and r["memory_ratio"] > TARGETS["memory"]:
            failures.append(f"{family}: peak memory ratio {r['memory_ratio']:.3f} > {TARGETS['memory']}")

    text = summary_table(report, settings, smoke, time.monotonic() - start)
    print("\n" + text)
    report["failures"] = failures
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    if failures:
        print("\ngpu_check: FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"\ngpu_check: passed ({'CPU smoke run' if smoke else 'GPU'}); {out}/gpu_check.md")
    return 0


def summary_table(report, settings, smoke, seconds):
    train = settings["train"]
    sizes = settings["loss_sizes"]
    lines = [f"gpu_check, {report['environment']}", "",
             "| family | host syncs in fwd+bwd | train samples/s m2mix / clip | peak memory m2mix / clip | "
             + " | ".join(f"loss fwd+bwd m2mix / OpenCLIP, B = {b}" for b in sizes) + " |",
             "|---|---|---|---|" + "---|" * len(sizes)]
    for family, r in report["families"].items():
        trained = r.get("train")
        cells = [family, "none" if r.get("sync") == "none" else f"FAILED ({r.get('sync')})",
                 f"{trained['throughput_ratio']:.3f}" if trained else "not run",
                 f"{trained['memory_ratio']:.3f}" if trained else "not run"]
        for b in sizes:
            cell = f"{r[f'loss_ratio_{b}']['ratio']:.2f}" if f"loss_ratio_{b}" in r else "not run"
            if f"loss_ratio_apart_{b}" in r:
                cell += f" (terms apart: {r[f'loss_ratio_apart_{b}']['ratio']:.2f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    rounds = min((r["train"]["rounds"] for r in report["families"].values() if "train" in r), default=0)
    lines += ["", f"Training: {train['size']}, batch {train['batch_size']}, {train['precision']}, "
              f"{train['data']} data, {train['steps']} steps ({train['warmup']} warm-up), {rounds} round(s); "
              "peak memory: "
              + ("the process's peak resident set" if smoke else "torch.cuda.max_memory_allocated")
              + f". Losses: D = {settings['dim']}" + ("" if smoke else ", bf16 autocast, TF32")
              + "; coca with small caption logits (8 x 64). Targets: throughput >= 0.97, memory <= 1.10, "
              f"clip loss <= 2.0. {seconds / 60:.1f} minutes."
              + (" CPU smoke run: tiny sizes, ratios not held to the targets." if smoke else "")]
    for family, r in report["families"].items():
        if "train" in r:
            c, m = r["train"]["median"]["clip"], r["train"]["median"]["m2mix"]
            lines.append(f"- {family}: {c['samples_per_s']:.1f} -> {m['samples_per_s']:.1f} samples/s, peak "
                         f"{c['peak_bytes'] / 2**20:.0f} -> {m['peak_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="Install the wheels the run needs (the standard library only).")
    inst.add_argument("--wheels", required=True)
    inst.add_argument("--site", required=True)
    go = sub.add_parser("run", help="Run the checks and print the table.")
    go.add_argument("--cpu-smoke", action="store_true", help="The same steps on the CPU at tiny sizes (CI).")
    go.add_argument("--out", default="gpu-check-out")
    go.add_argument("--budget-minutes", type=float, default=7.0,
                    help="Training rounds that would end later are skipped (one always runs). Default 7.")
    args = p.parse_args()
    if args.command == "install":
        return install(args.wheels, args.site)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
