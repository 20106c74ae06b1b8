"""The loss inside a training step: no host syncs, ClipLoss's NaN semantics, no rank left
hanging, one lambda per optimizer step."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from m2mix_openclip import M2MixLoss
from m2mix_openclip.mixup import sample_beta

ALL_TERMS = dict(m2mix_weight=0.5, vmix_weight=0.3, lmix_weight=0.2, vlmix_weight=0.1)


def unit_rows(n, d, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1).to(device)


@pytest.mark.parametrize("mix_lambda", [None, 0.3])
@pytest.mark.parametrize("pairing", ["reverse", "random"])
@pytest.mark.parametrize("m2mix_temperature", [0.07, None])
def test_forward_and_backward_make_no_host_transfer(mix_lambda, pairing, m2mix_temperature):
    """Meta tensors carry no data: any .item(), .tolist() or bool() of one raises."""
    x = torch.empty(6, 16, device="meta", requires_grad=True)
    y = torch.empty(6, 16, device="meta", requires_grad=True)
    scale = torch.empty((), device="meta", requires_grad=True)
    loss = M2MixLoss(mix_pairing=pairing, m2mix_temperature=m2mix_temperature, calls_per_step=2, **ALL_TERMS)
    for _ in range(3):  # the first call (input check), a repeated call of the step, a new step
        terms = loss(x, y, scale, output_dict=True, mix_lambda=mix_lambda)
        assert set(terms) == {"contrastive_loss", "m2mix_loss", "vmix_loss", "lmix_loss", "vlmix_loss"}
        total = sum(terms.values())
        assert total.device.type == "meta" and total.shape == ()
        total.backward()
    assert x.grad.shape == x.shape and y.grad.shape == y.shape and scale.grad.shape == ()


def test_meta_check_is_not_vacuous():
    """The same meta tensors do fail where a host transfer happens."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(torch.empty(3, device="meta").sum() > 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_features_give_a_nonfinite_loss_and_no_exception(bad):
    x, y = unit_rows(8, 16, 0), unit_rows(8, 16, 1)
    loss = M2MixLoss(**ALL_TERMS)
    assert torch.isfinite(loss(x, y, torch.tensor(10.0)))  # the first call checks unit norms
    x_bad = x.clone()
    x_bad[2, 5] = bad
    x_bad.requires_grad_()
    terms = loss(x_bad, y, torch.tensor(10.0), output_dict=True)
    total = sum(terms.values())
    assert not torch.isfinite(total)
    total.backward()
    assert not torch.isfinite(x_bad.grad).all()
    assert torch.isfinite(loss(x, y, torch.tensor(10.0)))  # the next step is fine again
    assert loss.logged_scalars()["nonfinite_steps"] == 1.0
    assert loss.nonfinite_steps == 1


def test_nan_at_the_first_call_does_not_raise():
    x, y = unit_rows(8, 16, 0), unit_rows(8, 16, 1)
    x[0] = float("nan")
    assert not torch.isfinite(M2MixLoss(**ALL_TERMS)(x, y, torch.tensor(10.0)))


def test_accumulation_draws_one_lambda_per_optimizer_step():
    x, y = unit_rows(8, 16, 0), unit_rows(8, 16, 1)
    loss = M2MixLoss(m2mix_weight=1.0, vmix_weight=1.0, mix_pairing="random", calls_per_step=2, seed=5)
    seen = []
    for _ in range(6):
        loss(x, y, torch.tensor(10.0))
        seen.append((loss.last_lambdas["m2mix"], loss.last_lambdas["vmix"], tuple(loss.last_pairings["vmix"].tolist())))
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[4] == seen[5]
    assert len({s[0] for s in seen}) == 3
    # the same sequence as one call per step
    single = M2MixLoss(m2mix_weight=1.0, vmix_weight=1.0, mix_pairing="random", seed=5)
    for step in range(3):
        single(x, y, torch.tensor(10.0))
        assert single.last_lambdas["m2mix"] == seen[2 * step][0]
    # and as the bare generator: m2mix's lambda, then vmix's lambda and pairing, each step
    g = torch.Generator().manual_seed(5)
    first = sample_beta(0.5, 0.5, g)
    assert first == seen[0][0] and sample_beta(0.5, 0.5, g) == seen[0][1]


def test_a_new_epoch_starts_a_new_step():
    x, y = unit_rows(8, 16, 0), unit_rows(8, 16, 1)
    loss = M2MixLoss(calls_per_step=2, seed=1)
    loss(x, y, torch.tensor(10.0))
    first = loss.last_lambdas["m2mix"]
    loss.set_epoch(1)  # an epoch that ended mid-step (dropped micro-batches) must not leak into the next
    loss(x, y, torch.tensor(10.0))
    assert loss.last_lambdas["m2mix"] != first


def test_grad_scaler_skips_a_nan_step_and_training_goes_on():
    torch.manual_seed(0)
    images, texts = torch.randn(16, 12), torch.randn(16, 12)
    image_tower, text_tower = torch.nn.Linear(12, 16), torch.nn.Linear(12, 16)
    params = list(image_tower.parameters()) + list(text_tower.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    loss_fn = M2MixLoss(**ALL_TERMS)
    losses, scales = [], []
    for step in range(5):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = F.normalize(image_tower(images), dim=-1)
            y = F.normalize(text_tower(texts), dim=-1)
            if step == 2:
                x = x * float("nan")  # a transient overflow
            loss = loss_fn(x, y, torch.tensor(10.0))
        before = [p.detach().clone() for p in params]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        changed = any(not torch.equal(b, p) for b, p in zip(before, params))
        losses.append(loss.detach().float())
        scales.append(scaler.get_scale())
        assert changed == (step != 2), f"step {step}: parameters {'changed' if changed else 'unchanged'}"
    assert not torch.isfinite(losses[2])
    assert all(torch.isfinite(v) for i, v in enumerate(losses) if i != 2)
    assert scales[2] < scales[1], "the scaler lowers its scale after the skipped step"
    assert loss_fn.nonfinite_steps == 1


WORLD, BATCH, DIM = 2, 4, 8


def _nan_worker(rank, port, out_dir, local_loss):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x, y = unit_rows(BATCH, DIM, 2 * rank), unit_rows(BATCH, DIM, 2 * rank + 1)
    loss_fn = M2MixLoss(rank=rank, world_size=WORLD, local_loss=local_loss, gather_with_grad=True, **ALL_TERMS)
    results = [float(loss_fn(x, y, torch.tensor(10.0)))]  # a finite first step
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")
    x.requires_grad_()
    start = time.monotonic()
    total = loss_fn(x, y, torch.tensor(10.0))
    total.backward()
    results.append(float(total.detach()))
    dist.barrier()  # every rank reaches the next collective
    torch.save({"losses": results, "seconds": time.monotonic() - start},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("local_loss", [False, True])
def test_nan_on_one_rank_leaves_no_rank_behind(tmp_path, local_loss):
    mp.spawn(_nan_worker, args=(_free_port(), str(tmp_path), local_loss), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["seconds"] < 30, "the NaN step and the next collective take seconds, not a timeout"
        first, second = out["losses"]
        assert torch.isfinite(torch.tensor(first)), rank
        assert not torch.isfinite(torch.tensor(second)), rank  # the NaN reaches every rank's loss
