import pytest
import torch
import torch.nn.functional as F

from m2mix_openclip.evaluation import embedding_arithmetic, expected_calibration_error, retrieval_metrics


def test_ece_hand_worked():
    # every confidence 0.8, half right: one bin, |0.5 - 0.8| = 0.3
    assert expected_calibration_error(torch.full((10,), 0.8), torch.tensor([1, 0] * 5).bool()) == pytest.approx(0.3)
    # two bins: (0.95, all right) and (0.25, none right): 0.5 * 0.05 + 0.5 * 0.25
    conf = torch.tensor([0.95, 0.95, 0.25, 0.25])
    correct = torch.tensor([True, True, False, False])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.05 + 0.5 * 0.25)


def test_retrieval_of_identical_modalities_and_label_precision():
    x = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    r = retrieval_metrics(x, x.clone(), labels=torch.arange(20) % 4)
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0
    assert r["image_to_text_label_precision@1"] == 1.0
    shuffled = retrieval_metrics(x, x.roll(1, dims=0))  # caption i is at row i+1
    assert shuffled["image_to_text_R@1"] == 0.0


def test_embedding_arithmetic_on_a_compositional_set():
    # images of (shape, colour); captions name a colour and carry a modality offset
    g = torch.Generator().manual_seed(0)
    shapes, colours = torch.randn(6, 32, generator=g), torch.randn(5, 32, generator=g)
    offset = 2.0 * torch.randn(32, generator=g)
    img = lambda s, c: F.normalize(shapes[s] + colours[c] + 0.05 * torch.randn(32, generator=g), dim=0)
    txt = lambda c: F.normalize(colours[c] + offset, dim=0)
    gallery = torch.stack([img(s, c) for s in range(6) for c in range(5)])
    row = lambda s, c: s * 5 + c
    triples = [(s, c1, c2) for s in range(6) for c1 in range(5) for c2 in range(5) if c1 != c2]
    q = torch.stack([gallery[row(s, c1)] for s, c1, _ in triples])
    src = torch.stack([txt(c1) for _, c1, _ in triples])
    tgt = torch.stack([txt(c2) for _, _, c2 in triples])
    target = torch.tensor([row(s, c2) for s, _, c2 in triples])
    own = torch.tensor([row(s, c1) for s, c1, _ in triples])
    good = embedding_arithmetic(q, src, tgt, gallery, target, own, scale=2.0)
    assert good["arithmetic_R@1"] > 0.9
    wrong = embedding_arithmetic(q, src, tgt[torch.randperm(len(triples), generator=g)], gallery, target, own, 2.0)
    assert wrong["arithmetic_R@1"] < 0.4
