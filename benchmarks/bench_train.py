"""Training throughput of ``--loss m2mix`` over ``--loss clip`` through OpenCLIP's trainer.

    python benchmarks/bench_train.py [--model local-dir:DIR | --model ViT-B-32] [--batch-size 64]
        [--device cpu|cuda] [--precision fp32|amp] [--steps 12] [--rounds 2]

Same model, data (the bundled digit scans) and seed for both losses; runs alternate
(clip, m2mix, clip, m2mix, ...) so machine noise hits both alike. Each run's samples/s is the
median over its logged steps after the first two (warm-up); the ratio is of the medians over runs.
By default the model is a ViT large enough on these CPUs that the encoders dominate the step.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from m2mix_openclip.data import write_dataset
from m2mix_openclip.demo import write_local_model

BENCH_MODEL = {  # ~25 M parameters: the encoders dominate a CPU training step
    "model_cfg": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 6, "width": 384, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
    "preprocess_cfg": {},
}


def samples_per_second(log_text, skip=2):
    values = [float(v) for v in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", log_text)]
    if len(values) <= skip:
        raise RuntimeError(f"only {len(values)} logged steps; raise --steps")
    return statistics.median(values[skip:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Default: a ~25 M-parameter local-dir ViT.")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args()

    work = args.work_dir or tempfile.mkdtemp(prefix="m2mix-bench-")
    model = args.model
    if model is None:
        model = write_local_model(os.path.join(work, "model"), BENCH_MODEL)
    need = args.batch_size * args.steps
    data = write_dataset(os.path.join(work, "data"), splits=("pretrain",), limit=need, shifts=(), size=64)
    if data["pretrain"]["num_samples"] < need:
        raise SystemExit(f"the digit data has {data['pretrain']['num_samples']} pretrain samples; "
                         f"lower --steps or --batch-size (need {need})")
    runs = {"clip": [], "m2mix": []}
    for r in range(args.rounds):
        for loss in ("clip", "m2mix"):
            name = f"{loss}-{r}"
            cmd = [sys.executable, "-m", "m2mix_openclip.train", "--model", model, "--train-data",
                   data["pretrain"]["csv"], "--csv-img-key", "filepath", "--csv-caption-key", "title",
                   "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "1e-5", "--warmup", "1",
                   "--workers", str(args.workers), "--device", args.device, "--precision", args.precision,
                   "--logs", os.path.join(work, "logs"), "--name", name, "--log-every-n-steps", "1",
                   "--report-to", "", "--save-frequency", "0", "--loss", loss]
            if args.pretrained:
                cmd += ["--pretrained", args.pretrained]
            subprocess.run(cmd, check=True, capture_output=True)
            with open(os.path.join(work, "logs", name, "out.log")) as f:
                runs[loss].append(samples_per_second(f.read()))
            os.remove(os.path.join(work, "logs", name, "checkpoints", "epoch_1.pt"))
            print(f"  round {r} --loss {loss:5s}: {runs[loss][-1]:8.1f} samples/s", flush=True)
    clip, m2mix = statistics.median(runs["clip"]), statistics.median(runs["m2mix"])
    print(f"model {model}, batch {args.batch_size}, {args.device} {args.precision}: "
          f"clip {clip:.1f} samples/s, m2mix {m2mix:.1f} samples/s, ratio m2mix/clip {m2mix / clip:.3f} "
          f"(target >= 0.97)")


if __name__ == "__main__":
    main()
