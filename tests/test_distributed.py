"""Two and three gloo processes against one process holding the concatenated batch."""

import itertools
import os
import socket

import pytest
import reference as ref
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from collectives import counted_collectives
from open_clip.loss import ClipLoss, CoCaLoss, DistillClipLoss

from m2mix_openclip import M2MixCoCaLoss, M2MixDistillLoss, M2MixLoss

WORLD, BATCH, DIM = 2, 5, 8
CONFIGS = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)
WEIGHTS = dict(m2mix_weight=0.7, vmix_weight=0.3, lmix_weight=0.2, vlmix_weight=0.1)
SCALE = 9.0


def global_batch():
    """Un-normalised features: the tests differentiate through F.normalize, as a CLIP model does
    (slerp is defined on the sphere; only gradients tangent to it reach the model)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    return x, y


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x, y = global_batch()
    results = {}
    for local_loss, gather_with_grad in CONFIGS:
        xi = x[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
        yi = y[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
        loss_fn = M2MixLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                            world_size=WORLD, seed=11, mix_schedule="constant", **WEIGHTS)
        terms = loss_fn(F.normalize(xi, dim=1), F.normalize(yi, dim=1),
                        torch.tensor(SCALE, dtype=torch.float64), output_dict=True)
        sum(terms.values()).backward()
        results[(local_loss, gather_with_grad)] = {
            "terms": {k: v.item() for k, v in terms.items()},
            "grad_x": xi.grad, "grad_y": yi.grad, "lambdas": dict(loss_fn.last_lambdas),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def emulate(x, y, local_loss, gather_with_grad, lambdas):
    """Each rank's loss as the plain formulas see it, with OpenCLIP's gather semantics."""
    pair = torch.arange(WORLD * BATCH - 1, -1, -1)
    losses = []
    for k in range(WORLD):
        own = slice(k * BATCH, (k + 1) * BATCH)
        if gather_with_grad:
            xc, yc = x, y
        elif local_loss:  # gathered without grad, own slot not restored
            xc, yc = x.detach(), y.detach()
        else:  # gathered without grad, own slot restored with grad
            xc = torch.cat([x[own] if j == k else x[j * BATCH:(j + 1) * BATCH].detach() for j in range(WORLD)])
            yc = torch.cat([y[own] if j == k else y[j * BATCH:(j + 1) * BATCH].detach() for j in range(WORLD)])
        xr, yr, offset = (x[own], y[own], k * BATCH) if local_loss else (xc, yc, 0)
        terms = {
            "contrastive_loss": ref.clip_terms(xr, yr, xc, yc, offset, SCALE),
            "m2mix_loss": WEIGHTS["m2mix_weight"] * ref.m2mix_term(xr, yr, xc, yc, offset, lambdas["m2mix"], 0.07),
        }
        for kind in ("vmix", "lmix", "vlmix"):
            terms[f"{kind}_loss"] = WEIGHTS[f"{kind}_weight"] * ref.unimix_term(
                kind, xr, yr, xc, yc, offset, lambdas[kind], pair, SCALE)
        losses.append(terms)
    return losses


@pytest.mark.parametrize("local_loss,gather_with_grad", CONFIGS)
def test_two_processes_match_one_process(rank_results, local_loss, gather_with_grad):
    per_rank = [r[(local_loss, gather_with_grad)] for r in rank_results]
    lambdas = per_rank[0]["lambdas"]
    assert per_rank[1]["lambdas"] == lambdas, "ranks must draw the same lambda"
    assert set(lambdas) == {"m2mix", "vmix", "lmix", "vlmix"}

    raw_x, raw_y = global_batch()
    raw_x.requires_grad_()
    raw_y.requires_grad_()
    x, y = F.normalize(raw_x, dim=1), F.normalize(raw_y, dim=1)
    expected = emulate(x, y, local_loss, gather_with_grad, lambdas)
    grad_x, grad_y = torch.autograd.grad(sum(sum(t.values()) for t in expected), [raw_x, raw_y])
    for k in range(WORLD):
        own = slice(k * BATCH, (k + 1) * BATCH)
        for name, value in expected[k].items():
            assert per_rank[k]["terms"][name] == pytest.approx(value.item(), rel=1e-5), (k, name)
        torch.testing.assert_close(per_rank[k]["grad_x"], grad_x[own], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(per_rank[k]["grad_y"], grad_y[own], rtol=1e-5, atol=1e-9)

    # The same figures from M2MixLoss in one process holding the whole batch.
    xs, ys = global_batch()
    xs.requires_grad_()
    ys.requires_grad_()
    single = M2MixLoss(seed=11, mix_schedule="constant", **WEIGHTS)
    terms = single(F.normalize(xs, dim=1), F.normalize(ys, dim=1), torch.tensor(SCALE, dtype=torch.float64),
                   output_dict=True)
    assert single.last_lambdas == lambdas
    total = sum(terms.values())
    total.backward()
    if local_loss:  # each rank averages its own rows: the mean over ranks is the full loss
        mean_total = sum(sum(r["terms"].values()) for r in per_rank) / WORLD
        assert mean_total == pytest.approx(total.item(), rel=1e-5)
    else:
        for r in per_rank:
            assert sum(r["terms"].values()) == pytest.approx(total.item(), rel=1e-5)
    if gather_with_grad:
        # Every rank's loss reaches every rank's features, and the rank losses add up to
        # WORLD x the full loss (local or not): WORLD x the full gradient, which DDP's
        # gradient averaging turns back into the full gradient.
        for k in range(WORLD):
            own = slice(k * BATCH, (k + 1) * BATCH)
            torch.testing.assert_close(per_rank[k]["grad_x"], WORLD * xs.grad[own], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(per_rank[k]["grad_y"], WORLD * ys.grad[own], rtol=1e-5, atol=1e-9)


# -- CoCa and distillation on 2 and 3 processes: OpenCLIP's terms, the mixing terms of M2MixLoss, one gather ---

FAMILY_BATCH, SEQ, VOCAB = 3, 4, 7


def family_batch(world):
    """The global batch: features (un-normalised), CoCa's caption logits and labels, a teacher's features."""
    g = torch.Generator().manual_seed(1)
    n = world * FAMILY_BATCH

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(x=rand(n, DIM), y=rand(n, DIM), logits=rand(n, SEQ, VOCAB),
                labels=torch.randint(0, VOCAB, (n, SEQ), generator=g), tx=rand(n, DIM), ty=rand(n, DIM))


def _family_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batch = family_batch(world)
    own = slice(rank * FAMILY_BATCH, (rank + 1) * FAMILY_BATCH)
    results = {}
    for local_loss, gather_with_grad in CONFIGS:
        common = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        mixing = dict(seed=11, mix_schedule="constant", **WEIGHTS)
        families = {
            "coca": (M2MixCoCaLoss(2.0, 0.5, **common, **mixing), CoCaLoss(2.0, 0.5, **common)),
            "distill": (M2MixDistillLoss(**common, **mixing), DistillClipLoss(**common)),
            "clip": (M2MixLoss(**common, **mixing), ClipLoss(**common)),  # the mixing terms alone, on these ranks
        }
        for family, (ours, theirs) in families.items():
            for name, loss_fn in (("ours", ours), ("theirs", theirs)):
                raw_x = batch["x"][own].clone().requires_grad_()
                raw_y = batch["y"][own].clone().requires_grad_()
                inputs = dict(image_features=F.normalize(raw_x, dim=1), text_features=F.normalize(raw_y, dim=1),
                              logit_scale=torch.tensor(SCALE, dtype=torch.float64))
                leaves = [raw_x, raw_y]
                if family == "coca":
                    caption_logits = batch["logits"][own].clone().requires_grad_()
                    inputs.update(logits=caption_logits, labels=batch["labels"][own])
                    leaves.append(caption_logits)
                elif family == "distill":
                    inputs.update(dist_image_features=F.normalize(batch["tx"][own], dim=1),
                                  dist_text_features=F.normalize(batch["ty"][own], dim=1),
                                  dist_logit_scale=torch.tensor(20.0, dtype=torch.float64))
                with counted_collectives() as counts:
                    terms = loss_fn(**inputs, output_dict=True)
                    grads = torch.autograd.grad(sum(terms.values()), leaves)
                results[(local_loss, gather_with_grad, family, name)] = {
                    "terms": {k: v.item() for k, v in terms.items()}, "grads": grads, "collectives": dict(counts),
                    "lambdas": dict(getattr(loss_fn, "last_lambdas", {}))}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2-processes", "3-processes"])
def family_ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"families{world}")
    mp.spawn(_family_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


MIXING_TERMS = ("m2mix_loss", "vmix_loss", "lmix_loss", "vlmix_loss")


@pytest.mark.parametrize("family", ["coca", "distill"])
@pytest.mark.parametrize("local_loss,gather_with_grad", CONFIGS)
def test_coca_and_distill_are_openclips_loss_plus_the_mixing_terms_with_one_gather(
        family_ranks, family, local_loss, gather_with_grad):
    """On every process: OpenCLIP's own terms of the family, unchanged; the mixing terms equal to
    M2MixLoss's on the same processes; gradients the sum of the two; and the collectives of
    OpenCLIP's loss alone (the mixing terms reuse its gather)."""
    world, per_rank = family_ranks
    for rank, results in enumerate(per_rank):
        ours, theirs = (results[(local_loss, gather_with_grad, family, who)] for who in ("ours", "theirs"))
        mix = results[(local_loss, gather_with_grad, "clip", "ours")]
        mix_alone = results[(local_loss, gather_with_grad, "clip", "theirs")]
        assert ours["lambdas"] == mix["lambdas"] and set(ours["lambdas"]) == {"m2mix", "vmix", "lmix", "vlmix"}
        expected = dict(theirs["terms"], **{k: mix["terms"][k] for k in MIXING_TERMS})
        assert list(ours["terms"]) == list(theirs["terms"]) + list(MIXING_TERMS)
        for name, value in expected.items():
            assert ours["terms"][name] == pytest.approx(value, rel=1e-12), (rank, name)
        # gradients: OpenCLIP's terms' + the mixing terms' (M2MixLoss's total less its ClipLoss part)
        for k in range(2):
            want = theirs["grads"][k] + mix["grads"][k] - mix_alone["grads"][k]
            torch.testing.assert_close(ours["grads"][k], want, rtol=1e-10, atol=1e-13)
        if family == "coca":
            torch.testing.assert_close(ours["grads"][2], theirs["grads"][2], rtol=1e-12, atol=0)
        assert ours["collectives"] == theirs["collectives"], rank
        gathers = 4 if family == "distill" else 2  # images and captions (and the teacher's, distillation)
        assert ours["collectives"]["all_gather"] == gathers, ours["collectives"]


@pytest.mark.parametrize("local_loss,gather_with_grad", CONFIGS)
def test_m2mix_loss_on_three_processes_matches_one_process(family_ranks, local_loss, gather_with_grad):
    world, per_rank = family_ranks
    batch = family_batch(world)
    raw_x, raw_y = batch["x"].clone().requires_grad_(), batch["y"].clone().requires_grad_()
    single = M2MixLoss(seed=11, mix_schedule="constant", **WEIGHTS)
    terms = single(F.normalize(raw_x, dim=1), F.normalize(raw_y, dim=1), torch.tensor(SCALE, dtype=torch.float64),
                   output_dict=True)
    total = sum(terms.values()).item()
    rank_totals = [sum(r[(local_loss, gather_with_grad, "clip", "ours")]["terms"].values()) for r in per_rank]
    if local_loss:  # each process averages its own rows: the mean over processes is the full loss
        assert sum(rank_totals) / world == pytest.approx(total, rel=1e-10)
    else:
        assert rank_totals == pytest.approx([total] * world, rel=1e-10)
