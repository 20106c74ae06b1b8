"""Figures of embedding geometry (matplotlib, no display needed).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: importing this
module changes no process-wide state (no ``matplotlib.use``, no pyplot figure registry)."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle


def _figure(columns: int, width: float, height: float):
    """A Figure on its own Agg canvas and its (1, columns) axes."""
    fig = Figure(figsize=(width * columns, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)


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
                           max_points: int = 400) -> None:
    """Each model's images and captions, projected (not centred) on the plane of the modality-gap
    direction and the main direction of spread, then put on the unit circle. Two separate arcs
    are the modality gap; the arrows are each modality's mean embedding (their length, at most 1,
    shows how concentrated the modality is: a narrow cone gives a long arrow)."""
    fig, axes = _figure(len(models), 4.2, 4.4)
    for ax, (name, (x, y)) in zip(axes[0], models.items()):
        basis = gap_plane(x, y)
        for feats, colour, label in ((x, "tab:blue", "image"), (y, "tab:orange", "text")):
            p = feats[:max_points].double() @ basis
            p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
            ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.5, c=colour, label=label)
            m = feats.double().mean(0) @ basis
            ax.annotate("", xy=(m[0], m[1]), xytext=(0, 0),
                        arrowprops=dict(color=colour, width=2, headwidth=8))
        gap = (x.double().mean(0) - y.double().mean(0)).norm().item()
        ax.add_patch(Circle((0, 0), 1.0, fill=False, lw=0.5, color="grey"))
        ax.set_title(f"{name}\nmodality gap {gap:.3f}")
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.2, 1.2)
        ax.set_aspect("equal")
        ax.set_xlabel("gap direction (mean image - mean text)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Image and caption embeddings on the circle (gap plane, renormalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_cosine_histograms(models: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path: str,
                           max_negatives: int = 200_000) -> None:
    """Histograms of positive (matching pair) and negative (non-matching) image-text cosines."""
    fig, axes = _figure(len(models), 4.2, 3.4)
    gen = torch.Generator().manual_seed(0)
    for ax, (name, (x, y)) in zip(axes[0], models.items()):
        n = x.shape[0]
        positive = (x * y).sum(1)
        i = torch.randint(0, n, (min(max_negatives, n * (n - 1)),), generator=gen)
        j = (i + torch.randint(1, n, i.shape, generator=gen)) % n  # j != i
        negative = (x[i] * y[j]).sum(1)
        ax.hist(negative.numpy(), bins=60, density=True, alpha=0.6, label="negative pairs", color="tab:grey")
        ax.hist(positive.numpy(), bins=60, density=True, alpha=0.6, label="positive pairs", color="tab:green")
        ax.set_title(name)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_metric_bars(table: Dict[str, Dict[str, float]], keys: Sequence[str], path: str) -> None:
    """One bar group per metric, one bar per model."""
    fig, axes = _figure(len(keys), 2.6, 3.2)
    names = list(table)
    for ax, key in zip(axes[0], keys):
        ax.bar(range(len(names)), [table[n].get(key, float("nan")) for n in names],
               color=["tab:grey", "tab:blue", "tab:red", "tab:green"][:len(names)])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
