import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F

from m2mix_openclip import embedding_geometry
from m2mix_openclip.metrics import uniformity


def pairs(n=40, d=6, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + shift, dim=1)
    y = F.normalize(x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) - shift, dim=1)
    return x.float(), y.float()


@pytest.mark.parametrize("block", [7, 64, 1 << 20])  # chunks of 1 row, a few rows, everything
def test_matches_brute_force(block):
    x, y = pairs(shift=0.7)
    got = embedding_geometry(x, y, block_elements=block)
    xd, yd = x.double(), y.double()
    expected = {
        "alignment": (xd - yd).norm(dim=1).pow(2).mean().item(),
        "uniformity_image": ref.uniformity_bruteforce(xd),
        "uniformity_text": ref.uniformity_bruteforce(yd),
        "uniformity_joint": ref.uniformity_bruteforce(torch.cat([xd, yd])),
        "relative_alignment": ref.relative_alignment_bruteforce(xd, yd),
        "modality_gap": (xd.mean(0) - yd.mean(0)).norm().item(),
        "positive_cosine": (xd * yd).sum(1).mean().item(),
        "negative_cosine": ((xd @ yd.T).sum() - (xd @ yd.T).trace()).item() / (40 * 39),
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key


def test_hand_worked_values():
    # Two images at +e1, -e1 and their captions at +e2, -e2: every image-caption pair is orthogonal.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    got = embedding_geometry(x, y)
    assert got["alignment"] == pytest.approx(2.0)  # ||e1 - e2||^2
    assert got["uniformity_image"] == pytest.approx(-8.0)  # log exp(-2 * 4)
    # joint: 6 pairs, 2 at distance^2 4 and 4 at distance^2 2
    assert got["uniformity_joint"] == pytest.approx(math.log((2 * math.exp(-8) + 4 * math.exp(-4)) / 6))
    assert got["relative_alignment"] == pytest.approx(0.0)
    assert got["modality_gap"] == pytest.approx(0.0)
    assert got["positive_cosine"] == pytest.approx(0.0)
    assert got["negative_cosine"] == pytest.approx(0.0)


def test_modality_gap_of_two_cones():
    g = torch.Generator().manual_seed(1)
    e = torch.zeros(200, 16)
    e[:, 0] = 1.0
    x = F.normalize(e + 0.01 * torch.randn(200, 16, generator=g), dim=1)
    y = F.normalize(-e + 0.01 * torch.randn(200, 16, generator=g), dim=1)
    assert embedding_geometry(x, y)["modality_gap"] == pytest.approx(2.0, abs=5e-3)


def test_uniformity_is_stable_where_naive_exp_underflows():
    # t = 2000: every exp(-t d^2) underflows in float32, the log-sum-exp does not.
    x, _ = pairs(30, 4)
    got = uniformity(x, t=2000.0).item()
    d2 = torch.pdist(x.double()).pow(2)
    expected = (torch.logsumexp(-2000.0 * d2, 0) - math.log(d2.numel())).item()
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-5)


def test_errors():
    x, y = pairs()
    with pytest.raises(ValueError, match="same shape"):
        embedding_geometry(x, y[:10])
    with pytest.raises(ValueError, match="at least 2"):
        embedding_geometry(x[:1], y[:1])
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        embedding_geometry(bad, y)
