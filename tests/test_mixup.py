import math

import pytest
import torch
import torch.nn.functional as F
from reference import slerp

from m2mix_openclip import geodesic_mix, sample_beta


def unit(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def angle(u, v):
    return torch.acos((F.normalize(u.double(), dim=1) * F.normalize(v.double(), dim=1)).sum(1).clamp(-1, 1))


def test_orthogonal_midpoint_is_normalised_sum():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, -0.8, 0.6]])
    torch.testing.assert_close(geodesic_mix(a, b, 0.5), (a + b) / math.sqrt(2))


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.37, 0.5, 0.8, 1.0])
def test_angle_to_b_is_lambda_theta_and_rows_are_unit(lam):
    a, b = unit(64, 16, 1), unit(64, 16, 2)
    m = geodesic_mix(a, b, lam)
    torch.testing.assert_close(angle(m, b), lam * angle(a, b), atol=2e-6, rtol=0)
    torch.testing.assert_close(angle(m, a), (1 - lam) * angle(a, b), atol=2e-6, rtol=0)
    torch.testing.assert_close(m.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)


def test_matches_textbook_closed_form_with_per_row_lambda():
    a, b = unit(32, 8, 3, torch.float64), unit(32, 8, 4, torch.float64)
    lam = torch.rand(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = slerp(a, b, lam[:, None])
    torch.testing.assert_close(geodesic_mix(a, b, lam), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(geodesic_mix(a, b, lam[:, None]), expected, atol=1e-12, rtol=0)


def test_end_points_are_exact():
    a, b = unit(16, 8, 5), unit(16, 8, 6)
    assert torch.equal(geodesic_mix(a, b, 1.0), a)
    assert torch.equal(geodesic_mix(a, b, 0.0), b)
    lam = torch.tensor([1.0, 0.0] * 8)
    out = geodesic_mix(a, b, lam)
    assert torch.equal(out[0::2], a[0::2]) and torch.equal(out[1::2], b[1::2])


def _degenerate_pairs():
    a = unit(8, 16, 7, torch.float32)
    noise = 1e-7 * unit(8, 16, 8, torch.float32)
    return {
        "identical": (a, a.clone()),
        "nearly identical": (a, F.normalize(a + noise, dim=1)),
        "antipodal": (a, -a),
        "nearly antipodal": (a, F.normalize(-a + noise, dim=1)),
    }


@pytest.mark.parametrize("case", ["identical", "nearly identical", "antipodal", "nearly antipodal"])
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_degenerate_angles_give_finite_unit_rows_and_gradients(case, lam):
    a0, b0 = _degenerate_pairs()[case]
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    m = geodesic_mix(a, b, lam)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    (m * torch.linspace(-1, 1, m.numel()).view_as(m)).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    if case.endswith("identical"):
        torch.testing.assert_close(m.detach(), a0, atol=1e-5, rtol=0)
    if case == "antipodal":  # a great circle through a and -a: the angle to a is (1 - lam) * pi
        torch.testing.assert_close(angle(m.detach(), a0), torch.full((8,), (1 - lam) * math.pi, dtype=torch.float64),
                                   atol=1e-3, rtol=0)


def test_gradient_matches_finite_differences():
    a = unit(4, 5, 9, torch.float64).requires_grad_()
    b = unit(4, 5, 10, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: geodesic_mix(u, v, 0.3), (a, b), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda u, v: geodesic_mix(u, v, 0.8), (a, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32_and_returns_input_dtype(dtype):
    a, b = unit(32, 64, 11), unit(32, 64, 12)
    out = geodesic_mix(a.to(dtype), b.to(dtype), 0.3)
    assert out.dtype == dtype
    expected = geodesic_mix(a.to(dtype).float(), b.to(dtype).float(), 0.3)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert geodesic_mix(a, b, 0.3).dtype == torch.float32


@pytest.mark.parametrize("a_shape,b_shape", [((4, 8), (4, 9)), ((4, 8), (5, 8)), ((8,), (8,)), ((2, 4, 8), (2, 4, 8))])
def test_shape_errors_name_the_shapes(a_shape, b_shape):
    with pytest.raises(ValueError, match="same shape"):
        geodesic_mix(torch.ones(a_shape), torch.ones(b_shape), 0.5)


def test_bad_values_raise_clear_errors():
    a, b = unit(4, 8, 13), unit(4, 8, 14)
    bad = a.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        geodesic_mix(bad, b, 0.5)
    with pytest.raises(ValueError, match="unit vectors"):
        geodesic_mix(3 * a, b, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        geodesic_mix(a, b, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        geodesic_mix(a, b, torch.tensor([0.1, -0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match="shape"):
        geodesic_mix(a, b, torch.ones(3))


def test_sample_beta_matches_arcsine_cdf_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_beta(0.5, 0.5, g) for _ in range(4000)], dtype=torch.float64)
    assert ((draws > 0) & (draws < 1)).all()
    # Beta(1/2, 1/2) is the arcsine law: F(x) = 2/pi * asin(sqrt(x)). Kolmogorov-Smirnov distance:
    xs = draws.sort().values
    cdf = 2 / math.pi * torch.asin(xs.sqrt())
    ecdf = torch.arange(1, len(xs) + 1, dtype=torch.float64) / len(xs)
    assert (cdf - ecdf).abs().max() < 1.63 / math.sqrt(len(xs))  # 1% critical value
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_beta(0.5, 0.5, g1) for _ in range(5)] == [sample_beta(0.5, 0.5, g2) for _ in range(5)]


def test_sample_beta_moments_for_asymmetric_and_tiny_parameters():
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample_beta(2.0, 5.0, g) for _ in range(4000)])
    assert abs(draws.mean().item() - 2 / 7) < 0.01
    tiny = [sample_beta(0.01, 0.01, g) for _ in range(200)]
    assert all(0.0 <= v <= 1.0 for v in tiny) and all(math.isfinite(v) for v in tiny)
    with pytest.raises(ValueError, match="> 0"):
        sample_beta(0.0, 1.0, g)
