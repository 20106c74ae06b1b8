"""Geodesic (spherical) interpolation on the unit hypersphere and Beta sampling.

Pure tensor maths: nothing here knows about OpenCLIP's trainer.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch

__all__ = ["geodesic_mix", "sample_beta", "mix_unit_rows", "compute_dtype", "no_autocast"]

LambdaLike = Union[float, int, torch.Tensor]

# Rows whose norm is further than this from 1 are rejected: an OpenCLIP feature in
# bf16 is off by a few 1e-3, an unnormalised projection by far more.
UNIT_NORM_TOLERANCE = 1e-2


def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` (meta tensors, which have no autocast, get none)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32."""
    # Half precisions lose the small angles that matter near theta = 0 and pi.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lambda_column(lam: torch.Tensor, n: int, device, dtype) -> torch.Tensor:
    """Per-row lambda, shape (N,) or (N, 1), as a validated (N, 1) tensor in [0, 1]."""
    lam_t = lam.detach().to(device=device, dtype=dtype)
    if lam_t.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"geodesic_mix: lam must be a float or a tensor of shape ({n},) or ({n}, 1), "
            f"got shape {tuple(lam.shape)}"
        )
    lam_t = lam_t.reshape(n, 1)
    if not bool(torch.all((lam_t >= 0) & (lam_t <= 1))):
        raise ValueError("geodesic_mix: every lam must lie in [0, 1] (and be finite)")
    return lam_t


def _fallback_tangent(p: torch.Tensor) -> torch.Tensor:
    """A deterministic unit vector orthogonal to each row of ``p``.

    Used only where the great circle is undefined (b = -a) or degenerate (b = a):
    the basis vector along p's smallest coordinate, made orthogonal to p. For
    p and -p it gives the same vector, so both ends agree on the circle.
    """
    k = p.abs().argmin(dim=1, keepdim=True)  # (N, 1)
    e_k = torch.zeros_like(p).scatter_(1, k, 1.0)
    v = e_k - p.gather(1, k) * p
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _walk(p: torch.Tensor, q: torch.Tensor, cos_pq: torch.Tensor, phi: torch.Tensor,
          tol: float) -> torch.Tensor:
    """The point at angle ``phi`` from ``p`` along the great circle towards ``q``.

    Branch-free (no device sync): where the circle is degenerate (q = p or q = -p) the tangent
    falls back to ``_fallback_tangent``, selected per row with ``torch.where``.
    """
    w = q - cos_pq * p  # (N, D): q's component orthogonal to p, norm sin(theta)
    # A safe norm: its gradient is finite (zero) where w vanishes.
    w_norm = (w * w).sum(dim=1, keepdim=True).clamp_min(tol * tol).sqrt()
    tangent = torch.where(w_norm <= tol, _fallback_tangent(p.detach()), w / w_norm)
    return torch.cos(phi) * p + torch.sin(phi) * tangent


def _slerp(a: torch.Tensor, b: torch.Tensor, lam: Union[float, torch.Tensor]) -> torch.Tensor:
    """Slerp of unit rows (float32/64), lam a float or an (N, 1) tensor. No device sync and no
    data-dependent branch: non-finite rows give non-finite results, nothing raises."""
    tol = 10 * torch.finfo(a.dtype).eps
    cos_ab = (a * b).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    w = b - cos_ab * a
    sin_ab = (w * w).sum(dim=1, keepdim=True).clamp_min(tol * tol).sqrt()
    theta = torch.atan2(sin_ab, cos_ab)  # (N, 1), in [0, pi]
    # Walk from the nearer end point, so that both end points are exact.
    if isinstance(lam, torch.Tensor):
        from_a = _walk(a, b, cos_ab, (1 - lam) * theta, tol)
        from_b = _walk(b, a, cos_ab, lam * theta, tol)
        return torch.where(lam >= 0.5, from_a, from_b)
    if lam >= 0.5:
        return _walk(a, b, cos_ab, (1 - lam) * theta, tol)
    return _walk(b, a, cos_ab, lam * theta, tol)


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, lam: float):
    r"""``(alpha, beta)``, each (N,), with :math:`\mathrm{slerp}(a_i, b_i, \lambda) = \alpha_i a_i + \beta_i b_i`.

    The same walk as :func:`mix_unit_rows` (from the nearer end point, ``theta`` from ``atan2``)
    written as the coefficients of the two end points, so that a loss can turn products it
    already holds (:math:`\langle u, a_j\rangle`, :math:`\langle u, b_j\rangle`) into products
    with the mixes. Differentiable, branch-free, no device sync. Where the great circle is
    undefined (rows antipodal to within ``10 * eps``) ``mix_unit_rows`` walks along a fallback
    tangent, which is no combination of the two rows: there the combination is the start point
    times :math:`\cos\varphi` (finite, shorter than a unit vector). ``a``, ``b``: (N, D) unit rows
    in float32 or float64; ``lam`` in [0, 1].
    """
    tol = 10 * torch.finfo(a.dtype).eps
    cos_ab = (a * b).sum(dim=1).clamp(-1.0, 1.0)

    def tangent_step(w, phi):  # sin(phi) / |w|, and 0 where w vanishes (as _walk's fallback)
        norm_sq = (w * w).sum(dim=1)
        step = torch.sin(phi) / norm_sq.clamp_min(tol * tol).sqrt()
        return torch.where(norm_sq <= tol * tol, torch.zeros_like(step), step)

    w_from_a = b - cos_ab[:, None] * a
    theta = torch.atan2((w_from_a * w_from_a).sum(dim=1).clamp_min(tol * tol).sqrt(), cos_ab)
    if lam >= 0.5:  # m = cos(phi) a + sin(phi) (b - c a) / |b - c a|, phi = (1 - lam) theta
        phi = (1 - lam) * theta
        step = tangent_step(w_from_a, phi)
        return torch.cos(phi) - cos_ab * step, step
    phi = lam * theta  # m = cos(phi) b + sin(phi) (a - c b) / |a - c b|
    step = tangent_step(a - cos_ab[:, None] * b, phi)
    return step, torch.cos(phi) - cos_ab * step


def mix_unit_rows(a: torch.Tensor, b: torch.Tensor, lam: float,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``geodesic_mix`` without argument checks, for the training step: no device sync, no
    exception on data (NaN in, NaN out). ``lam`` is a Python float in [0, 1]. Computed in
    float32 (float64 for float64 inputs) with autocast off; returned in ``out_dtype``
    (default: the dtype of ``a``)."""
    dtype = compute_dtype(a.dtype)
    with no_autocast(a.device):
        return _slerp(a.to(dtype), b.to(dtype), float(lam)).to(out_dtype or a.dtype)


def geodesic_mix(a: torch.Tensor, b: torch.Tensor, lam: LambdaLike) -> torch.Tensor:
    r"""Spherical interpolation (slerp) between the rows of ``a`` and ``b``.

    .. math::
        m_i = \frac{\sin(\lambda_i\theta_i)}{\sin\theta_i}\,a_i
            + \frac{\sin((1-\lambda_i)\theta_i)}{\sin\theta_i}\,b_i,
        \qquad \theta_i = \angle(a_i, b_i)

    ``lam = 1`` gives ``a`` and ``lam = 0`` gives ``b`` (the convention of the
    m²-Mix reference implementation); the angle between ``m_i`` and ``b_i`` is
    ``lam_i * theta_i``.

    Unlike the closed form above, the computation walks from the nearer end point
    along the tangent direction, ``cos(phi) p + sin(phi) u``, with ``theta`` from
    ``atan2``. So the end points are returned exactly, and values and gradients are
    finite for identical rows (theta = 0) and for antipodal rows (theta = pi, where
    the great circle is not unique and a deterministic one is chosen).

    Gradients are those of slerp on the sphere: their components tangent to the sphere
    match the closed form's; the radial components (which ``F.normalize`` in a CLIP
    model removes) differ from the closed form's extension off the sphere.

    Args:
        a, b: (N, D) tensors whose rows are unit vectors (checked to 1e-2).
        lam: a float in [0, 1], or a tensor of shape (N,) or (N, 1). No gradient
            flows to ``lam``.

    Returns:
        (N, D) tensor of unit rows, in the dtype of ``a``. fp16 and bf16 inputs
        are computed in float32 (autocast is switched off inside).

    Raises:
        ValueError: shapes differ or are not 2-D, values are not finite, rows are
            not unit vectors, or ``lam`` lies outside [0, 1] or has the wrong shape.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError("geodesic_mix: a and b must be torch tensors")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"geodesic_mix: a and b must be (N, D) tensors of the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] < 2:
        raise ValueError(f"geodesic_mix: vectors need at least 2 dimensions, got D={a.shape[1]}")
    n = a.shape[0]
    out_dtype = a.dtype
    dtype = compute_dtype(a.dtype)
    with no_autocast(a.device):
        a32 = a.to(dtype)
        b32 = b.to(dtype)
        flags = torch.stack([
            ~torch.isfinite(a32).all(), ~torch.isfinite(b32).all(),
            ((a32.detach().norm(dim=1) - 1).abs() > UNIT_NORM_TOLERANCE).any(),
            ((b32.detach().norm(dim=1) - 1).abs() > UNIT_NORM_TOLERANCE).any(),
        ]).tolist()
        if flags[0] or flags[1]:
            raise ValueError("geodesic_mix: inputs contain NaN or Inf")
        if flags[2] or flags[3]:
            raise ValueError(
                "geodesic_mix: rows of a and b must be unit vectors; "
                "normalise them first, e.g. torch.nn.functional.normalize(x, dim=-1)"
            )
        if isinstance(lam, torch.Tensor) and lam.dim() > 0:  # one lambda per row
            lam = _lambda_column(lam, n, a.device, dtype)
        else:
            lam = float(lam)
            if not (0.0 <= lam <= 1.0):
                raise ValueError(f"geodesic_mix: lam must lie in [0, 1], got {lam!r}")
        mixed = _slerp(a32, b32, lam)
    return mixed.to(out_dtype)


def _log_gamma_sample(shape: float, generator: torch.Generator) -> float:
    """log of a Gamma(shape, 1) draw (Marsaglia and Tsang 2000), from ``generator``."""
    boost = 0.0
    if shape < 1.0:
        # Gamma(k) = Gamma(k + 1) * U^(1/k); kept in logs so tiny k cannot underflow.
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        boost = math.log(max(u, 1e-300)) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = torch.randn((), generator=generator, dtype=torch.float64).item()
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d * v) + boost


def sample_beta(alpha: float, beta: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, beta) from a ``torch.Generator`` (never global RNG state).

    Computed as G1 / (G1 + G2) with G ~ Gamma, in log space.
    """
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"sample_beta: alpha and beta must be > 0, got {alpha!r}, {beta!r}")
    log_g1 = _log_gamma_sample(alpha, generator)
    log_g2 = _log_gamma_sample(beta, generator)
    return 1.0 / (1.0 + math.exp(min(log_g2 - log_g1, 700.0)))
