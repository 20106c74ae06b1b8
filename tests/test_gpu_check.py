"""benchmarks/gpu_check.py's verdicts: a host sync, a wheel the folder lacks and a failed check are
reported, not passed over. (CI runs the whole script at tiny sizes: ``gpu_check.sh --cpu-smoke``.)"""

import importlib.util
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(BENCHMARKS, "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(BENCHMARKS)


@pytest.mark.parametrize("family", ["clip", "siglip", "coca", "distill"])
def test_every_family_passes_the_host_sync_check_on_meta_tensors(gpu_check, family):
    assert gpu_check.sync_check(family, "cpu", batch=8, dim=16) is None


def test_a_loss_that_reads_the_device_fails_the_host_sync_check(gpu_check, monkeypatch):
    import bench_core
    import torch

    class Syncing(torch.nn.Module):  # a loss that branches on its data: a host read
        def forward(self, x, y, scale, output_dict=False):
            value = (x * y).sum() * scale
            if bool(value > 0):
                value = value * 2
            return {"contrastive_loss": value}

    monkeypatch.setattr(bench_core, "family_losses",
                        lambda family, batch, dim, device: (None, Syncing(), (torch.tensor(1.0, device=device),)))
    problem = gpu_check.sync_check("clip", "cpu", batch=8, dim=16)
    assert problem is not None and problem.startswith(("RuntimeError", "NotImplementedError")), problem


def test_install_names_what_the_wheel_folder_lacks(gpu_check, tmp_path, monkeypatch, capsys):
    assert gpu_check.install(str(tmp_path / "nowhere"), str(tmp_path / "site")) == 2
    assert "is not a folder" in capsys.readouterr().err
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.11.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    monkeypatch.setattr(gpu_check, "NEEDED", [("json", "json"), ("no_such_module_here", "no-such-dist")])
    assert gpu_check.install(str(wheels), str(tmp_path / "site")) == 2
    out, err = capsys.readouterr()
    assert "left alone (the machine's own): torch" in out
    assert "not importable here and no wheel in" in err and "no-such-dist" in err and "json" not in err


def test_the_table_shows_a_failed_check(gpu_check):
    report = {"environment": "test", "families": {
        "clip": {"sync": "none", "loss_ratio_64": {"ratio": 1.5},
                 "train": {"throughput_ratio": 0.99, "memory_ratio": 1.01, "rounds": 1,
                           "median": {k: {"samples_per_s": 10.0, "peak_bytes": 2**20} for k in ("clip", "m2mix")}}},
        "siglip": {"sync": "RuntimeError: a host read"}}}
    settings = {"loss_sizes": [64], "dim": 16,
                "train": dict(size="tiny", batch_size=8, precision="fp32", data="synthetic", steps=5, warmup=2)}
    text = gpu_check.summary_table(report, settings, smoke=True, seconds=30)
    rows = [line for line in text.splitlines() if line.startswith("| clip") or line.startswith("| siglip")]
    assert rows == ["| clip | none | 0.990 | 1.010 | 1.50 |",
                    "| siglip | FAILED (RuntimeError: a host read) | not run | not run | not run |"]
