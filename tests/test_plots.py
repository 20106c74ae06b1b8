"""The figure helpers: each writes a valid, non-blank PNG; importing them changes no global state."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2mix_openclip.plots import gap_plane, plot_cosine_histograms, plot_metric_bars, plot_sphere_projection


def features(seed, n=60, d=16, gap=0.5):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g) + gap, dim=1)
    y = F.normalize(x + 0.3 * torch.randn(n, d, generator=g) - gap, dim=1)
    return x, y


def assert_png(path, min_width=300):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_width and im.size[1] > 200
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


@pytest.mark.parametrize("plot", [plot_sphere_projection, plot_cosine_histograms])
def test_feature_figures_are_valid_pngs_one_panel_per_model(plot, tmp_path):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    plot({"a": features(0)}, str(one))
    plot({"a": features(0), "b": features(1)}, str(two))
    assert_png(one)
    assert_png(two)
    assert Image.open(two).size[0] > 1.5 * Image.open(one).size[0]  # a panel per model


def test_metric_bars_is_a_valid_png(tmp_path):
    path = tmp_path / "m.png"
    plot_metric_bars({"clip": {"alignment": 0.7, "modality_gap": 0.3},
                      "m2mix": {"alignment": 0.6, "modality_gap": 0.2}}, ["alignment", "modality_gap"], str(path))
    assert_png(path)


def test_gap_plane_is_orthonormal_and_first_axis_is_the_gap():
    x, y = features(2)
    basis = gap_plane(x, y)
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=basis.dtype), atol=1e-10)
    gap = (x.mean(0) - y.mean(0)).double()
    assert torch.allclose(basis[:, 0], gap / gap.norm(), atol=1e-10)


def test_import_changes_no_global_matplotlib_state():
    code = ("import matplotlib, sys; before = matplotlib.rcParams._get('backend'); "
            "import m2mix_openclip.plots; "
            "assert matplotlib.rcParams._get('backend') == before, (before, matplotlib.rcParams._get('backend')); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
