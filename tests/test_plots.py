"""The figure helpers: each writes a valid, non-blank PNG whose texts are all inside the canvas and
apart from each other; the marks are explained; importing them changes no global state."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.text import Text
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
    first = plot({"a": features(0)}, str(one))
    second = plot({"a": features(0), "b": features(1)}, str(two))
    assert_png(one)
    assert_png(two)
    assert [ax.get_title().split("\n")[0] for ax in second.axes] == ["a", "b"]  # a panel per model
    assert len(first.axes) == 1 and Image.open(two).size[0] >= Image.open(one).size[0]


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


@pytest.mark.slow  # a fresh process
def test_import_changes_no_global_matplotlib_state():
    code = ("import matplotlib, sys; before = matplotlib.rcParams._get('backend'); "
            "import m2mix_openclip.plots; "
            "assert matplotlib.rcParams._get('backend') == before, (before, matplotlib.rcParams._get('backend')); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def layout_problems(fig):
    """Texts (and legends, as whole boxes) that leave the canvas or overlap one another."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    skip = {id(t) for legend in legends for t in [*legend.texts, legend.get_title()]}
    for axis in [a for ax in fig.axes for a in (ax.xaxis, ax.yaxis)]:  # ticks outside the view are not drawn
        low, high = sorted(axis.get_view_interval())
        skip |= {id(label) for tick in axis.get_major_ticks() if not low - 1e-9 <= tick.get_loc() <= high + 1e-9
                 for label in (tick.label1, tick.label2)}
    boxes = [(repr(t.get_text()), t.get_window_extent(renderer)) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and id(t) not in skip]
    boxes += [(f"legend {[t.get_text() for t in legend.texts]}", legend.get_window_extent(renderer))
              for legend in legends]
    canvas = fig.bbox
    problems = [f"{name} leaves the canvas" for name, box in boxes
                if box.x0 < -1 or box.y0 < -1 or box.x1 > canvas.x1 + 1 or box.y1 > canvas.y1 + 1]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        overlap = box_a.intersection(box_a, box_b)
        if overlap is not None and overlap.width * overlap.height > 4:  # more than touching
            problems.append(f"{a} overlaps {b}")
    return problems


def texts(fig):
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible()]


LONG = "finetuned-m2mix/checkpoints/epoch_10.pt"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_feature_figures_keep_their_texts_apart_and_inside(count, tmp_path):
    models = {name: features(i) for i, name in enumerate(["pretrained", "finetuned clip", LONG][:count])}
    sphere = plot_sphere_projection(models, str(tmp_path / "s.png"))
    assert layout_problems(sphere) == []
    legend = [t.get_text() for t in sphere.legends[0].texts]
    assert legend == ["image embedding", "caption embedding", "mean image embedding", "mean caption embedding"]
    assert any("modality gap" in t for t in texts(sphere))
    cosines = plot_cosine_histograms(models, str(tmp_path / "c.png"))
    assert layout_problems(cosines) == []
    assert sum("matching pairs, mean" in t for t in texts(cosines)) == 2 * count
    x_ranges = {ax.get_xlim() for ax in cosines.axes}
    assert len(x_ranges) == 1  # one x axis for every model: the panels compare


@pytest.mark.parametrize("keys", [["alignment"], ["zero_shot_accuracy", "image_to_text_label_precision@1",
                                                  "modality_gap", "uniformity_joint", "alignment", "zzz"]])
def test_metric_bars_explain_themselves(keys, tmp_path):
    table = {name: {k: v for k, v in zip(keys, values)} for name, values in
             [("pretrained", [0.958, 0.965, 0.24, -2.6, 0.69, 3.0]), ("clip", [0.96, 0.97, 0.29, -2.46, 0.66, 4.0]),
              (LONG, [1.0, 0.96, 0.24, -2.41, 0.6, 5.0])]}
    fig = plot_metric_bars(table, keys, str(tmp_path / "m.png"), title="three models")
    assert layout_problems(fig) == []
    assert [t.get_text() for t in fig.legends[0].texts] == list(table)  # the models, named once
    titles = [ax.get_title() for ax in fig.axes]
    expected = {"alignment": "alignment\nlower is better \u2193", "zero_shot_accuracy":
                "zero-shot accuracy\nhigher is better \u2191",
                "modality_gap": "modality gap\nlower is better \u2193 (closer)", "zzz": "zzz\n",
                "uniformity_joint": "uniformity, joint\nlower is better \u2193",
                "image_to_text_label_precision@1": "image->text label precision@1\nhigher is better \u2191"}
    assert titles == [expected[k] for k in keys]
    for ax, key in zip(fig.axes, keys):
        shown = [t.get_text() for t in ax.texts]  # the value on each bar
        assert shown == [f"{table[n][key]:.3f}" for n in table]
        low, high = ax.get_ylim()
        if key in ("zero_shot_accuracy", "image_to_text_label_precision@1"):
            assert (low, high) == (0, 1.12)  # a metric in [0, 1] on that axis, with room for the labels
        assert low <= min(0.0, *[table[n][key] for n in table]) and high >= max(0.0, *[table[n][key] for n in table])


def test_both_mean_arrows_show_where_they_point_the_same_way(tmp_path):
    from matplotlib.colors import to_rgb
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(80, 16, generator=g) + 1.0, dim=1)
    fig = plot_sphere_projection({"no gap": (x, x.clone())}, str(tmp_path / "s.png"))  # the same mean twice
    ax = fig.axes[0]
    image_annotation, caption_annotation = ax.texts  # an annotation draws its arrow at its own z-order
    points = max(c.get_zorder() for c in ax.collections)
    assert points < image_annotation.get_zorder() < caption_annotation.get_zorder()  # arrows above the points
    assert image_annotation.arrowprops["width"] > 2 * caption_annotation.arrowprops["width"]  # wide under narrow
    # in the picture: both colours around the middle of the shafts (the points lie on the circle)
    pixels = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(float)
    scale = pixels.shape[0] / fig.bbox.height
    tip = np.array(image_annotation.xy, dtype=float)
    middle = ax.transData.transform(0.4 * tip) * scale
    column, row = int(middle[0]), int(pixels.shape[0] - middle[1])
    window = pixels[row - 6:row + 7, column - 6:column + 7].reshape(-1, 3)

    def present(colour):
        return (np.abs(window - 255 * np.array(to_rgb(colour))).sum(1) < 40).any()
    assert present("tab:blue") and present("tab:orange")


def test_uniformity_bars_rise_from_its_best_value_so_shorter_is_better(tmp_path):
    table = {"a": {"uniformity_joint": -2.6, "alignment": 0.7}, "b": {"uniformity_joint": -2.4, "alignment": 0.6}}
    fig = plot_metric_bars(table, ["uniformity_joint", "alignment"], str(tmp_path / "m.png"))
    uniformity, alignment = fig.axes[:2]
    bottoms = [bar.get_y() for bar in uniformity.patches]
    heights = [bar.get_height() for bar in uniformity.patches]
    assert bottoms == [-4.0, -4.0] and heights == pytest.approx([1.4, 1.6])  # the better (lower) one is shorter
    assert uniformity.get_ylim()[0] == -4.0 and "\u22124" in uniformity.get_ylabel()
    assert [bar.get_y() for bar in alignment.patches] == [0.0, 0.0]  # other panels start at zero
    assert [t.get_text() for t in uniformity.texts] == ["-2.600", "-2.400"]  # the values, not the heights
    assert layout_problems(fig) == []
