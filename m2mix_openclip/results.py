"""How a tool ends a run: the figures, the JSON, the table and the closing lines, one way.

``m2mix-analyze`` (SIMAT scores included) and ``m2mix-demo`` end with :func:`finish_run`: three
figures (:mod:`m2mix_openclip.plots`), then the JSON of the whole result, each written whole or
not at all (:mod:`m2mix_openclip.atomic`; the JSON last, so that its presence means the run is
complete), then the lines printed: any heading, the table (:func:`m2mix_openclip.report.format_table`,
the metric names and order every tool shares), any notes, and where the files are.
``m2mix-wiseft`` draws its own figure and ends with :func:`close_run`, the last step of
:func:`finish_run`: the JSON, then the report and where the files are.
The zero-shot hook ends inside OpenCLIP's evaluation, which logs its figures; it shares the
scoring and naming of :mod:`m2mix_openclip.zeroshot` instead.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from .atomic import write_json
from .plots import plot_cosine_histograms, plot_metric_bars, plot_sphere_projection
from .report import format_table

__all__ = ["FIGURES", "finish_run", "close_run"]

# figure -> file name, in every tool's output folder
FIGURES = {"sphere": "embeddings_on_circle.png", "cosines": "cosine_histograms.png", "metrics": "metrics.png"}


def finish_run(out: str, json_name: str, table: Dict[str, Dict[str, float]],
               features: Dict[str, Tuple[torch.Tensor, torch.Tensor]], figure_keys: Sequence[str], figure_title: str,
               fields: Optional[dict] = None, heading: Sequence[str] = (), notes: Sequence[str] = (),
               started: Optional[float] = None) -> dict:
    """Writes the figures and ``out/json_name``, prints the run's closing report; returns the JSON's content.

    Args:
        table: model -> metric -> value (the JSON's ``models`` and the printed table).
        features: model -> (image, text) features per pair, for the circle and the histograms.
        figure_keys: the metrics of ``metrics.png``; figure_title: its title.
        fields: more entries of the JSON, after ``models`` (the figures' paths follow them).
        heading: lines printed before the table; notes: paragraphs printed after it.
        started: ``time.time()`` at the start of the run, for the closing "took N s".
    """
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, json_name)
    if os.path.exists(path):  # an earlier run's JSON beside this run's figures would claim them complete
        os.unlink(path)
    figures = {name: os.path.join(out, file) for name, file in FIGURES.items()}
    plot_sphere_projection(features, figures["sphere"])
    plot_cosine_histograms(features, figures["cosines"])
    plot_metric_bars(table, figure_keys, figures["metrics"], title=figure_title)
    result = {"models": table, **(fields or {}), "figures": figures}
    report = "\n".join([*heading, format_table(table), *(f"\n{note}" for note in notes)])
    close_run(os.path.join(out, json_name), result, report, list(figures.values()), started)
    return result


def close_run(path: str, payload, report: str, figures: Sequence[str], started: Optional[float] = None) -> None:
    """Writes ``payload`` as JSON at ``path`` (whole or not at all; call it after the figures, so
    that the JSON's presence means the run is complete), then prints ``report``, where the
    results and ``figures`` are, and, given ``started`` (``time.time()`` at the start), how long
    the run took."""
    write_json(path, payload)
    print(report)
    print(f"\nresults: {path}\nfigures: {', '.join(figures)}")
    if started is not None:
        print(f"took {time.time() - started:.0f} s")
