"""What a long job can rely on, checked on OpenCLIP's real trainer (tiny model, CPU): faults
injected into checkpoint saves, a diverging learning rate, bad data and shard patterns."""

import csv
import glob
import os
import re
import socket
import sys

import pytest
import torch
from trainer_utils import common_args, launcher, logged_lambdas, read_log, run, write_tiny_model

from m2mix_openclip.data import write_dataset

pytestmark = pytest.mark.slow
FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_injection.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("robust")
    data = write_dataset(str(base / "data"), splits=("pretrain", "test"), limit=48, shard_size=24, shifts=())
    return {"data": data, "model": write_tiny_model(str(base / "model")), "logs": base / "logs", "base": base}


def train_args(env, name, epochs=3, batch=16, lr=None):
    args = common_args(env["model"], env["logs"], name, epochs=epochs, batch=batch) + [
        "--train-data", env["data"]["pretrain"]["csv"], "--csv-img-key", "filepath", "--csv-caption-key", "title"]
    return args + (["--lr", str(lr)] if lr is not None else [])  # argparse takes the last --lr


def with_fault(fault, epoch, args):
    return run([sys.executable, FAULTS, fault, str(epoch), *args], check=False)


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def finite_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_no_checkpoint_lost_to_a_kill_a_full_disk_or_a_short_file(env):
    """One run through every checkpoint fault, its lambda sequence checked against an uninterrupted run's."""
    full = launcher(*train_args(env, "whole"), "--loss", "m2mix")
    reference = logged_lambdas(read_log(env["logs"], "whole"))
    assert len(reference) == 9 and full.returncode == 0

    # killed outright while writing epoch 2's checkpoint: nothing under a checkpoint's name but epoch 1's
    args = train_args(env, "faulty") + ["--loss", "m2mix"]
    killed = with_fault("kill", 2, args)
    assert killed.returncode == -9
    folder = env["logs"] / "faulty" / "checkpoints"
    left = sorted(os.listdir(folder))  # the killed save's hidden temporary file, and epoch 1
    assert len(left) == 2 and re.fullmatch(r"\.epoch_2\.pt\.\w+\.tmp", left[0]) and left[1] == "epoch_1.pt"
    assert finite_checkpoint(folder / "epoch_1.pt")
    epoch_1 = (folder / "epoch_1.pt").read_bytes()

    # a short epoch_2.pt, as OpenCLIP's own in-place save leaves it when killed; then a full disk at epoch 3
    whole = (env["logs"] / "whole" / "checkpoints" / "epoch_2.pt").read_bytes()
    (folder / "epoch_2.pt").write_bytes(whole[: len(whole) // 3])
    full_disk = with_fault("full-disk", 3, args + ["--resume", "latest"])
    assert full_disk.returncode == 1 and "Traceback" not in full_disk.stderr
    assert re.fullmatch(rf"m2mix-train: error: No space left on device: {re.escape(str(folder))} \(epoch_3\.pt needs "
                        r"[0-9.]+ MB, [0-9.]+ MB free\); nothing was written under that name and the earlier "
                        r"checkpoints are as they were", last_line(full_disk))
    log = read_log(env["logs"], "faulty")
    assert f"--resume latest: skipped {folder / 'epoch_2.pt'}: it is cut short (" in log
    assert re.search(rf"removed {re.escape(str(folder))}/\.epoch_2\.pt\.\w+\.tmp \([0-9.]+ MB\), a checkpoint save "
                     "that a stopped run never finished", log)
    assert f"=> resuming checkpoint '{folder / 'epoch_1.pt'}' (epoch 1)" in log
    # epoch 2 was trained again and saved whole over the short file; epoch 3's save left nothing
    assert sorted(os.listdir(folder)) == ["epoch_1.pt", "epoch_2.pt"]
    assert (folder / "epoch_1.pt").read_bytes() == epoch_1 and finite_checkpoint(folder / "epoch_2.pt")

    # and once the disk has room: on from epoch 2, to the end
    done = launcher(*args, "--resume", "latest")
    assert done.returncode == 0 and sorted(os.listdir(folder)) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    # out.log holds every attempt: epochs 1-2 (killed), 2-3 (full disk), 3; the same lambdas as the whole run
    lambdas = logged_lambdas(read_log(env["logs"], "faulty"))
    assert lambdas == reference[:6] + reference[3:] + reference[6:]


def test_resume_of_a_broken_file_is_one_line(env):
    broken = env["base"] / "broken.pt"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    failed = launcher(*train_args(env, "broken", epochs=1), "--resume", str(broken), check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert last_line(failed) == (f"m2mix-train: error: --resume {broken}: it is cut short (104 bytes and no zip "
                                 "directory at its end: a save that was interrupted or ran out of space)")


def nan_steps(log):
    """The steps at which OpenCLIP's console line shows a NaN loss (steps count from 0, 3 per epoch)."""
    lines = [line for line in log.splitlines() if "Train Epoch:" in line and "Loss:" in line]
    return [i for i, line in enumerate(lines) if "Loss: nan" in line]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_diverging_run_stops_with_the_last_good_checkpoint_newest(env):
    # fp32 and --lr 1000: finite through epoch 1, NaN in epoch 2; OpenCLIP's own loss (--loss clip)
    stopped = launcher(*train_args(env, "diverge", lr=1000), "--val-data", env["data"]["test"]["csv"], check=False)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    log = read_log(env["logs"], "diverge")
    first = nan_steps(log)[0]
    assert first >= 3, "this learning rate should keep epoch 1 finite"
    folder = env["logs"] / "diverge" / "checkpoints"
    saved = sorted(p.name for p in folder.glob("*.pt"))
    assert saved == [f"epoch_{e}.pt" for e in range(1, first // 3 + 1)] and all(finite_checkpoint(folder / n)
                                                                                 for n in saved)
    assert last_line(stopped) == (
        f"m2mix-train: error: the loss was not finite (NaN or Inf) at step {first}, and under --precision fp32 no "
        f"GradScaler skips such steps: the run stops here, before its weights reach a checkpoint (the newest "
        f"checkpoint is {saved[-1]}). Usual causes: a learning rate too high (--lr 1000.0), or bad data; change "
        "them and --resume latest, or pass --on-nonfinite continue to go on as OpenCLIP does")
    assert len(nan_steps(log)) == 1  # at the first logging step that saw it (every step logs here)

    # OpenCLIP's old behaviour on request: trains to the end; evaluation reports NaN; no NaN checkpoint,
    # and --delete-previous-checkpoint keeps the last good one
    going = launcher(*train_args(env, "going", lr=1000), "--val-data", env["data"]["test"]["csv"], "--loss", "m2mix",
                     "--on-nonfinite", "continue", "--delete-previous-checkpoint")
    log = read_log(env["logs"], "going")
    assert going.returncode == 0 and "Train Epoch: 2 [48/48" in log
    assert "not saved: the model's weights are not finite (NaN or Inf in" in log
    assert "geometry: the validation features hold NaN or Inf" in log
    rows = [line for line in open(env["logs"] / "going" / "checkpoints" / "results.jsonl")]
    assert len(rows) == 3 and '"alignment": NaN' in rows[-1]
    saved = sorted((env["logs"] / "going" / "checkpoints").glob("*.pt"))
    assert len(saved) == 1 and finite_checkpoint(saved[0])


def test_two_processes_stop_together(env):
    """torchrun, 2 gloo processes, NaN from the first steps: both stop at the same logging step
    (neither waits for the other at a collective), and the job ends with one error line."""
    args = train_args(env, "ddp-diverge", epochs=2, batch=8, lr=1e6)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "m2mix_openclip.train", "--", *args, "--loss", "m2mix"],
               check=False, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("m2mix-train: error: the loss was not finite (NaN or Inf) at step ") == 1
    assert not glob.glob(str(env["logs"] / "ddp-diverge" / "checkpoints" / "*.pt"))


def refusal(capsys, *argv):
    """The one-line error (exit 2) of a command refused before any model is built (run in this process)."""
    from m2mix_openclip.integration.launcher import main
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 2, err  # the error and a pointer to --help
    return err.splitlines()[0]


def test_bad_data_ends_in_one_line(env, capsys):
    def rows():
        with open(env["data"]["pretrain"]["csv"], newline="") as f:
            return list(csv.reader(f, delimiter="\t"))

    def write(name, table, bom=b""):
        text = "".join("\t".join(row) + "\n" for row in table)
        (env["base"] / name).write_bytes(bom + text.encode())
        return env["base"] / name

    # a truncated image on line 6 of a CSV that starts with a byte-order mark (read as pandas reads
    # it): found while training
    table = rows()
    source = open(table[5][0], "rb").read()
    truncated = env["base"] / "truncated.png"
    truncated.write_bytes(source[: len(source) // 2])
    table[5][0] = str(truncated)
    broken = write("truncated.csv", table, bom=b"\xef\xbb\xbf")
    failed = launcher(*train_args(env, "truncated", epochs=1), "--train-data", str(broken), check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "Train Epoch: 0" in read_log(env["logs"], "truncated")  # the BOM did not stop it
    assert last_line(failed) == (f"m2mix-train: error: {broken} line 6: image '{truncated}' is truncated (PIL: image "
                                 "file is truncated)")

    # an empty caption and a short row: refused before the model is built, with their lines
    table = rows()
    table[3][1] = ""
    table[7] = table[7][:1]
    empty = write("empty-caption.csv", table)
    message = refusal(capsys, *train_args(env, "empty-caption", epochs=1), "--train-data", str(empty))
    assert message == (f"m2mix-train: error: --train-data {empty}: 2 row(s) have no caption (--csv-caption-key title: "
                       "an empty field, a row shorter than the header, or a text pandas reads as missing such as "
                       "'NA'), on line(s) 4, 8; OpenCLIP would train on them as the text 'nan': fill them in or "
                       "remove those rows")


def test_shard_patterns_are_checked_as_openclip_reads_them(env, capsys, tmp_path):
    shards = env["data"]["pretrain"]["shards"]  # a brace pattern of 2 shards
    glob_pattern = shards.replace("{000000..000001}", "*")
    wds = ["--dataset-type", "webdataset", "--train-num-samples", "48"]
    message = refusal(capsys, *common_args(env["model"], env["logs"], "glob", epochs=1), *wds,
                      "--train-data", glob_pattern)
    assert message.startswith(f"m2mix-train: error: --train-data {glob_pattern}: OpenCLIP reads shard names literally")
    assert message.endswith(f"use --train-data '{shards}'")

    empty = tmp_path / "empty-000001.tar"
    empty.write_bytes(b"")
    both = f"{shards.replace('{000000..000001}', '000000')}::{empty}"
    message = refusal(capsys, *common_args(env["model"], env["logs"], "empty", epochs=1), *wds, "--train-data", both)
    assert message == (f"m2mix-train: error: --train-data {both}: 1 of 2 shard(s) cannot be read: {empty} is empty "
                       "(0 bytes); remove them from the pattern or re-create them")

    # one shard of 24 samples cannot fill a batch of 32: stops at once instead of looping
    one = shards.replace("{000000..000001}", "000000")
    looped = launcher(*common_args(env["model"], env["logs"], "no-batch", epochs=1, batch=32), "--train-data", one,
                      "--train-num-samples", "48", check=False, timeout=300)
    assert looped.returncode == 1 and "Traceback" not in looped.stderr
    assert last_line(looped).startswith(f"m2mix-train: error: --train-data {one}: a whole pass over the shards")


def test_ctrl_c_and_a_finished_run_end_in_one_line(env):
    import shlex
    import signal
    import subprocess
    import time

    # SIGINT halfway through the save of epoch 2: where it stopped, and the command that goes on
    args = train_args(env, "interrupted") + ["--loss", "m2mix"]
    folder = env["logs"] / "interrupted" / "checkpoints"
    stopped = with_fault("interrupt", 2, args)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    line = last_line(stopped)
    assert line == (f"m2mix-train: stopped by Ctrl-C in epoch 1, step 5; the newest checkpoint is "
                    f"{folder / 'epoch_1.pt'}. To go on: {shlex.join(['m2mix-train', *args, '--resume', 'latest'])}")
    assert sorted(os.listdir(folder)) == ["epoch_1.pt"]  # nothing of the interrupted save

    # the command it gave trains to the end; once more, the run says it has nothing to do
    command = shlex.split(line.split("To go on: ", 1)[1])
    assert command[0] == "m2mix-train"
    resumed = launcher(*command[1:])
    assert resumed.returncode == 0 and sorted(os.listdir(folder)) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    again = launcher(*command[1:])
    assert again.returncode == 0 and last_line(again) == (
        f"m2mix-train: {folder / 'epoch_3.pt'} has trained 3 epoch(s) and --epochs is 3: nothing to train; raise "
        "--epochs above 3 to train on")

    # Ctrl-C while training (SIGINT from outside, as a terminal sends it)
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "m2mix_openclip.train", *train_args(env, "ctrl-c", epochs=500)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_vars,
                            # SIGINT handled as at a terminal, even where these tests run in the background
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = env["logs"] / "ctrl-c" / "out.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and "Start epoch 2" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(r"m2mix-train: stopped by Ctrl-C in epoch \d+, step \d+; the newest checkpoint is "
                        r".*/ctrl-c/checkpoints/epoch_\d+\.pt\. To go on: m2mix-train .* --resume latest",
                        err.strip().splitlines()[-1])
