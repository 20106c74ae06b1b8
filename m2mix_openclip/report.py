"""What the tools call each metric, in which order they print it, and which way is better.

One table of metrics serves the tables of ``m2mix-analyze`` and ``m2mix-demo`` (row names and
order) and the figures of :mod:`m2mix_openclip.plots` (panel titles, "lower is better" marks,
axis ranges), so that a figure, a table and the README say the same thing; and how the tools
name a model from its checkpoint's path (:func:`short_unique_names`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["Metric", "METRICS", "metric", "ordered_keys", "format_table", "short_unique_names"]


@dataclass(frozen=True)
class Metric:
    """key: the key in results; name: the row name and panel title; better: "higher", "lower",
    or None for a description that is not a score (mean cosines); unit: the metric lies in [0, 1]
    (bars are drawn on that axis); floor: where a figure's bars start, the metric's best possible
    value for a "lower is better" metric that goes below zero (so that a shorter bar is better, as
    in every other "lower is better" panel), with ``floor_note`` saying so; figure_direction: a
    figure's "which way is better" line where the table prints none."""
    key: str
    name: str
    better: Optional[str] = None
    unit: bool = False
    floor: Optional[float] = None
    floor_note: str = ""
    figure_direction: str = ""

    @property
    def row_name(self) -> str:
        """The table's row name: the name, marked when lower is better."""
        return f"{self.name} (lower: better)" if self.better == "lower" else self.name

    @property
    def direction(self) -> str:
        """A figure's note under the title: which way is better, or an empty string."""
        return self.figure_direction or {"higher": "higher is better \u2191",
                                         "lower": "lower is better \u2193"}.get(self.better, "")


def _uniformity(which: str) -> Metric:
    # log E exp(-2 |u - v|^2) >= -2 E|u - v|^2 >= -4 n / (n - 1) (Jensen; sum_{i<j} |u_i - u_j|^2 <= n^2 / 2
    # on the unit sphere): about -4 for points spread evenly, 0 when they collapse to one point
    return Metric(f"uniformity_{which}", f"uniformity, {which}", "lower", floor=-4.0,
                  floor_note="bars rise from \u22124, the most\neven spread: shorter is better")


def _zero_shot(shift: str, words: str) -> Metric:
    return Metric(f"zero_shot_accuracy_{shift}", f"zero-shot accuracy, {words}", "higher", True)


# in the order the tables print them; keys not listed follow by name
METRICS = (
    Metric("zero_shot_accuracy", "zero-shot accuracy", "higher", True),
    _zero_shot("rotate", "rotated 30\u00b0"),
    _zero_shot("blur", "blurred"),
    _zero_shot("noise", "noisy"),
    Metric("zero_shot_ece", "zero-shot ECE", "lower", True),
    Metric("image_to_text_R@1", "image->text R@1", "higher", True),
    Metric("image_to_text_R@5", "image->text R@5", "higher", True),
    Metric("image_to_text_R@10", "image->text R@10", "higher", True),
    Metric("text_to_image_R@1", "text->image R@1", "higher", True),
    Metric("text_to_image_R@5", "text->image R@5", "higher", True),
    Metric("text_to_image_R@10", "text->image R@10", "higher", True),
    Metric("image_to_text_label_precision@1", "image->text label precision@1", "higher", True),
    Metric("text_to_image_label_precision@1", "text->image label precision@1", "higher", True),
    Metric("image_to_text_ece", "image->text ECE", "lower", True),
    Metric("text_to_image_ece", "text->image ECE", "lower", True),
    Metric("alignment", "alignment", "lower"),
    _uniformity("joint"),
    _uniformity("image"),
    _uniformity("text"),
    Metric("relative_alignment", "relative alignment", "lower", floor=-4.0,
           floor_note="bars rise from \u22124,\nthe best possible"),
    # not a score in Liang et al.; m2-Mix aims to close it (docs/evaluation.md)
    Metric("modality_gap", "modality gap", figure_direction="lower is better \u2193 (closer)"),
    Metric("positive_cosine", "mean positive cosine"),
    Metric("negative_cosine", "mean negative cosine"),
    Metric("simat_dev", "SIMAT dev (best scale)", "higher"),
    Metric("simat_dev_scale", "SIMAT dev: best scale"),
    Metric("simat_test", "SIMAT test (best scale)", "higher"),
    Metric("simat_test_scale", "SIMAT test: best scale"),
)
_BY_KEY = {m.key: m for m in METRICS}


def metric(key: str) -> Metric:
    """The metric of ``key``; an unknown key is its own name, with no direction."""
    return _BY_KEY.get(key, Metric(key, key))


def ordered_keys(keys: Iterable[str]) -> List[str]:
    """The known keys in :data:`METRICS` order, then the others by name."""
    keys = set(keys)
    return [m.key for m in METRICS if m.key in keys] + sorted(keys - set(_BY_KEY))


def format_table(table: Dict[str, Dict[str, float]], keys: Optional[Iterable[str]] = None) -> str:
    """Models as columns, metrics as rows (``keys``, default every key of any model), in
    :func:`ordered_keys` order; a metric a model lacks prints as nan."""
    names = list(table)
    keys = ordered_keys(keys if keys is not None else set().union(*(row.keys() for row in table.values())))
    rows = [(k, metric(k).row_name) for k in keys]
    width = max([34] + [len(name) + 2 for _, name in rows])
    col = max([12] + [len(n) + 2 for n in names])
    lines = [f"{'metric':{width}s}" + "".join(f"{n:>{col}s}" for n in names)]
    for key, row_name in rows:
        lines.append(f"{row_name:{width}s}" + "".join(f"{table[n].get(key, float('nan')):{col}.4f}" for n in names))
    return "\n".join(lines)


def short_unique_names(paths: Sequence[str]) -> List[str]:
    """The shortest trailing path parts that tell the paths apart: ``epoch_10.pt`` alone, or
    ``finetune-clip/checkpoints/epoch_10.pt`` beside ``finetune-m2mix/checkpoints/epoch_10.pt``."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # the same path twice
