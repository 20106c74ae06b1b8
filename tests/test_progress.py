"""Progress of the tools: whole lines where the output is not a terminal, tqdm's bar where it is."""

import io

from m2mix_openclip.progress import PlainProgress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_the_output_is_not_a_terminal():
    stream = io.StringIO()
    with progress(8, "outer", unit="stages", stream=stream) as stages:
        assert isinstance(stages, PlainProgress)
        stages.set_postfix_str("first")
        for _ in range(3):
            stages.update()
        inner = progress(100, "inner: images", unit="images", leave=False, stream=stream)
        inner.update(60)
        inner.update(40)
        inner.close()
        stages.set_postfix_str("second")
        stages.update(5)
    assert stream.getvalue().splitlines() == [
        "outer: 0/8 stages (0%) first",  # stages: a line as each one starts, and at the end
        "inner: images: 60/100 images (60%)",  # a count: a line at each quarter passed
        "inner: images: 100/100 images (100%)",
        "outer: 3/8 stages (37%) second",
        "outer: 8/8 stages (100%) second",
    ]


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    terminal = Terminal()
    with progress(4, "work", unit="steps", stream=terminal) as bar:
        bar.update(4)
    assert "work: 100%" in terminal.getvalue() and "4/4" in terminal.getvalue()
    quiet = io.StringIO()
    with progress(4, "work", stream=quiet, enabled=False) as nothing:
        nothing.update(4)
        nothing.set_postfix_str("stage")
    assert quiet.getvalue() == ""
