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


def test_a_run_whose_figures_fail_writes_no_json(tmp_path, monkeypatch):
    from m2mix_openclip import results

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(results, "plot_metric_bars", full_disk)
    with pytest.raises(OSError, match="No space left"):
        finish_run(str(tmp_path), "results.json", {"base": {"alignment": 0.7}}, {"base": features(0)},
                   ["alignment"], "one model")
    assert not (tmp_path / "results.json").exists()
    assert sorted(os.listdir(tmp_path)) == sorted([FIGURES["sphere"], FIGURES["cosines"]])


def test_written_files_have_the_permissions_open_gives(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(str(tmp_path / "r.json"), {"run": 1})
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "r.json").st_mode & 0o777 == os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o644
