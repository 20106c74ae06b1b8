"""Figures of embedding geometry (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _shared_projection(feature_sets: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
    """A 2-D basis (D, 2) from the top principal directions of every model's joint embeddings."""
    joint = torch.cat([torch.cat([x, y]) for x, y in feature_sets]).double()
    joint = joint - joint.mean(0)
    _, _, v = torch.linalg.svd(joint, full_matrices=False)
    return v[:2].T


def plot_sphere_projection(models: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path: str,
                           max_points: int = 400) -> None:
    """Images and captions of each model projected on the unit circle (a 2-D principal plane of
    each model's own joint embedding, each point renormalised), with each modality's mean
    direction. Two separated arcs are the modality gap."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.4), squeeze=False)
    for ax, (name, (x, y)) in zip(axes[0], models.items()):
        basis = _shared_projection([(x, y)])
        centre = torch.cat([x, y]).double().mean(0)
        for feats, colour, label in ((x, "tab:blue", "image"), (y, "tab:orange", "text")):
            p = (feats[:max_points].double() - centre) @ basis
            p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
            ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.5, c=colour, label=label)
            m = (feats.double().mean(0) - centre) @ basis
            m = m / m.norm().clamp_min(1e-12)
            ax.annotate("", xy=(m[0], m[1]), xytext=(0, 0), arrowprops=dict(color=colour, width=2))
        gap = (x.double().mean(0) - y.double().mean(0)).norm().item()
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, lw=0.5, color="grey"))
        ax.set_title(f"{name}\nmodality gap {gap:.3f}")
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.2, 1.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Image and caption embeddings on the circle (principal plane, renormalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cosine_histograms(models: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path: str,
                           max_negatives: int = 200_000) -> None:
    """Histograms of positive (matching pair) and negative (non-matching) image-text cosines."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False, sharey=False)
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
    plt.close(fig)


def plot_metric_bars(table: Dict[str, Dict[str, float]], keys: Sequence[str], path: str) -> None:
    """One bar group per metric, one bar per model."""
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
    names = list(table)
    for ax, key in zip(axes[0], keys):
        ax.bar(range(len(names)), [table[n].get(key, float("nan")) for n in names],
               color=["tab:grey", "tab:blue", "tab:red", "tab:green"][:len(names)])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
