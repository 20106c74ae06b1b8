"""Training throughput and peak memory of ``--loss m2mix`` over ``--loss clip``, for every loss family.

    python benchmarks/bench_train.py [--size bench|tiny|ViT-B-32] [--batch-size 64] [--device cpu|cuda]
        [--precision fp32|amp_bf16] [--data digits|synthetic] [--steps 12] [--warmup 4] [--rounds 2]
        [--families clip siglip coca distill]

One run of OpenCLIP's trainer per (family, loss), through ``benchmarks/train_probe.py``: CLIP,
``--siglip`` (the model with a logit bias), CoCa (a CoCa model of the same towers) and
distillation (``--distill-model``: a teacher of the student's architecture, random weights), each
with ``--loss clip`` and ``--loss m2mix`` at its defaults, the same model, data and seed for
both. Runs are interleaved (every family's two runs side by side, their order swapped each
round) so that machine noise hits both alike.

- samples/s: global batch / the median time between optimizer steps after the warm-up steps;
  a family's figure is the median over rounds; the ratio is m2mix / clip (target >= 0.97).
- on the CPU, the loss's own CPU time in each step (``train_probe.LossTimer``: its forward and
  its backward) and the ratio it alone allows, 1 / (1 + (m2mix's - clip's) / clip's step CPU
  time), which machine noise moves far less than samples/s;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the steps after the warm-up; on
  the CPU the peak resident set of the process over those steps (counts the allocator's and the
  data loader's pages too). The ratio is m2mix / clip (target <= 1.10); "step" is the peak above
  what was in use between two steps (weights, gradients, optimizer state).

``--size bench`` (default) is a ~25 M-parameter ViT for which the encoders dominate a CPU step;
``tiny`` the 3.4 M-parameter test model; ``ViT-B-32`` OpenCLIP's own configuration (random
weights, nothing downloaded). ``--data digits`` trains on the bundled digit scans, ``synthetic`` on
OpenCLIP's synthetic data (any number of steps, no decoding).
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("clip", "siglip", "coca", "distill")
THROUGHPUT_TARGET, MEMORY_TARGET = 0.97, 1.10

TINY_MODEL = {  # 3.4 M parameters: for smoke runs
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}
BENCH_MODEL = {  # ~25 M parameters: the encoders dominate a CPU training step
    "model_cfg": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 6, "width": 384, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
    "preprocess_cfg": {},
}


def coca_config(clip_config, decoder_layers):
    """A CoCa model with the towers of ``clip_config``: attentional pooling, a caption decoder."""
    config = copy.deepcopy(clip_config)
    model = config["model_cfg"]
    vision, text = model["vision_cfg"], model["text_cfg"]
    heads = text.get("heads", 8)
    vision.update(attentional_pool=True, attn_pooler_heads=heads, output_tokens=True)
    text.update(embed_cls=True, output_tokens=True)
    model["multimodal_cfg"] = {"context_length": text["context_length"], "vocab_size": text["vocab_size"],
                               "width": text["width"], "heads": heads, "layers": decoder_layers,
                               "attn_pooler_heads": heads}
    model["custom_text"] = True
    return config


def model_configs(size):
    """{"clip", "siglip", "coca"}: OpenCLIP model configurations (``open_clip_config.json``) of one size."""
    coca = None
    if size == "bench":
        clip = BENCH_MODEL
    elif size == "tiny":
        clip = TINY_MODEL
    else:  # an OpenCLIP architecture, e.g. ViT-B-32 (its CoCa: coca_<name> where OpenCLIP has one)
        import open_clip
        found = open_clip.get_model_config(size)
        if found is None:
            raise SystemExit(f"unknown --size {size!r}: bench, tiny, or an OpenCLIP model name such as ViT-B-32")
        clip = {"model_cfg": found, "preprocess_cfg": {}}
        if open_clip.get_model_config(f"coca_{size}") is not None:
            coca = {"model_cfg": open_clip.get_model_config(f"coca_{size}"), "preprocess_cfg": {}}
    siglip = copy.deepcopy(clip)
    siglip["model_cfg"]["init_logit_bias"] = -10  # what --siglip needs of a model: a logit bias
    coca = coca or coca_config(clip, decoder_layers=1 if size == "tiny" else 2)
    return {"clip": clip, "siglip": siglip, "coca": coca}


def write_model(folder, config):
    """``local-dir:folder`` holding ``config`` as ``open_clip_config.json``, its text context as the
    installed tokenizer gives it (``m2mix_openclip.demo.write_local_model`` without the demo's
    plotting imports, which a GPU machine may lack)."""
    from m2mix_openclip.integration import openclip_compat
    config = copy.deepcopy(config)
    text = config["model_cfg"]["text_cfg"]
    text["context_length"] = openclip_compat.tokenizer_context_length(text.get("context_length", 77))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(config, f)
    return f"local-dir:{folder}"


def prepare(work, size, families, log=print):
    """{family: (--model value, extra flags)}, writing the models (and the teacher's weights)."""
    from m2mix_openclip.integration import openclip_compat
    configs = model_configs(size)
    setups = {}
    for family in families:
        if family == "distill":
            import open_clip
            import torch
            teacher_dir = os.path.join(work, "teacher")
            teacher = write_model(teacher_dir, configs["clip"])
            weights = os.path.join(teacher_dir, "open_clip_pytorch_model.bin")
            if not os.path.exists(weights):
                log(f"  writing the teacher's random weights ({size})", flush=True)
                torch.save(open_clip.create_model(openclip_compat.model_name(teacher)).state_dict(), weights)
            setups[family] = (write_model(os.path.join(work, "student"), configs["clip"]),
                              ["--distill-model", teacher, "--distill-pretrained", "none"])
        else:
            folder = os.path.join(work, "coca" if family == "coca" else family)  # "coca" in the name: CoCaLoss
            model = write_model(folder, configs[family])
            weights = os.path.join(folder, "open_clip_pytorch_model.bin")
            if family == "coca" and not os.path.exists(weights):
                # OpenCLIP leaves the text decoder's projection uninitialised: random memory, caption
                # losses of 1e35 or NaN at random (openclip_compat.initialise_text_decoders)
                import open_clip
                import torch
                log(f"  writing the CoCa model's random weights, text decoder initialised ({size})", flush=True)
                created = open_clip.create_model(openclip_compat.model_name(model))
                openclip_compat.initialise_text_decoders(created)
                torch.save(created.state_dict(), weights)
            setups[family] = (model, ["--siglip"] if family == "siglip" else [])
    return setups


def data_flags(work, data, batch_size, steps, image_size):
    if data == "synthetic":
        return ["--dataset-type", "synthetic", "--train-num-samples", str(batch_size * steps)]
    from m2mix_openclip.data import write_dataset
    need = batch_size * steps
    written = write_dataset(os.path.join(work, "data"), splits=("pretrain",), limit=need, shifts=(),
                            size=min(image_size, 64))
    if written["pretrain"]["num_samples"] < need:
        raise SystemExit(f"the digit data has {written['pretrain']['num_samples']} pretrain samples, "
                         f"{need} needed: lower --steps or --batch-size, or use --data synthetic")
    return ["--train-data", written["pretrain"]["csv"], "--csv-img-key", "filepath", "--csv-caption-key", "title"]


def run_once(work, name, model, extra, loss, common, warmup, batch_size, clock="wall"):
    """One training run through the probe: {"samples_per_s", "peak_bytes", "step_bytes"};
    ``clock="cpu"``: per CPU second of the process, run with one thread."""
    out = os.path.join(work, f"{name}.json")
    shutil.rmtree(os.path.join(work, "none", name), ignore_errors=True)  # an earlier run's out.log
    cmd = [sys.executable, os.path.join(HERE, "train_probe.py"), out, str(warmup), "--", "--model", model,
           *common, "--name", name, "--loss", loss, *extra]
    # cwd: OpenCLIP writes none/NAME/out.log even with --logs none (which only skips the checkpoint)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": "1"} if clock == "cpu" else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"training run {name} failed (exit {proc.returncode}):\n{tail}")
    with open(out) as f:
        probe = json.load(f)
    ends = probe["step_end_cpu_times" if clock == "cpu" else "step_end_times"]
    intervals = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    if len(intervals) < 2:
        raise RuntimeError(f"training run {name}: {len(probe['step_end_times'])} steps, "
                           f"{warmup} warm-up; raise --steps")
    loss_seconds = probe.get("loss_cpu_seconds")  # CPU time, as the steps' CPU time below
    cpu = probe["step_end_cpu_times"]
    return {"samples_per_s": batch_size / statistics.median(intervals), "peak_bytes": probe["peak_bytes"],
            "step_bytes": probe["peak_bytes"] - probe["base_bytes"],
            "step_seconds": statistics.median(b - a for a, b in zip(cpu[warmup - 1:], cpu[warmup:])),
            "loss_seconds": statistics.median(loss_seconds[warmup:]) if loss_seconds else None}


def measure(families=FAMILIES, size="bench", device="cpu", precision="fp32", batch_size=64, steps=12, warmup=4,
            rounds=2, data="digits", workers=0, work=None, log=print, deadline=None, clock="wall"):
    """{family: {"clip": [runs], "m2mix": [runs], "throughput_ratio", "memory_ratio", ...}}; ``deadline``
    (a ``time.monotonic()`` value) skips the rounds that would not end before it (one always runs)."""
    work = os.path.abspath(work or tempfile.mkdtemp(prefix="m2mix-bench-train-"))
    os.makedirs(work, exist_ok=True)
    setups = prepare(work, size, families, log)
    image_size = model_configs(size)["clip"]["model_cfg"]["vision_cfg"]["image_size"]
    common = [*data_flags(work, data, batch_size, steps, image_size), "--batch-size", str(batch_size),
              "--epochs", "1", "--lr", "1e-5", "--warmup", "1", "--workers", str(workers), "--device", device,
              "--precision", precision, "--logs", "none", "--log-every-n-steps", "100000", "--report-to", "",
              "--seed", "0"]
    runs = {family: {"clip": [], "m2mix": []} for family in families}
    round_seconds = None
    for r in range(rounds):
        if r > 0 and deadline is not None and time.monotonic() + round_seconds > deadline:
            log(f"  round {r + 1} skipped: it would end past the time budget", flush=True)
            break
        started = time.monotonic()
        for family in families:
            model, extra = setups[family]
            for loss in (("clip", "m2mix") if r % 2 == 0 else ("m2mix", "clip")):
                result = run_once(work, f"{family}-{loss}-{r}", model, extra, loss, common, warmup, batch_size, clock)
                runs[family][loss].append(result)
                log(f"  round {r + 1} {family:7s} --loss {loss:5s}: {result['samples_per_s']:8.1f} samples/s, "
                    f"peak {result['peak_bytes'] / 2**20:8.1f} MiB (step {result['step_bytes'] / 2**20:7.1f} MiB)",
                    flush=True)
        round_seconds = time.monotonic() - started
    keys = ("samples_per_s", "peak_bytes", "step_bytes", "step_seconds", "loss_seconds")
    for by_loss in runs.values():
        median = {loss: {key: statistics.median(run[key] for run in by_loss[loss])
                         if all(run[key] is not None for run in by_loss[loss]) else None for key in keys}
                  for loss in ("clip", "m2mix")}
        by_loss.update(median=median, rounds=len(by_loss["clip"]),
                       throughput_ratio=median["m2mix"]["samples_per_s"] / median["clip"]["samples_per_s"],
                       memory_ratio=median["m2mix"]["peak_bytes"] / median["clip"]["peak_bytes"])
        if median["clip"]["loss_seconds"] is not None:
            # what the loss alone adds to a step, against the step: the ratio noise cannot move
            extra = median["m2mix"]["loss_seconds"] - median["clip"]["loss_seconds"]
            by_loss["loss_only_ratio"] = 1 / (1 + extra / median["clip"]["step_seconds"])
    return runs


def table(results, title):
    memory = "peak memory (CUDA allocated)" if title.startswith("cuda") else "peak resident set"
    timed = all("loss_only_ratio" in r for r in results.values())
    lines = [f"{title}", "",
             f"| family | clip samples/s | m2mix samples/s | ratio (>= {THROUGHPUT_TARGET}) | clip {memory} | "
             f"m2mix {memory} | ratio (<= {MEMORY_TARGET}) | step memory clip / m2mix |"
             + (" loss CPU time per step, clip / m2mix (of the step) | ratio from the loss alone |" if timed else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    for family, r in results.items():
        c, m = r["median"]["clip"], r["median"]["m2mix"]
        lines.append(f"| {family} | {c['samples_per_s']:.1f} | {m['samples_per_s']:.1f} | "
                     f"{r['throughput_ratio']:.3f} | {c['peak_bytes'] / 2**20:.0f} MiB | "
                     f"{m['peak_bytes'] / 2**20:.0f} MiB | {r['memory_ratio']:.3f} | "
                     f"{c['step_bytes'] / 2**20:.0f} / {m['step_bytes'] / 2**20:.0f} MiB |"
                     + (f" {1e3 * c['loss_seconds']:.1f} / {1e3 * m['loss_seconds']:.1f} ms of "
                        f"{1e3 * c['step_seconds']:.0f} ms | {r['loss_only_ratio']:.4f} |" if timed else ""))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="bench", help="bench (default), tiny, or an OpenCLIP model name (ViT-B-32).")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="Steps left out of the figures (default 4).")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="fp32, or amp_bf16 on a GPU.")
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default), or cpu: samples per CPU second of a one-thread run, for a CPU shared "
                        "with other work.")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args()
    if args.clock == "cpu" and (args.device != "cpu" or args.workers):
        p.error("--clock cpu measures one thread on the CPU, with --workers 0")
    results = measure(args.families, args.size, args.device, args.precision, args.batch_size, args.steps,
                      args.warmup, args.rounds, args.data, args.workers, args.work_dir, clock=args.clock)
    rounds = min(r["rounds"] for r in results.values())
    print(table(results, f"{args.device}, {args.precision}, model {args.size}, batch {args.batch_size}, "
                         f"{args.data} data, {args.steps} steps ({args.warmup} warm-up), {rounds} rounds (medians), "
                         f"{args.clock} clock"))


if __name__ == "__main__":
    main()
