"""Quiet output: torch's exit statistics and the tools' random-init warning."""

import logging
import subprocess
import sys

import pytest

from m2mix_openclip.integration.quiet import RANDOM_INIT, dropped_log_messages, quiet_torch_loggers


def test_random_init_warning_is_dropped_only_inside_the_context(tmp_path, caplog):
    import open_clip

    from m2mix_openclip.demo import write_local_model
    model = write_local_model(str(tmp_path / "m"))
    with caplog.at_level(logging.INFO):
        with dropped_log_messages(*RANDOM_INIT):
            open_clip.create_model(model)
        assert "initialized randomly" not in caplog.text
        open_clip.create_model(model)
        assert "initialized randomly" in caplog.text


@pytest.mark.slow  # a fresh process
def test_torch_exit_statistics_are_not_printed():
    code = ("import logging, torch\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "for n in list(logging.root.manager.loggerDict): logging.getLogger(n).setLevel(logging.INFO)\n"
            "torch.compile(lambda x: x + 1, backend='eager')(torch.ones(2))\n"
            "{quiet}\n")
    loud = subprocess.run([sys.executable, "-c", code.format(quiet="")], capture_output=True, text=True)
    assert "TorchDynamo" in loud.stderr or "FakeTensor" in loud.stderr  # what we silence does appear
    quiet = subprocess.run([sys.executable, "-c", code.format(
        quiet="from m2mix_openclip.integration.quiet import quiet_torch_loggers; quiet_torch_loggers()")],
        capture_output=True, text=True)
    assert quiet.returncode == 0
    assert "TorchDynamo" not in quiet.stderr and "FakeTensor" not in quiet.stderr
    logging.getLogger("torch").setLevel(logging.NOTSET)
    quiet_torch_loggers()
    assert logging.getLogger("torch._dynamo").getEffectiveLevel() >= logging.WARNING
    logging.getLogger("torch").setLevel(logging.NOTSET)


def test_the_random_init_warning_is_dropped_only_while_the_condition_holds(tmp_path, caplog):
    import open_clip

    from m2mix_openclip.demo import write_local_model
    model = write_local_model(str(tmp_path / "m"))
    resuming = {"now": False}
    with caplog.at_level(logging.INFO):
        with dropped_log_messages(*RANDOM_INIT, when=lambda: resuming["now"]):
            open_clip.create_model(model)  # no checkpoint follows: the warning is true
            assert "initialized randomly" in caplog.text
            caplog.clear()
            resuming["now"] = True
            open_clip.create_model(model)
            assert "initialized randomly" not in caplog.text


def test_progress_bars_become_plain_lines_where_output_is_not_a_terminal(monkeypatch):
    import io
    import types

    import tqdm

    from m2mix_openclip.integration.quiet import LineProgress, plain_progress
    out = io.StringIO()
    for _ in LineProgress(range(50), desc="zero-shot", file=out, mininterval=0):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == len(set(lines)) >= 2
    assert lines[-1].startswith("zero-shot: 100%") and "50/50" in lines[-1]

    module = types.SimpleNamespace(tqdm=tqdm.tqdm)  # a module that did `from tqdm import tqdm`
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with plain_progress(module):
        assert module.tqdm is LineProgress and tqdm.tqdm is LineProgress
    assert module.tqdm is tqdm.std.tqdm and tqdm.tqdm is tqdm.std.tqdm
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    with plain_progress(module):
        assert module.tqdm is tqdm.std.tqdm  # a terminal keeps its bars
