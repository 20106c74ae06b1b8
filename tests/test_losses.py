import pytest
import reference as ref
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from m2mix_openclip import M2MixLoss


def features(n=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return x, y


SCALE = torch.tensor(14.0, dtype=torch.float64)


def test_contrastive_term_is_clip_loss():
    x, y = features(16, 32, dtype=torch.float32)
    scale = torch.tensor(30.0)
    ours = M2MixLoss()(x, y, scale, output_dict=True)["contrastive_loss"]
    # one product for both directions: equal to ClipLoss up to float rounding
    torch.testing.assert_close(ours, ClipLoss()(x, y, scale), rtol=1e-6, atol=0)
    bias = torch.tensor(-3.0)
    torch.testing.assert_close(M2MixLoss()(x, y, scale, bias, output_dict=True)["contrastive_loss"],
                               ClipLoss()(x, y, scale, bias), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, ref.clip_terms(x, y, x, y, 0, scale))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9])
def test_m2mix_term_matches_transcription(lam):
    x, y = features()
    loss = M2MixLoss(m2mix_weight=1.0, mix_schedule="constant", m2mix_temperature=0.07)
    out = loss(x, y, SCALE, output_dict=True, mix_lambda=lam)
    torch.testing.assert_close(out["m2mix_loss"], ref.m2mix_term(x, y, x, y, 0, lam, 0.07))
    assert loss.last_lambdas == {"m2mix": lam}


def test_m2mix_weight_and_learned_temperature():
    x, y = features()
    loss = M2MixLoss(m2mix_weight=0.5, mix_schedule="constant", m2mix_temperature=None)
    out = loss(x, y, SCALE, output_dict=True, mix_lambda=0.4)
    torch.testing.assert_close(out["m2mix_loss"], 0.5 * ref.m2mix_term(x, y, x, y, 0, 0.4, 1 / SCALE))


@pytest.mark.parametrize("kind", ["vmix", "lmix", "vlmix"])
@pytest.mark.parametrize("n", [6, 7])  # odd n: the middle sample is its own partner
def test_unimodal_terms_match_transcription(kind, n):
    x, y = features(n)
    loss = M2MixLoss(m2mix_weight=0.0, mix_schedule="constant", **{f"{kind}_weight": 2.0})
    out = loss(x, y, SCALE, output_dict=True, mix_lambda=0.3)
    assert set(out) == {"contrastive_loss", f"{kind}_loss"}
    pair = torch.arange(n - 1, -1, -1)
    torch.testing.assert_close(out[f"{kind}_loss"], 2.0 * ref.unimix_term(kind, x, y, x, y, 0, 0.3, pair, SCALE))


@pytest.mark.parametrize("kind", ["vmix", "lmix", "vlmix"])
@pytest.mark.parametrize("n", [8, 9])
def test_random_pairing_matches_transcription_for_the_drawn_permutation(kind, n):
    x, y = features(n)
    loss = M2MixLoss(m2mix_weight=0.0, mix_pairing="random", mix_schedule="constant", seed=3,
                     **{f"{kind}_weight": 1.0})
    for _ in range(3):  # a new pairing each step
        out = loss(x, y, SCALE, output_dict=True, mix_lambda=0.3)
        pair = loss.last_pairings[kind]
        torch.testing.assert_close(out[f"{kind}_loss"], ref.unimix_term(kind, x, y, x, y, 0, 0.3, pair, SCALE))
    # a perfect matching: every sample's partner is paired back, one fixed point for odd n
    assert torch.equal(pair[pair], torch.arange(n))
    assert int((pair == torch.arange(n)).sum()) == n % 2


def test_random_pairing_is_a_uniform_matching_from_the_loss_generator():
    from m2mix_openclip.losses.terms import pair_partners
    x, y = features(8)
    loss = M2MixLoss(m2mix_weight=0.0, vmix_weight=1.0, mix_pairing="random", seed=3)
    loss(x, y, SCALE, mix_lambda=0.6)  # lambda pinned: the pairing is the only draw
    assert torch.equal(loss.last_pairings["vmix"], pair_partners(8, "random", torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(0)
    seen = {tuple(pair_partners(4, "random", g).tolist()) for _ in range(200)}
    assert seen == {(1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0)}  # the 3 perfect matchings of 4


@pytest.mark.parametrize("kind", ["vmix", "lmix"])
def test_unimodal_targets_are_right_for_a_permutation_that_is_not_its_own_inverse(kind):
    """The soft targets of the uni-modal terms, for a 3-cycle plus a swap (not an involution)."""
    from m2mix_openclip.losses.terms import mix_target_rows, unimodal_mix_term
    from m2mix_openclip.mixup import mix_unit_rows
    x, y = features(5)
    pair = torch.tensor([1, 2, 0, 4, 3])
    assert not torch.equal(pair[pair], torch.arange(5))
    lam = 0.3
    image_cols = mix_unit_rows(x, x[pair], lam) if kind == "vmix" else x
    text_cols = mix_unit_rows(y, y[pair], lam) if kind == "lmix" else y
    mixed_rows, plain_rows = mix_target_rows(pair, 0, 5, lam, x.dtype, x.device)
    targets = (mixed_rows, plain_rows) if kind == "vmix" else (plain_rows, mixed_rows)
    ours = unimodal_mix_term(image_cols, text_cols, image_cols, text_cols, *targets, SCALE)
    torch.testing.assert_close(ours, ref.unimix_term(kind, x, y, x, y, 0, lam, pair, SCALE))
    # the transposed targets (the bug this guards against) give another value
    wrong = unimodal_mix_term(image_cols, text_cols, image_cols, text_cols, *reversed(targets), SCALE)
    assert abs(float(wrong) - float(ours)) > 1e-3


def test_unimodal_temperature_can_be_fixed():
    x, y = features()
    loss = M2MixLoss(m2mix_weight=0.0, vmix_weight=1.0, unimix_temperature=0.01, mix_schedule="constant")
    out = loss(x, y, SCALE, output_dict=True, mix_lambda=0.3)
    pair = torch.arange(5, -1, -1)
    torch.testing.assert_close(out["vmix_loss"], ref.unimix_term("vmix", x, y, x, y, 0, 0.3, pair, 100.0))
    torch.testing.assert_close(out["contrastive_loss"], ref.clip_terms(x, y, x, y, 0, SCALE))


def test_inverse_epoch_schedule_and_sum_without_output_dict():
    x, y = features()
    loss = M2MixLoss(m2mix_weight=1.0, vmix_weight=1.0)
    first = loss(x, y, SCALE, output_dict=True, mix_lambda=0.3)
    loss.set_epoch(3)
    later = loss(x, y, SCALE, output_dict=True, mix_lambda=0.3)
    torch.testing.assert_close(later["m2mix_loss"], first["m2mix_loss"] / 4)
    torch.testing.assert_close(later["vmix_loss"], first["vmix_loss"] / 4)
    torch.testing.assert_close(later["contrastive_loss"], first["contrastive_loss"])
    total = loss(x, y, SCALE, mix_lambda=0.3)
    torch.testing.assert_close(total, sum(later.values()))
    with pytest.raises(ValueError, match="epoch"):
        loss.set_epoch(-1)


def test_lambda_sequence_is_seeded_and_resumable():
    x, y = features()
    a, b = M2MixLoss(seed=7), M2MixLoss(seed=7)
    seq_a = []
    for _ in range(3):
        a(x, y, SCALE)
        seq_a.append(a.last_lambdas["m2mix"])
    saved = a.state_dict()
    for _ in range(3):
        b(x, y, SCALE)
    assert [a.last_lambdas] and seq_a[-1] == b.last_lambdas["m2mix"]
    assert len(set(seq_a)) == 3 and all(0 < v < 1 for v in seq_a)
    next_a = []
    for _ in range(2):
        a(x, y, SCALE)
        next_a.append(a.last_lambdas["m2mix"])
    resumed = M2MixLoss(seed=123)
    resumed.load_state_dict(saved)
    next_resumed = []
    for _ in range(2):
        resumed(x, y, SCALE)
        next_resumed.append(resumed.last_lambdas["m2mix"])
    assert next_resumed == next_a
    state = torch.random.get_rng_state()
    M2MixLoss(seed=0)(x, y, SCALE)
    assert torch.equal(state, torch.random.get_rng_state()), "global RNG must not be touched"


@pytest.mark.parametrize("kwargs,match", [
    ({"m2mix_alpha": 0.0}, "m2mix_alpha"),
    ({"unimix_alpha": -1.0}, "unimix_alpha"),
    ({"m2mix_weight": -0.1}, "m2mix_weight"),
    ({"vlmix_weight": float("nan")}, "vlmix_weight"),
    ({"m2mix_temperature": 0.0}, "m2mix_temperature"),
    ({"unimix_temperature": -1.0}, "unimix_temperature"),
    ({"calls_per_step": 0}, "calls_per_step"),
    ({"mix_schedule": "cosine"}, "mix_schedule"),
    ({"mix_pairing": "shuffle"}, "mix_pairing"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M2MixLoss(**kwargs)


def test_bad_forward_inputs():
    x, y = features()
    loss = M2MixLoss()
    with pytest.raises(ValueError, match="at least 2"):
        loss(x[:1], y[:1], SCALE)
    with pytest.raises(ValueError, match="same shape"):
        loss(x, y[:5], SCALE)
    with pytest.raises(TypeError, match="dist_image_features"):
        loss(x, y, SCALE, dist_image_features=x)
    with pytest.raises(ValueError, match="mix_lambda"):
        loss(x, y, SCALE, mix_lambda=2.0)


def test_identical_image_and_text_give_finite_loss_and_gradients():
    x, _ = features(8, 16, dtype=torch.float32)
    img, txt = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = M2MixLoss(vmix_weight=1.0, lmix_weight=1.0, vlmix_weight=1.0)(img, txt, torch.tensor(50.0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


def test_bf16_autocast_is_finite_and_close_to_fp32():
    x, y = features(32, 64, dtype=torch.float32)
    loss = M2MixLoss(m2mix_weight=1.0, vmix_weight=1.0, lmix_weight=1.0, vlmix_weight=1.0)
    full = loss(x, y, torch.tensor(20.0), mix_lambda=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_lin = torch.nn.Linear(64, 64, bias=False)
        x_lin.weight.data = torch.eye(64)
        xb, yb = F.normalize(x_lin(x), dim=1), F.normalize(x_lin(y), dim=1)  # bf16 features
        assert xb.dtype == torch.bfloat16
        half = loss(xb, yb, torch.tensor(20.0), mix_lambda=0.3)
    assert torch.isfinite(half)
    torch.testing.assert_close(half.float(), full, rtol=3e-2, atol=0)


def test_cross_entropy_with_positive_matches_scatter_and_gradcheck():
    from m2mix_openclip.losses.terms import _CrossEntropyWithPositive
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    positive = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 2, 8, 4, 5])
    ours = _CrossEntropyWithPositive.apply(logits, positive, target)
    plain = F.cross_entropy(logits.scatter(1, target[:, None], positive[:, None]), target)
    torch.testing.assert_close(ours, plain)
    assert torch.autograd.gradcheck(lambda lg, p: _CrossEntropyWithPositive.apply(lg, p, target), (logits, positive))
    again = _CrossEntropyWithPositive.apply(logits, positive, target)
    first = torch.autograd.grad(again, [logits, positive], retain_graph=True)
    second = torch.autograd.grad(again, [logits, positive])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_non_unit_features_are_rejected_at_the_first_call():
    x, y = features()
    with pytest.raises(ValueError, match="unit-norm"):
        M2MixLoss()(3 * x, y, SCALE)
    # plain CLIP (every mixing weight 0) accepts any features, as ClipLoss does
    M2MixLoss(m2mix_weight=0.0)(3 * x, y, SCALE)
    # checked once, at the first call: later steps never raise on data
    loss = M2MixLoss()
    loss(x, y, SCALE)
    assert torch.isfinite(loss(3 * x, y, SCALE))


def test_m2mix_term_under_bf16_autocast_equals_fp32_of_the_same_rounded_features():
    """The positive <x_i, y_i> and the mixed negatives <x_i, m_j> share one precision path."""
    x, y = features(32, 64, dtype=torch.float32)
    xb, yb = x.bfloat16(), y.bfloat16()
    loss = M2MixLoss(m2mix_weight=1.0, mix_schedule="constant")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(xb, yb, torch.tensor(20.0), output_dict=True, mix_lambda=0.3)["m2mix_loss"]
    x32, y32 = xb.double(), yb.double()  # the same rounded features, computed in float64
    expected = ref.m2mix_term(x32, y32, x32, y32, 0, 0.3, 0.07)
    torch.testing.assert_close(under_autocast.double(), expected, rtol=1e-5, atol=0)
