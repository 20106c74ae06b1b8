"""A run that fails on a missing image, and its rerun, through OpenCLIP's real trainer."""

import csv
import os

import pytest
from trainer_utils import common_args, launcher, read_log, write_tiny_model

from m2mix_openclip.data import write_dataset


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("failed")
    data = write_dataset(str(base / "data"), splits=("pretrain",), limit=32, shard_size=32, shifts=())
    return {"csv": data["pretrain"]["csv"], "model": write_tiny_model(str(base / "model")), "base": base}


def csv_without_image(source, target, row):
    """A copy of ``source`` whose data row ``row`` (1-based) names an image that is not there."""
    with open(source, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    rows[row][0] = os.path.join(os.path.dirname(target), "gone.png")
    with open(target, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    return target


@pytest.mark.slow  # a fresh process
def test_missing_image_then_rerun_then_resume_latest(env):
    logs = env["base"] / "logs"
    broken = csv_without_image(env["csv"], str(env["base"] / "broken.csv"), row=5)
    argv = [*common_args(env["model"], logs, "run", epochs=1, batch=8), "--loss", "m2mix",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--save-frequency", "1"]

    # 32 rows, batch 8: the epoch reads every row; the run stops with the CSV's file and line, not a
    # DataLoader traceback, and leaves logs/run without a checkpoint
    failed = launcher(*argv, "--train-data", broken, check=False)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    gone = os.path.join(str(env['base']), 'gone.png')
    assert last == f"m2mix-train: error: {broken} line 6: image {gone!r} not found"
    assert os.path.isfile(logs / "run" / "out.log")
    assert not os.listdir(logs / "run" / "checkpoints")

    # the same command again: one line naming the folder and the way on, before any model is built
    again = launcher(*argv, "--train-data", env["csv"], check=False)
    assert again.returncode == 2
    assert "Traceback" not in again.stderr and "Train Epoch" not in again.stdout + again.stderr
    message = again.stderr.strip().splitlines()[0]
    assert message.startswith(f"m2mix-train: error: --name run: {logs / 'run'} already holds a run (no checkpoint")
    assert "--resume latest starts again in the same folder" in message
    log_before = read_log(logs, "run")

    # --resume latest after the fix: trains in the same folder, keeps the failed run's log
    fixed = launcher(*argv, "--train-data", env["csv"], "--resume", "latest")
    assert fixed.returncode == 0
    log_after = read_log(logs, "run")
    assert log_after.startswith(log_before) and "Train Epoch: 0" in log_after[len(log_before):]
    assert os.path.isfile(logs / "run" / "checkpoints" / "epoch_1.pt")

    # now it has a checkpoint: the refusal says --resume latest continues from it
    done = launcher(*argv, "--train-data", env["csv"], check=False)
    assert done.returncode == 2
    assert "already holds a run (--resume latest continues from epoch_1.pt)" in done.stderr
