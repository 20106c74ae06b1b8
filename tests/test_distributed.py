"""Two gloo processes against one process holding the concatenated batch."""

import itertools
import os
import socket

import pytest
import reference as ref
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from m2mix_openclip import M2MixLoss

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
