"""The divergence stop's parts: the device counter (no host sync per step), the checks at OpenCLIP's logging steps."""

import logging
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from m2mix_openclip.integration.divergence import DivergedError, NonfiniteWatch


def describe(first, count, stopping):
    return f"first={first} count={count} stopping={stopping}"


def features(n=8, d=4, nan=False):
    x = F.normalize(torch.randn(n, d), dim=1)
    if nan:
        x[0, 0] = float("nan")
    return x


def test_the_watch_never_reads_the_device_inside_a_step():
    """On the meta device any host read fails: the hook counts without one."""
    class MetaLoss(torch.nn.Module):
        def forward(self, x, output_dict=True):
            return {"a": x.sum(), "b": x.mean()}

    loss = MetaLoss()
    watch = NonfiniteWatch(True, describe)
    assert watch.attach(loss)
    for step in range(3):
        watch.step = step
        loss(torch.ones(4, device="meta"))
    assert watch._new.device.type == "meta" and watch._new.shape == (2,)
    assert not NonfiniteWatch(True, describe).attach(lambda **kw: {})  # a plain callable is not watched


def test_a_nan_loss_stops_at_the_next_check_naming_its_step():
    loss = ClipLoss()
    watch = NonfiniteWatch(True, describe)
    watch.attach(loss)
    scale = torch.tensor(10.0)
    for step in range(5):
        watch.step = step
        loss(features(), features(), scale, output_dict=True)
    watch.check(torch.device("cpu"))  # all finite: nothing
    for step in (5, 6, 7):
        watch.step = step
        loss(features(nan=step in (6, 7)), features(), scale, output_dict=True)
    with pytest.raises(DivergedError, match=r"^first=6 count=2 stopping=True$"):
        watch.check(torch.device("cpu"))


def test_continue_warns_once_per_check_that_sees_new_ones(caplog):
    loss = ClipLoss()
    watch = NonfiniteWatch(False, describe)
    watch.attach(loss)
    watch.step = 3
    loss(features(nan=True), features(), torch.tensor(10.0), output_dict=True)
    with caplog.at_level(logging.WARNING):
        watch.check(torch.device("cpu"))
        watch.check(torch.device("cpu"))  # nothing new since
    assert caplog.text.count("first=3 count=1 stopping=False") == 1 and watch.seen == 1


class RecordingWatch(NonfiniteWatch):
    def __init__(self):
        super().__init__(True, describe)
        self.checked = []

    def check(self, device):
        self.checked.append(self.step)


class Loader(list):
    num_samples = 0

    @property
    def num_batches(self):
        return len(self)


@pytest.mark.parametrize("batches,accum,every,epoch", [(7, 1, 1, 0), (7, 1, 3, 2), (10, 2, 2, 1), (9, 3, 1, 0),
                                                     (10, 3, 1, 0)])
def test_checks_follow_openclip_logging_steps(batches, accum, every, epoch):
    """The steps OpenCLIP's train_one_epoch logs (its own condition, written out here), each checked
    once it has ended; the watch knows the global step of every batch."""
    steps_per_epoch = batches // accum
    logged = []
    for i in range(batches):
        i_accum = i // accum
        if (i + 1) % accum:
            continue
        batch_count = i_accum + 1
        if i_accum % every == 0 or batch_count == steps_per_epoch:
            logged.append(steps_per_epoch * epoch + i_accum)
    watch = RecordingWatch()
    data = {"train": Namespace(dataloader=Loader(range(batches)), sampler=None), "val": "kept"}
    args = Namespace(accum_freq=accum, log_every_n_steps=every, device="cpu")
    watched = watch.watched(data, epoch, args)
    assert watched["val"] == "kept" and data["train"].dataloader == list(range(batches))  # the original is untouched
    seen_steps = []
    for _ in watched["train"].dataloader:
        seen_steps.append(watch.step)
    assert watch.checked == logged
    assert seen_steps == [steps_per_epoch * epoch + i // accum for i in range(batches)]
    assert watched["train"].dataloader.num_batches == batches
