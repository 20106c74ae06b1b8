"""How the tools end a run: files written whole or not at all, then the table and the closing lines."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from m2mix_openclip.atomic import write_atomically, write_json
from m2mix_openclip.report import format_table
from m2mix_openclip.results import FIGURES, finish_run


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "results.json"
    write_json(str(path), {"run": 1})

    def half_then_fail(f):
        f.write(b'{"run": ')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(path), half_then_fail)
    with pytest.raises(TypeError):
        write_json(str(path), {"run": object()})  # not serialisable: nothing is written
    assert json.loads(path.read_text()) == {"run": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_an_atomic_file_gets_the_permissions_of_a_plain_write(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(str(tmp_path / "atomic.json"), {})
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(mask)
    mode = {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in ("atomic.json", "plain.json")}
    assert mode["atomic.json"] == mode["plain.json"]
    assert os.stat(tmp_path / "atomic.json").st_mode & 0o044  # readable by group and others, as a result should be


def features(seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    return x, F.normalize(x + 0.5 * torch.randn(12, 8, generator=g), dim=1)


def test_finish_run_writes_figures_then_the_json_and_prints_the_table(tmp_path, capsys):
    table = {"base": {"alignment": 0.7, "modality_gap": 0.3}, "m2mix": {"alignment": 0.6, "modality_gap": 0.2}}
    result = finish_run(str(tmp_path), "analysis.json", table, {"base": features(0), "m2mix": features(1)},
                        ["alignment", "modality_gap"], "two models", fields={"data": "d.csv"},
                        heading=["12 captions of 12 images"], notes=["a note"], started=0.0)
    written = json.loads((tmp_path / "analysis.json").read_text())
    assert written == result and list(written) == ["models", "data", "figures"]
    assert written["figures"] == {k: str(tmp_path / v) for k, v in FIGURES.items()}
    for path in written["figures"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    figures = ", ".join(written["figures"].values())
    assert out.startswith(f"12 captions of 12 images\n{format_table(table)}\n\na note\n\n"
                          f"results: {tmp_path / 'analysis.json'}\nfigures: {figures}\ntook ")


@pytest.mark.parametrize("earlier_run", [False, True])
def test_a_run_whose_figures_fail_writes_no_json(tmp_path, monkeypatch, earlier_run):
    """Nor leaves an earlier run's JSON beside its own half-written figures."""
    from m2mix_openclip import results
    if earlier_run:
        finish_run(str(tmp_path), "results.json", {"base": {"alignment": 0.6}}, {"base": features(1)},
                   ["alignment"], "earlier")

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(results, "plot_metric_bars", full_disk)
    with pytest.raises(OSError, match="No space left"):
        finish_run(str(tmp_path), "results.json", {"base": {"alignment": 0.7}}, {"base": features(0)},
                   ["alignment"], "one model")
    assert not (tmp_path / "results.json").exists()
    left = [FIGURES["sphere"], FIGURES["cosines"]] + ([FIGURES["metrics"]] if earlier_run else [])
    assert sorted(os.listdir(tmp_path)) == sorted(left)


def test_the_bundled_data_is_written_whole(tmp_path, monkeypatch):
    """m2mix-data's files appear whole or not at all: a write that fails midway (the disk full at
    the third shard) leaves no file under that name, no temporary file, and no manifest (written
    last, so its presence means every file is whole); a full run leaves no temporary file."""
    import errno

    from m2mix_openclip import data

    real = data._write_tar
    calls = []

    def full_disk(path, members):
        calls.append(path)
        if len(calls) == 3:
            def write(f):
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return data.write_atomically(path, write)
        return real(path, members)

    monkeypatch.setattr(data, "_write_tar", full_disk)
    with pytest.raises(OSError, match="No space"):
        data.write_dataset(str(tmp_path / "d"), limit=20, shard_size=10)
    written = [os.path.join(r, f) for r, _, files in os.walk(tmp_path / "d") for f in files]
    assert not os.path.exists(calls[2]) and not any(".tmp" in f for f in written)
    assert not os.path.exists(tmp_path / "d" / "manifest.json")
    monkeypatch.setattr(data, "_write_tar", real)
    manifest = data.write_dataset(str(tmp_path / "e"), limit=20, shard_size=10)
    written = [f for _, _, files in os.walk(tmp_path / "e") for f in files]
    assert not any(f.endswith(".tmp") for f in written) and "manifest.json" in written
    with open(manifest["test"]["csv"], newline="") as f:
        assert f.readline() == "filepath\ttitle\tlabel\r\n"
