"""m²-Mix for SigLIP, CoCa and distillation, against plain transcriptions written here."""

import math
import os
import time
from argparse import Namespace

import pytest
import reference as ref
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import CoCaLoss, DistillClipLoss, SigLipLoss
from test_distributed import _free_port

from m2mix_openclip import M2MixCoCaLoss, M2MixDistillLoss, M2MixLoss, M2MixSigLipLoss
from m2mix_openclip.integration.families import build_m2mix_loss, loss_family, validate_family

SOFTMAX_TERMS = dict(m2mix_weight=0.5, vmix_weight=0.3, lmix_weight=0.2, vlmix_weight=0.1)
NO_MIXING = dict(m2mix_weight=0.0, vmix_weight=0.0, lmix_weight=0.0, vlmix_weight=0.0)


def unit_rows(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def sigmoid_m2mix_reference(x, y, lam, scale, bias):
    """The sigmoid m²-Mix term, one (anchor, mix) pair at a time: mean over the 2G(G-1) pairs of
    -log sigmoid(-(s <a, m_j> + b)), anchors a = x_i and y_i, negatives m_j (j != i)."""
    mixed = ref.slerp(x, y, lam).to(x.dtype)
    num = x.shape[0]
    total = 0.0
    for i in range(num):
        for j in range(num):
            if j == i:
                continue
            for anchor in (x[i], y[i]):
                total = total - F.logsigmoid(-(scale * (anchor * mixed[j]).sum() + bias))
    return total / (2 * num * (num - 1))


def siglip_reference(x, y, scale, bias):
    """SigLIP's value, pair by pair: (1/G) sum_ij -log sigmoid(z_ij (s <x_i, y_j> + b))."""
    num = x.shape[0]
    total = 0.0
    for i in range(num):
        for j in range(num):
            sign = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(sign * (scale * (x[i] * y[j]).sum() + bias))
    return total / num


# -- SigLIP --------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,bias_arg,expected_bias", [
    (None, None, "learned"), (0.07, None, -1 / 0.07), (0.1, -3.0, -3.0)])
def test_sigmoid_term_matches_the_pairwise_transcription(temperature, bias_arg, expected_bias):
    raw_x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    raw_y = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    loss = M2MixSigLipLoss(m2mix_weight=0.6, m2mix_temperature=temperature, m2mix_bias=bias_arg,
                           mix_schedule="constant", seed=3)
    x, y = F.normalize(raw_x, dim=1), F.normalize(raw_y, dim=1)
    terms = loss(x, y, scale, bias, output_dict=True)
    lam = loss.last_lambdas["m2mix"]
    s, b = (scale, bias) if expected_bias == "learned" else (1 / temperature, expected_bias)
    expected = {"contrastive_loss": siglip_reference(x, y, scale, bias),
                "m2mix_loss": 0.6 * sigmoid_m2mix_reference(x, y, lam, s, b)}
    assert set(terms) == set(expected)
    for k in expected:
        torch.testing.assert_close(terms[k], expected[k], rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(sum(terms.values()), [raw_x, raw_y, scale, bias], retain_graph=True)
    want = torch.autograd.grad(sum(expected.values()), [raw_x, raw_y, scale, bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [None, 0.07])
def test_siglip_block_from_reused_products_equals_the_terms_computed_apart(temperature):
    """reuse_products (SigLIP's products turned into the mixes' by the slerp coefficients, one
    grouped backward pass) against SigLipLoss._loss and m2mix_sigmoid_term apart: values and
    gradients, scale and bias included."""
    results = []
    for reuse in (True, False):
        raw_x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
        raw_y = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
        scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
        loss = M2MixSigLipLoss(m2mix_weight=0.8, m2mix_temperature=temperature, mix_schedule="constant", seed=1)
        loss.reuse_products = reuse
        terms = loss(F.normalize(raw_x, dim=1), F.normalize(raw_y, dim=1), scale, bias, output_dict=True)
        grads = torch.autograd.grad(terms["contrastive_loss"] + 3 * terms["m2mix_loss"], [raw_x, raw_y, scale, bias])
        results.append((terms, grads))
    (reused, reused_grads), (apart, apart_grads) = results
    for name in ("contrastive_loss", "m2mix_loss"):
        torch.testing.assert_close(reused[name], apart[name], rtol=1e-12, atol=1e-14)
    for got, want in zip(reused_grads, apart_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_sigmoid_term_size_does_not_grow_with_the_batch():
    """A mean over (anchor, negative) pairs: the same size at G = 8 and G = 256 (a per-anchor
    normalisation, as SigLIP's, would be 36x larger at 256 than at 8)."""
    sizes = {}
    for num in (8, 256):
        values = []
        for seed in range(4):
            x, y = unit_rows(num, 16, seed), unit_rows(num, 16, 100 + seed)
            loss = M2MixSigLipLoss(m2mix_weight=1.0, m2mix_temperature=None, mix_schedule="constant", seed=seed)
            values.append(loss(x, y, torch.tensor(10.0), torch.tensor(-5.0), output_dict=True)["m2mix_loss"])
        sizes[num] = torch.stack(values).mean().item()
    assert 0.7 < sizes[256] / sizes[8] < 1.4, sizes


def test_siglip_with_mixing_off_is_openclip_siglip_exactly():
    x, y = unit_rows(9, 12, 0, torch.float32), unit_rows(9, 12, 1, torch.float32)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = M2MixSigLipLoss(m2mix_weight=0.0)(x, y, scale, bias, output_dict=True)
    assert set(ours) == {"contrastive_loss"}
    assert torch.equal(ours["contrastive_loss"], SigLipLoss()(x, y, scale, bias))


def test_siglip_refuses_unimodal_terms_and_a_bias_without_a_fixed_temperature():
    for name in ("vmix_weight", "lmix_weight", "vlmix_weight"):
        with pytest.raises(ValueError, match=f"{name} must be 0: V-Mix, L-Mix and VL-Mix are soft-target"):
            M2MixSigLipLoss(**{name: 0.1})
    with pytest.raises(ValueError, match="with m2mix_temperature=None the model's logit_bias is used"):
        M2MixSigLipLoss(m2mix_temperature=None, m2mix_bias=-3.0)
    with pytest.raises(ValueError, match="m2mix_bias must be a finite number"):
        M2MixSigLipLoss(m2mix_bias=float("nan"))


# -- CoCa and distillation -------------------------------------------------------------------------

def coca_outputs(num=6, dim=8, seq=5, vocab=11):
    g = torch.Generator().manual_seed(4)
    return dict(image_features=unit_rows(num, dim, 5), text_features=unit_rows(num, dim, 6),
                logits=torch.randn(num, seq, vocab, generator=g, dtype=torch.float64),
                labels=torch.randint(0, vocab, (num, seq), generator=g), logit_scale=torch.tensor(9.0))


def distill_outputs(num=6, dim=8):
    return dict(image_features=unit_rows(num, dim, 7), text_features=unit_rows(num, dim, 8),
                logit_scale=torch.tensor(9.0), dist_image_features=unit_rows(num, dim, 9),
                dist_text_features=unit_rows(num, dim, 10), dist_logit_scale=torch.tensor(20.0))


def test_coca_and_distill_with_mixing_off_are_openclip_exactly():
    out = coca_outputs()
    ours = M2MixCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5, **NO_MIXING)(**out, output_dict=True)
    theirs = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5)(**out, output_dict=True)
    assert list(ours) == ["contrastive_loss", "caption_loss"]
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    out = distill_outputs()
    ours = M2MixDistillLoss(**NO_MIXING)(**out, output_dict=True)
    theirs = DistillClipLoss()(**out, output_dict=True)
    assert list(ours) == ["contrastive_loss", "distill_loss"]
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def expected_softmax_mixing(x, y, lambdas, scale):
    num = x.shape[0]
    pair = torch.arange(num - 1, -1, -1)
    terms = {"m2mix_loss": SOFTMAX_TERMS["m2mix_weight"] * ref.m2mix_term(x, y, x, y, 0, lambdas["m2mix"], 0.07)}
    for kind in ("vmix", "lmix", "vlmix"):
        terms[f"{kind}_loss"] = SOFTMAX_TERMS[f"{kind}_weight"] * ref.unimix_term(
            kind, x, y, x, y, 0, lambdas[kind], pair, scale)
    return terms


def test_coca_adds_the_mixing_terms_to_its_own():
    out = coca_outputs()
    loss = M2MixCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5, mix_schedule="constant", **SOFTMAX_TERMS)
    ours = loss(**out, output_dict=True)
    theirs = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5)(**out, output_dict=True)
    expected = dict(theirs, **expected_softmax_mixing(out["image_features"], out["text_features"],
                                                      loss.last_lambdas, 9.0))
    assert list(ours) == ["contrastive_loss", "caption_loss", "m2mix_loss", "vmix_loss", "lmix_loss", "vlmix_loss"]
    for k, v in expected.items():
        torch.testing.assert_close(ours[k].double(), v.double(), rtol=1e-6, atol=1e-9)
    assert len(loss(**out)) == 6  # without output_dict: CoCaLoss's tuple, with the mixing terms after it


def test_distill_adds_the_mixing_terms_on_the_student():
    out = distill_outputs()
    loss = M2MixDistillLoss(mix_schedule="constant", **SOFTMAX_TERMS)
    ours = loss(**out, output_dict=True)
    theirs = DistillClipLoss()(**out, output_dict=True)
    expected = dict(theirs, **expected_softmax_mixing(out["image_features"], out["text_features"],
                                                      loss.last_lambdas, 9.0))
    assert list(ours) == ["contrastive_loss", "distill_loss", "m2mix_loss", "vmix_loss", "lmix_loss", "vlmix_loss"]
    for k, v in expected.items():
        torch.testing.assert_close(ours[k].double(), v.double(), rtol=1e-6, atol=1e-9)


# -- the training step: no host sync, NaN semantics -----------------------------------------------

def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=True)


def family_calls():
    """(loss, model outputs on the meta device, the tensors that must get gradients)."""
    x, y, scale, bias = meta(6, 16), meta(6, 16), meta(()), meta(())
    logits = meta(6, 5, 11)
    labels = torch.empty(6, 5, device="meta", dtype=torch.long)
    tx, ty = torch.empty(6, 16, device="meta"), torch.empty(6, 16, device="meta")
    return [
        (M2MixSigLipLoss(m2mix_weight=0.5, m2mix_temperature=None, calls_per_step=2),
         dict(image_features=x, text_features=y, logit_scale=scale, logit_bias=bias), [x, y, scale, bias]),
        (M2MixSigLipLoss(m2mix_weight=0.5), dict(image_features=x, text_features=y, logit_scale=scale,
                                                 logit_bias=bias), [x, y, scale, bias]),
        (M2MixCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, mix_pairing="random", calls_per_step=2,
                       **SOFTMAX_TERMS),
         dict(image_features=x, text_features=y, logits=logits, labels=labels, logit_scale=scale), [x, y, logits]),
        (M2MixDistillLoss(m2mix_temperature=None, **SOFTMAX_TERMS),
         dict(image_features=x, text_features=y, logit_scale=scale, dist_image_features=tx,
              dist_text_features=ty, dist_logit_scale=torch.empty((), device="meta")), [x, y, scale]),
    ]


@pytest.mark.parametrize("case", range(4))
def test_forward_and_backward_make_no_host_transfer(case):
    loss, outputs, leaves = family_calls()[case]
    for _ in range(3):  # the first call (input check), a repeated call of the step, a new step
        terms = loss(**outputs, output_dict=True)
        assert "m2mix_loss" in terms
        total = sum(terms.values())
        assert total.device.type == "meta" and total.shape == ()
        total.backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape


def test_every_family_checks_its_inputs_with_the_same_words():
    """One check (the mixin's), known on the host: meta tensors suffice."""
    x, y, scale = meta(6, 16), meta(6, 16), meta(())
    calls = [(M2MixLoss(), dict(image_features=x, text_features=y, logit_scale=scale))]
    calls += [call[:2] for call in family_calls()[1:]]
    bad_inputs = {
        "shape": (dict(text_features=meta(5, 16)), r"image_features and text_features must both be \(batch, dim\) "
                                                    r"with the same shape, got \(6, 16\) and \(5, 16\)$"),
        "one pair": (dict(image_features=meta(1, 16), text_features=meta(1, 16)),
                     r"^{} needs at least 2 image-text pairs in the \(global\) batch to form negatives, got 1; "
                     r"increase --batch-size$"),
        "mix_lambda": (dict(mix_lambda=1.5), r"^mix_lambda must be a float in \[0, 1\], got 1.5$"),
    }
    assert len(calls) == 4
    for loss, outputs in calls:
        for change, pattern in bad_inputs.values():
            with pytest.raises(ValueError, match=pattern.format(type(loss).__name__)):
                loss(**{**outputs, **change})


@pytest.mark.parametrize("family", ["siglip", "coca", "distill"])
def test_nan_features_give_a_nonfinite_loss_and_no_exception(family):
    cases = {
        "siglip": (M2MixSigLipLoss(m2mix_weight=0.5),
                   dict(logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-10.0))),
        "coca": (M2MixCoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, **SOFTMAX_TERMS),
                 {k: v for k, v in coca_outputs(dim=16).items() if k not in ("image_features", "text_features")}),
        "distill": (M2MixDistillLoss(**SOFTMAX_TERMS),
                    {k: v for k, v in distill_outputs(dim=16).items() if k not in ("image_features", "text_features")}),
    }
    loss, rest = cases[family]
    x, y = unit_rows(6, 16, 0, torch.float32), unit_rows(6, 16, 1, torch.float32)
    rest = {k: (v.float() if v.is_floating_point() else v) for k, v in rest.items()}
    assert torch.isfinite(sum(loss(x, y, **rest, output_dict=True).values()))  # the first call checks unit norms
    x_bad = x.clone()
    x_bad[2, 5] = float("nan")
    x_bad.requires_grad_()
    total = sum(loss(x_bad, y, **rest, output_dict=True).values())
    assert not torch.isfinite(total)
    total.backward()
    assert loss.nonfinite_steps == 1


# -- family selection (the launcher's build and validate) ---------------------------------------------

def args_of(**overrides):
    base = dict(model="ViT-B-32", siglip=False, distill=False, distill_model=None, local_loss=True,
                gather_with_grad=True, rank=0, world_size=1, horovod=False, loss_dist_impl="shift",
                coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=0.5, accum_freq=3,
                vmix_weight=0.0, lmix_weight=0.0, vlmix_weight=0.0)
    base.update(overrides)
    return Namespace(**base)


def test_family_follows_openclips_precedence_and_passes_its_arguments():
    assert loss_family(args_of()) == "clip"
    assert loss_family(args_of(siglip=True)) == "siglip"
    assert loss_family(args_of(model="local-dir:/tmp/tiny-coca", siglip=True)) == "coca"
    assert loss_family(args_of(distill=True, model="coca_ViT-B-32")) == "distill"
    del_distill = args_of(distill_model="ViT-L-14")
    del del_distill.distill  # at argument validation, before OpenCLIP's main() sets args.distill
    assert loss_family(del_distill) == "distill"

    siglip = build_m2mix_loss(args_of(siglip=True), m2mix_weight=0.1)
    assert type(siglip) is M2MixSigLipLoss and siglip.dist_impl == "shift" and siglip.calls_per_step == 3
    coca = build_m2mix_loss(args_of(model="coca_ViT-B-32"), m2mix_weight=0.1, vmix_weight=0.2)
    assert type(coca) is M2MixCoCaLoss and (coca.caption_loss_weight, coca.clip_loss_weight) == (2.0, 0.5)
    assert coca.local_loss and coca.gather_with_grad and coca.vmix_weight == 0.2
    assert type(build_m2mix_loss(args_of(distill=True), m2mix_weight=0.1)) is M2MixDistillLoss
    assert type(build_m2mix_loss(args_of(), m2mix_weight=0.1)) is M2MixLoss


def test_validate_says_why_siglip_takes_no_unimodal_term():
    assert validate_family(args_of(siglip=True)) is None
    assert validate_family(args_of(model="coca_ViT-B-32", vmix_weight=0.1)) is None
    message = validate_family(args_of(siglip=True, vlmix_weight=0.1))
    assert message.startswith("--vlmix-weight cannot be combined with --siglip: V-Mix, L-Mix and VL-Mix")
    assert "never gathers the batch" in message


def test_the_command_line_and_the_loss_refuse_siglip_unimodal_weights_with_one_reason():
    from m2mix_openclip.losses.options import SIGLIP_UNIMODAL_REASON, siglip_unimodal_error

    flags = validate_family(args_of(siglip=True, lmix_weight=0.1, vlmix_weight=0.2))
    with pytest.raises(ValueError) as raised:
        M2MixSigLipLoss(lmix_weight=0.1, vlmix_weight=0.2)
    # every weight > 0 is named, as the command line spells it and as the loss's keywords
    assert flags == f"--lmix-weight, --vlmix-weight cannot be combined with --siglip: {SIGLIP_UNIMODAL_REASON}"
    assert str(raised.value) == f"M2MixSigLipLoss: lmix_weight, vlmix_weight must be 0: {SIGLIP_UNIMODAL_REASON}"
    assert SIGLIP_UNIMODAL_REASON.endswith("with --siglip use the sigmoid m²-Mix term (--m2mix-weight)")
    assert siglip_unimodal_error(args_of(siglip=True), as_flags=True) is None


# -- SigLIP across processes: every dist_impl equals one process ------------------------------------

BATCH, DIM, WEIGHT = 3, 8, 0.7
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def global_batch(world):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(world * BATCH, DIM, generator=g, dtype=torch.float64),
            torch.randn(world * BATCH, DIM, generator=g, dtype=torch.float64))


def scale_and_bias():
    return (torch.tensor(6.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-3.0, dtype=torch.float64, requires_grad=True))


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = global_batch(world)
    own = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for impl in DIST_IMPLS:
        for temperature in (None, 0.1):
            xi, yi = x[own].clone().requires_grad_(), y[own].clone().requires_grad_()
            scale, bias = scale_and_bias()
            loss = M2MixSigLipLoss(rank=rank, world_size=world, dist_impl=impl, m2mix_weight=WEIGHT,
                                   m2mix_temperature=temperature, mix_schedule="constant", seed=5)
            terms = loss(F.normalize(xi, dim=1), F.normalize(yi, dim=1), scale, bias, output_dict=True)
            sum(terms.values()).backward()
            results[(impl, temperature)] = {
                "terms": {k: v.item() for k, v in terms.items()}, "lambda": loss.last_lambdas["m2mix"],
                "grads": [xi.grad, yi.grad, scale.grad, bias.grad]}
        # mixing off: OpenCLIP's SigLipLoss, to the last bit
        xs, ys = F.normalize(x[own], dim=1), F.normalize(y[own], dim=1)
        scale, bias = scale_and_bias()
        off = M2MixSigLipLoss(rank=rank, world_size=world, dist_impl=impl, m2mix_weight=0.0)(xs, ys, scale, bias)
        theirs = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(xs, ys, scale, bias)
        results[(impl, "off")] = (off.item(), theirs.item())
        # NaN on the last process only: every process gets a non-finite loss, none raises or hangs
        loss = M2MixSigLipLoss(rank=rank, world_size=world, dist_impl=impl, m2mix_weight=WEIGHT)
        loss(xs, ys, scale, bias)  # the first call checks unit norms (all processes agree)
        bad = xs.clone()
        if rank == world - 1:
            bad[1, 2] = float("nan")
        start = time.monotonic()
        total = loss(bad.requires_grad_(), ys, scale, bias)
        total.backward()
        results[(impl, "nan")] = (bool(torch.isfinite(total)), time.monotonic() - start)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2-processes", "3-processes"])
def ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"siglip{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("impl", DIST_IMPLS)
@pytest.mark.parametrize("temperature", [None, 0.1])
def test_every_dist_impl_equals_one_process(ranks, impl, temperature):
    world, per_rank = ranks
    results = [r[(impl, temperature)] for r in per_rank]
    lam = results[0]["lambda"]
    assert all(r["lambda"] == lam for r in results)
    raw_x, raw_y = global_batch(world)
    raw_x.requires_grad_()
    raw_y.requires_grad_()
    scale, bias = scale_and_bias()
    x, y = F.normalize(raw_x, dim=1), F.normalize(raw_y, dim=1)
    s, b = (scale, bias) if temperature is None else (1 / temperature, -1 / temperature)
    expected = {"contrastive_loss": siglip_reference(x, y, scale, bias),
                "m2mix_loss": WEIGHT * sigmoid_m2mix_reference(x, y, lam, s, b)}
    # Each process averages its own anchors: the mean over processes is the global value ...
    for name, value in expected.items():
        mean = sum(r["terms"][name] for r in results) / world
        assert mean == pytest.approx(value.item(), rel=1e-10), name
    # ... and DDP averages the gradients: each process holds world x the global gradient.
    grads = torch.autograd.grad(sum(expected.values()), [raw_x, raw_y, scale, bias])
    for k, r in enumerate(results):
        own = slice(k * BATCH, (k + 1) * BATCH)
        torch.testing.assert_close(r["grads"][0], world * grads[0][own], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r["grads"][1], world * grads[1][own], rtol=1e-9, atol=1e-12)
    for i in (2, 3):  # scale and bias: each process holds its own share; they add up to world x
        torch.testing.assert_close(sum(r["grads"][i] for r in results), world * grads[i], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", DIST_IMPLS)
def test_every_dist_impl_with_mixing_off_is_openclip_exactly(ranks, impl):
    _, per_rank = ranks
    for r in per_rank:
        ours, theirs = r[(impl, "off")]
        assert ours == theirs and math.isfinite(ours)


@pytest.mark.parametrize("impl", DIST_IMPLS)
def test_nan_on_one_process_gives_every_process_a_nonfinite_loss(ranks, impl):
    _, per_rank = ranks
    for r in per_rank:
        finite, seconds = r[(impl, "nan")]
        assert not finite and seconds < 30
