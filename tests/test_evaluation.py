import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from m2mix_openclip.metrics import expected_calibration_error
from m2mix_openclip.retrieval import embedding_arithmetic, grouped_retrieval, retrieval_metrics


def test_ece_hand_worked():
    # every confidence 0.8, half right: one bin, |0.5 - 0.8| = 0.3
    assert expected_calibration_error(torch.full((10,), 0.8), torch.tensor([1, 0] * 5).bool()) == pytest.approx(0.3)
    # two bins: (0.95, all right) and (0.25, none right): 0.5 * 0.05 + 0.5 * 0.25
    conf = torch.tensor([0.95, 0.95, 0.25, 0.25])
    correct = torch.tensor([True, True, False, False])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.05 + 0.5 * 0.25)


def plain_ece(confidence, correct, bins=15):
    """The textbook loop: bins (lo, hi], the first [0, hi]; share * |accuracy - mean confidence|."""
    edges = [k / bins for k in range(bins + 1)]
    total = 0.0
    for b in range(bins):
        inside = [i for i, c in enumerate(confidence) if (edges[b] < c or b == 0) and c <= edges[b + 1]]
        if inside:
            accuracy = sum(correct[i] for i in inside) / len(inside)
            mean = sum(confidence[i] for i in inside) / len(inside)
            total += len(inside) / len(confidence) * abs(accuracy - mean)
    return total


def test_ece_equals_the_textbook_loop_with_edges_zero_and_one():
    g = torch.Generator().manual_seed(5)
    confidence = torch.cat([torch.rand(200, generator=g, dtype=torch.float64),
                            torch.tensor([0.0, 1.0, 1.0, 0.5, 1 / 3], dtype=torch.float64)])
    correct = torch.rand(len(confidence), generator=g) < confidence.float()
    want = plain_ece(confidence.tolist(), correct.tolist())
    assert expected_calibration_error(confidence, correct) == pytest.approx(want, abs=1e-12)
    assert expected_calibration_error(confidence, correct, bins=4) == pytest.approx(
        plain_ece(confidence.tolist(), correct.tolist(), 4), abs=1e-12)


def test_ece_counts_a_confidence_of_one_in_the_top_bin():
    # one bin (14/15, 1]: accuracy 1/2, mean confidence 0.975 (torchmetrics gives 0.525: 1.0 alone)
    assert expected_calibration_error(torch.tensor([1.0, 0.95]), torch.tensor([False, True])) == pytest.approx(0.475)
    # 0 joins the first bin, [0, 1/15]: accuracy 1/2, mean confidence 0.025
    assert expected_calibration_error(torch.tensor([0.0, 0.05]), torch.tensor([True, False])) == pytest.approx(0.475)


def test_ece_input_checks():
    assert expected_calibration_error(torch.empty(0), torch.empty(0, dtype=torch.bool)) == 0.0
    nan = expected_calibration_error(torch.tensor([0.5, float("nan")]), torch.tensor([True, False]))
    assert nan != nan  # a diverged model's evaluation reports NaN, it does not stop the run
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]; got -0\.1\.\.0\.5"):
        expected_calibration_error(torch.tensor([-0.1, 0.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="confidence has 2 values, correct 3"):
        expected_calibration_error(torch.tensor([0.1, 0.5]), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="bins must be a whole number >= 1, got 0"):
        expected_calibration_error(torch.tensor([0.1]), torch.tensor([True]), bins=0)


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


def random_order_hit(above, tied_positives, tied_negatives, k):
    """P(a positive within the top k) when the tie group is ordered at random: the positives among
    its first k - above places are hypergeometric, so a miss is C(n, r) / C(n + m, r)."""
    r = k - above
    if r <= 0:
        return 0.0
    if r > tied_negatives:  # more places than negatives in the group
        return 1.0
    return 1.0 - math.comb(tied_negatives, r) / math.comb(tied_negatives + tied_positives, r)


def brute_force_grouped(image_features, text_features, caption_image, ks):
    """Plain loops over the full matrix: the definition of multi-caption R@K, ties in random order."""
    s = image_features @ text_features.T
    out = {}
    i2t, t2i = [], []
    for i in range(s.shape[0]):
        positives = [t for t in range(s.shape[1]) if caption_image[t] == i]
        best = max(s[i, t].item() for t in positives)
        above = sum(1 for t in range(s.shape[1]) if s[i, t].item() > best)
        tied_positives = sum(1 for t in positives if s[i, t].item() == best)
        tied = sum(1 for t in range(s.shape[1]) if s[i, t].item() == best)
        i2t.append((above, tied_positives, tied - tied_positives))
    for t in range(s.shape[1]):
        own = s[caption_image[t], t].item()
        above = sum(1 for i in range(s.shape[0]) if s[i, t].item() > own)
        tied = sum(1 for i in range(s.shape[0]) if s[i, t].item() == own)
        t2i.append((above, 1, tied - 1))
    for k in ks:
        out[f"image_to_text_R@{k}"] = sum(random_order_hit(*r, k) for r in i2t) / len(i2t)
        out[f"text_to_image_R@{k}"] = sum(random_order_hit(*r, k) for r in t2i) / len(t2i)
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_grouped_retrieval_matches_brute_force_with_ties_and_odd_chunks(chunk_size):
    g = torch.Generator().manual_seed(1)
    # coarse, unnormalised vectors on a small integer grid: many exactly tied scores
    images = torch.randint(-1, 2, (11, 4), generator=g).float()
    captions_per_image = torch.randint(1, 5, (11,), generator=g)
    caption_image = torch.repeat_interleave(torch.arange(11), captions_per_image)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    texts = images[caption_image] + torch.randint(-1, 2, (len(caption_image), 4), generator=g).float()
    s = images @ texts.T
    assert len(s.unique()) < s.numel() / 4  # the ties are really there
    ks = (1, 2, 5)
    got = grouped_retrieval(images, texts, caption_image, ks=ks, chunk_size=chunk_size)
    want = brute_force_grouped(images, texts, caption_image.tolist(), ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_grouped_retrieval_counts_any_caption_of_the_image():
    # image 0 has captions 0, 1, 2 (caption 2 is its best match); image 1 has caption 3, but
    # captions 0 and 1 score higher with image 1 than caption 3 does
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.1, 0.99], [0.1, 0.99], [1.0, 0.0], [0.0, 0.5]])
    caption_image = torch.tensor([0, 0, 0, 1])
    r = grouped_retrieval(images, texts, caption_image, ks=(1, 3), labels=torch.tensor([5, 5, 5, 6]))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 2) and r["image_to_text_R@3"] == 1.0
    assert r["text_to_image_R@1"] == pytest.approx(2 / 4)  # captions 0 and 1 find image 1
    # per pair: image 0 weighs 3 captions and its top caption has its label; image 1's does not
    assert r["image_to_text_label_precision@1"] == pytest.approx(3 / 4)
    assert r["text_to_image_label_precision@1"] == pytest.approx(2 / 4)
    # exact-pair scoring of the same data counts only the row's own caption
    assert retrieval_metrics(images[caption_image], texts, ks=(1,))["image_to_text_R@1"] == pytest.approx(1 / 4)


def test_grouped_retrieval_errors():
    x = torch.eye(3)
    with pytest.raises(ValueError, match="have no caption"):
        grouped_retrieval(x, x[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="different labels"):
        grouped_retrieval(x[:1], x[:2], torch.tensor([0, 0]), labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pass caption_image"):
        retrieval_metrics(x[:1], x)


def test_grouped_ece_is_top1_confidence_against_a_positive_top1():
    images = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    caption_image = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    texts = F.normalize(images[caption_image] + 0.8 * torch.randn(9, 8, generator=torch.Generator().manual_seed(4)),
                        dim=1)
    r = grouped_retrieval(images, texts, caption_image, logit_scale=10.0)
    probs = (10.0 * images @ texts.T).softmax(dim=1)
    confidence, top = probs.max(dim=1)
    want = expected_calibration_error(confidence, caption_image[top] == torch.arange(6))
    assert r["image_to_text_ece"] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("above, positives, negatives", [(0, 1, 0), (0, 1, 3), (1, 2, 3), (0, 3, 4), (2, 1, 5),
                                                         (4, 2, 2), (0, 2, 7)])
def test_hit_probability_counts_every_order_of_the_tie_group(above, positives, negatives):
    """Each arrangement of the tie group, enumerated: the share in which a positive lands in the top k."""
    from m2mix_openclip.metrics import hit_probability
    group = [True] * positives + [False] * negatives
    orders = list(itertools.permutations(group))
    for k in (1, 2, 3, 5, 10):
        want = sum(any(order[:max(0, k - above)]) for order in orders) / len(orders)
        got = hit_probability(torch.tensor([above]), torch.tensor([positives]), torch.tensor([negatives]), k)
        assert got.item() == pytest.approx(want, abs=1e-12), k


def test_a_repeated_caption_is_not_credited_to_every_image():
    # four images, each with the same caption text (one embedding repeated): image->text R@1 is the
    # 1-in-4 chance of a random order, not 1 (the old rule credited every tie to the query)
    g = torch.Generator().manual_seed(7)
    images = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    caption = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    r = retrieval_metrics(images, caption.repeat(4, 1), ks=(1, 2, 4), labels=torch.tensor([0, 0, 1, 1]))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 4)
    assert r["image_to_text_R@2"] == pytest.approx(1 / 2)
    assert r["image_to_text_R@4"] == 1.0
    # label precision: half of the tied captions carry the image's label
    assert r["image_to_text_label_precision@1"] == pytest.approx(1 / 2)
    # ECE: every image's confidence is 1/4 (four tied candidates), its chance of a right top-1 1/4
    assert r["image_to_text_ece"] == pytest.approx(0.0, abs=1e-6)
    # text->image has no ties here: the same as the plain argmax
    top = (caption @ images.T).argmax().item()
    assert r["text_to_image_R@1"] == pytest.approx(1 / 4) and top in range(4)


def test_zero_shot_ties_share_the_places():
    from m2mix_openclip.metrics import zero_shot_scores
    # row 0: label tied with one class at the top (1/2 at top-1); row 1: clear hit; row 2: the label
    # ties with four classes below one higher class (top-1 miss; 5 places for 1 + 5 tied: 4/5 at top-5)
    sim = torch.tensor([[0.5, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0],
                        [0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.0],
                        [0.3, 0.3, 0.3, 0.3, 0.3, 0.9, 0.0]])
    scores = zero_shot_scores(sim, torch.tensor([1, 1, 2]), logit_scale=1.0)
    assert scores["top1"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert scores["top5"] == pytest.approx((1 + 1 + 4 / 5) / 3)
