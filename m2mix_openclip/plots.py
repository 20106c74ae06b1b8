"""Figures of embedding geometry (matplotlib, no display needed).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: importing this
module changes no process-wide state (no ``matplotlib.use``, no pyplot figure registry). Each
function writes a PNG, whole or not at all (:mod:`m2mix_openclip.atomic`), and returns the Figure
(for a notebook or a further ``savefig``). Every figure says what it shows: panel titles name the
model or the metric and which way is better (:mod:`m2mix_openclip.report`), legends explain every
mark, and the constrained layout keeps titles, labels and legends apart and inside the canvas."""

from __future__ import annotations

import textwrap
from typing import Dict, Optional, Sequence, Tuple

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

from .atomic import write_atomically
from .report import metric

# one colour per model, the same in every figure: the first model (usually the baseline) grey
MODEL_COLOURS = ("tab:grey", "tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan", "tab:orange")
IMAGE, TEXT = "tab:blue", "tab:orange"


def _figure(columns: int, width: float, height: float, min_width: float = 6.0):
    """A Figure with the constrained layout on its own Agg canvas, and its (1, columns) axes; at
    least ``min_width`` inches wide, so that one panel still has room for the titles and notes."""
    fig = Figure(figsize=(max(width * columns, min_width), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _wrap(fig, text: str, points: float) -> str:
    """``text`` wrapped to the figure's width at a font of ``points`` (about 0.55 em a character)."""
    chars = max(30, int(fig.get_figwidth() * 72 / (0.55 * points)) - 4)
    return "\n".join(textwrap.wrap(text, chars))


def _note(fig, text: str) -> None:
    """A small explanatory note under the panels."""
    fig.supxlabel(_wrap(fig, text, 8), fontsize=8, color="0.25")


def _title(fig, text: str) -> None:
    fig.suptitle(_wrap(fig, text, 11), fontsize=11)


def _save(fig, path: str) -> None:
    """The figure as a PNG at ``path``, written whole or not at all."""
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))


def model_colours(names: Sequence[str]) -> Dict[str, str]:
    return {name: MODEL_COLOURS[i % len(MODEL_COLOURS)] for i, name in enumerate(names)}


def gap_plane(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A (D, 2) orthonormal basis: the modality-gap direction (mean image minus mean text) and
    the joint embeddings' top principal direction orthogonal to it."""
    x, y = x.double(), y.double()
    e1 = x.mean(0) - y.mean(0)
    if e1.norm() < 1e-12:  # no gap at all: any direction will do
        e1 = torch.zeros_like(e1)
        e1[0] = 1.0
    e1 = e1 / e1.norm()
    joint = torch.cat([x, y])
    joint = joint - joint.mean(0)
    joint = joint - (joint @ e1)[:, None] * e1  # remove the gap direction
    _, _, v = torch.linalg.svd(joint, full_matrices=False)
    e2 = v[0] - (v[0] @ e1) * e1
    return torch.stack([e1, e2 / e2.norm()], dim=1)



def plot_sphere_projection(models: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path: str,
                           max_points: int = 400) -> Figure:
    """Each model's images and captions, projected (not centred) on the plane of the modality-gap
    direction and the main direction of spread, then put on the unit circle. Two separate arcs
    are the modality gap; the arrows are each modality's mean embedding (their length, at most 1,
    shows how concentrated the modality is: a narrow cone gives a long arrow)."""
    fig, axes = _figure(len(models), 3.6, 4.6)
    for ax, (name, (x, y)) in zip(axes, models.items()):
        basis = gap_plane(x, y)
        for feats, colour in ((x, IMAGE), (y, TEXT)):
            p = feats[:max_points].double() @ basis
            p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
            ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.5, c=colour, zorder=2)
        # the arrows above every point; the image arrow wide under the narrow caption arrow, so
        # that both show where they point the same way
        for feats, colour, width, head, zorder in ((x, IMAGE, 6, 14, 3), (y, TEXT, 2, 7, 4)):
            m = feats.double().mean(0) @ basis
            ax.annotate("", xy=(m[0], m[1]), xytext=(0, 0), zorder=zorder,
                        arrowprops=dict(facecolor=colour, edgecolor="white", linewidth=0.6, width=width,
                                        headwidth=head, headlength=0.9 * head, shrink=0))
        gap = (x.double().mean(0) - y.double().mean(0)).norm().item()
        ax.add_patch(Circle((0, 0), 1.0, fill=False, lw=0.5, color="grey"))
        ax.set_title(f"{name}\nmodality gap {gap:.3f}", fontsize=10)
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_aspect("equal")
        ax.set_xlabel("gap direction (mean image \u2212 mean text) \u2192", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("main direction of spread", fontsize=8)
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=IMAGE, alpha=0.7),
               Line2D([], [], ls="", marker="o", ms=4, color=TEXT, alpha=0.7),
               Line2D([], [], color=IMAGE, lw=5, marker=">", ms=9),
               Line2D([], [], color=TEXT, lw=1.5, marker=">", ms=5)]
    # the legend heads the figure and carries its title (a suptitle and a legend above the panels
    # are not laid out apart by the constrained layout)
    legend = fig.legend(handles, ["image embedding", "caption embedding", "mean image embedding",
                                  "mean caption embedding"], loc="outside upper center",
                        ncols=4 if fig.get_figwidth() > 9 else 2, fontsize=8, frameon=False,
                        title=_wrap(fig, "Images and captions on the plane of the modality gap", 11),
                        title_fontproperties={"size": 11})
    legend.get_title().set_multialignment("center")
    _note(fig, "Each embedding is projected on the plane of the gap direction and the main direction of spread, "
               "then put back on the unit circle: two separate arcs are the modality gap. An arrow is a modality's "
               "mean embedding (the caption arrow drawn narrow on the wide image arrow); the longer it is (at most "
               "1), the narrower that modality's cone.")
    _save(fig, path)
    return fig


def plot_cosine_histograms(models: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path: str,
                           max_negatives: int = 200_000) -> Figure:
    """Histograms of positive (matching pair) and negative (non-matching) image-text cosines, on
    one x axis for all models, with each distribution's mean marked."""
    fig, axes = _figure(len(models), 3.8, 3.6)
    gen = torch.Generator().manual_seed(0)
    samples = {}
    for name, (x, y) in models.items():
        n = x.shape[0]
        i = torch.randint(0, n, (min(max_negatives, n * (n - 1)),), generator=gen)
        j = (i + torch.randint(1, n, i.shape, generator=gen)) % n  # j != i
        samples[name] = ((x * y).sum(1).double(), (x[i] * y[j]).sum(1).double())
    low = min(float(min(p.min(), q.min())) for p, q in samples.values())
    high = max(float(max(p.max(), q.max())) for p, q in samples.values())
    bins = torch.linspace(low, high, 61).numpy()
    for ax, (name, (positive, negative)) in zip(axes, samples.items()):
        for values, colour, label in ((negative, "tab:grey", "non-matching pairs"), (positive, "tab:green",
                                                                                      "matching pairs")):
            mean = float(values.mean())
            ax.hist(values.numpy(), bins=bins, density=True, alpha=0.6, color=colour, label=f"{label}, mean {mean:.2f}")
            ax.axvline(mean, color=colour, ls="--", lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("cosine similarity", fontsize=9)
        ax.set_xlim(low, high)
        ax.legend(fontsize=7, loc="best")  # where it covers the fewest bars
    axes[0].set_ylabel("density", fontsize=9)
    _title(fig, "Cosine similarity of matching and non-matching image-caption pairs")
    _note(fig, "Dashed lines: the means. The further the matching pairs sit to the right of the non-matching "
               "ones, the better the pairs are told apart.")
    _save(fig, path)
    return fig


def plot_metric_bars(table: Dict[str, Dict[str, float]], keys: Sequence[str], path: str,
                     title: Optional[str] = None) -> Figure:
    """One panel per metric, one bar per model (a legend names the models), the value on each
    bar; panel titles say which way is better; metrics in [0, 1] are drawn on that axis, and
    "lower is better" metrics that go below zero (uniformity) rise from their best possible value
    (the metric's ``floor``), so that a shorter bar is better there as in every such panel."""
    names = list(table)
    colours = model_colours(names)
    fig, axes = _figure(len(keys), 2.5, 3.4)
    for ax, key in zip(axes, keys):
        m = metric(key)
        values = [table[n].get(key, float("nan")) for n in names]
        finite = [v for v in values if v == v]
        base = min([m.floor] + finite) if m.floor is not None else 0.0
        bars = ax.bar(range(len(names)), [v - base for v in values], bottom=base,
                      color=[colours[n] for n in names])
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=2)
        if m.unit:
            ax.set_ylim(0, 1.12)  # room for the values above a bar at 1
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        elif m.floor is not None:
            high = max(finite + [0.0])
            ax.set_ylim(base, high + 0.12 * ((high - base) or 1.0))
            ax.set_ylabel(m.floor_note, fontsize=7)
        elif finite:
            low, high = min(finite + [0.0]), max(finite + [0.0])
            pad = 0.15 * ((high - low) or 1.0)
            ax.set_ylim(low - (pad if low < 0 else 0), high + (pad if high > 0 else 0))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks([])
        ax.tick_params(labelsize=8)
        ax.set_title(m.name + (f"\n{m.direction}" if m.direction else "\n"), fontsize=9)
    fig.legend([Line2D([], [], ls="", marker="s", ms=8, color=colours[n]) for n in names], names,
               loc="outside lower center", ncols=min(len(names), 5), fontsize=8, frameon=False)
    if title:
        _title(fig, title)
    _save(fig, path)
    return fig


def _alpha_text(alpha: float) -> str:
    return f"{alpha:g}"


def plot_weight_interpolation(curves: Dict[str, Sequence[Tuple[float, float, float]]], path: str,
                              id_name: str, ood_name: str, best: Optional[Dict[str, Dict[str, float]]] = None,
                              title: Optional[str] = None) -> Figure:
    """The effective-robustness picture of weight-space interpolation (WiSE-FT): mean accuracy on
    the shifted sets against in-distribution accuracy, one curve per fine-tuned model through its
    alphas, each from the shared zero-shot point (alpha 0, a black star); each alpha is written
    beside its point where there is room (the others are plain markers); ``best[model]["id"]``
    and ``["ood"]`` are the alphas marked as best in-distribution (square) and best shifted
    (diamond).

    Args:
        curves: model -> ``(alpha, in-distribution accuracy, mean shifted accuracy)`` per alpha.
        id_name, ood_name: what the axes measure (e.g. the set names).
    """
    fig, (ax,) = _figure(1, 6.4, 5.6)
    colours = {name: MODEL_COLOURS[(i + 1) % len(MODEL_COLOURS)] for i, name in enumerate(curves)}
    labels, points = [], []
    zero_shot = None
    for name, curve in curves.items():
        curve = sorted(curve)
        alphas, xs, ys = [c[0] for c in curve], [c[1] for c in curve], [c[2] for c in curve]
        ax.plot(xs, ys, "-o", color=colours[name], ms=4, lw=1.5)
        points += list(zip(xs, ys))
        for alpha, x, y in curve:
            if alpha == 0:
                zero_shot = (x, y)
                continue
            priority = 0 if alpha == alphas[-1] else 1
            labels.append((priority, ax.annotate(_alpha_text(alpha), (x, y), xytext=(4, 4),
                                                 textcoords="offset points", fontsize=7, color=colours[name],
                                                 annotation_clip=False)))
            labels[-1][1].set_in_layout(False)  # placed after the layout, where there is room
        for key, marker in (("id", "s"), ("ood", "D")):
            alpha = (best or {}).get(name, {}).get(key)
            if alpha is not None and alpha in alphas:
                i = alphas.index(alpha)
                ax.plot(xs[i], ys[i], marker, ms=10, mfc="none", mec=colours[name], mew=1.5)
    if zero_shot is not None:
        ax.plot(*zero_shot, "*", color="black", ms=14, zorder=5)
    # room around the points for their labels
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    for axis_set, values in ((ax.set_xlim, xs), (ax.set_ylim, ys)):
        low, high = min(values), max(values)
        pad = max(0.12 * (high - low), 0.01)
        axis_set(low - pad, high + pad)
    ax.set_xlabel(_wrap(fig, f"in-distribution top-1 ({id_name})", 9), fontsize=9)
    ax.set_ylabel(f"mean top-1 on the shifted sets ({ood_name})" if len(ood_name) < 40
                  else "mean top-1 on the shifted sets", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], ls="", marker="*", ms=12, color="black")]
    names = ["zero-shot model (\u03b1 = 0)"]
    for name in curves:
        handles.append(Line2D([], [], color=colours[name], marker="o", ms=4, lw=1.5))
        names.append(f"{name}: \u03b1 from 0 to 1")
    if best:
        handles += [Line2D([], [], ls="", marker="s", ms=9, mfc="none", mec="black"),
                    Line2D([], [], ls="", marker="D", ms=8, mfc="none", mec="black")]
        names += ["best \u03b1 in-distribution", "best \u03b1 on the shifted sets"]
    legend = fig.legend(handles, names, loc="outside upper center", ncols=2, fontsize=8, frameon=False,
                        title=_wrap(fig, title or "Weight-space interpolation between the zero-shot and the "
                                    "fine-tuned models (WiSE-FT)", 11), title_fontproperties={"size": 11})
    legend.get_title().set_multialignment("center")
    _note(fig, "Each point is the model with weights (1 \u2212 \u03b1) \u00b7 zero-shot + \u03b1 \u00b7 fine-tuned, "
               "the number beside it its \u03b1 (where there is room). Up and to the right is better; a curve above "
               "the straight line from the star to its end gains robustness by interpolating.")
    fig.canvas.draw()  # the layout is final now: keep the labels that fit inside the axes and apart
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    kept = [t.get_window_extent(renderer) for t in ax.texts if not any(t is label for _, label in labels)]
    for _, label in sorted(labels, key=lambda item: item[0]):
        box = label.get_window_extent(renderer)
        fits = (box.x0 >= inside.x0 + 1 and box.x1 <= inside.x1 - 1 and box.y0 >= inside.y0 + 1
                and box.y1 <= inside.y1 - 1)
        if fits and not any(box.overlaps(other) for other in kept):
            kept.append(box)
        else:
            label.set_visible(False)
    _save(fig, path)
    return fig
