"""Bad data met while training, through OpenCLIP's own readers: its CsvDataset and its webdataset pipeline."""

import io
import logging
import os
import tarfile
from argparse import Namespace

import pytest
from open_clip_train import data as oc_data
from PIL import Image
from torchvision import transforms

from m2mix_openclip.integration.preflight import MissingImageError
from m2mix_openclip.integration.sample_errors import (
    NoBatchError,
    UnreadableImageError,
    image_problem,
    name_sample_errors,
    report_bad_samples,
    stop_passes_without_batch,
)


def png_bytes(size=32):
    """A PNG of noise, large enough that half of it is a truncated image rather than a short header."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


PREPROCESS = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])


def tokenize(texts):
    return [[len(t) for t in texts]]


@pytest.fixture
def images(tmp_path):
    good = png_bytes()
    files = {"good.png": good, "truncated.png": good[: len(good) // 2], "empty.png": b"",
             "page.png": b"<html><body>404 Not Found</body></html>"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_image_problems_are_named():
    good = png_bytes()
    assert image_problem(good) is None
    assert image_problem(b"") == "is empty (0 bytes)"
    assert image_problem(good[: len(good) // 2]).startswith("is truncated (PIL: image file is truncated")
    assert image_problem(b"<html>").startswith("is not an image PIL can read")
    assert image_problem("/nowhere/a.png") is None  # missing: MissingImageError's case


def test_broken_images_of_csv_rows_name_file_line_and_image(images):
    csv = images / "train.csv"
    # a blank line (pandas skips it) moves the rows below it down by one line
    csv.write_text("filepath\ttitle\n" + "".join(
        f"{images / name}\tcaption {i}\n" + ("\n" if i == 0 else "")
        for i, name in enumerate(["good.png", "truncated.png", "empty.png", "page.png", "gone.png"])))
    with report_bad_samples(oc_data.CsvDataset):
        dataset = oc_data.CsvDataset(str(csv), PREPROCESS, img_key="filepath", caption_key="title", sep="\t",
                                     tokenizer=tokenize)
        assert tuple(dataset[0][0].shape) == (3, 8, 8)
        expected = {1: "is truncated", 2: "is empty (0 bytes)", 3: "is not an image PIL can read"}
        for index, problem in expected.items():
            image = str(images / ["good.png", "truncated.png", "empty.png", "page.png"][index])
            with pytest.raises(UnreadableImageError) as e:
                dataset[index]
            assert str(e.value).startswith(f"{csv} line {index + 3}: image {image!r} {problem}")
        with pytest.raises(MissingImageError, match=rf"^{csv} line 7: image '{images}/gone\.png' not found"):
            dataset[4]
    assert "_m2mix_source" not in vars(oc_data.CsvDataset(str(csv), PREPROCESS, "filepath", "title"))


def test_other_errors_pass_unchanged(images):
    csv = images / "t.csv"
    csv.write_text(f"filepath\ttitle\n{images / 'good.png'}\tcaption\n")

    def broken_tokenizer(texts):
        raise KeyError("not the image's fault")

    with report_bad_samples(oc_data.CsvDataset):
        dataset = oc_data.CsvDataset(str(csv), PREPROCESS, "filepath", "title", tokenizer=broken_tokenizer)
        with pytest.raises(KeyError, match="not the image's fault"):
            dataset[0]


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def wds_args(train_data, batch_size, resampled=False):
    return Namespace(train_data=train_data, val_data=None, train_num_samples=64, val_num_samples=None,
                     dataset_resampled=resampled, train_data_upsampling_factors=None, seed=0, batch_size=batch_size,
                     world_size=1, workers=0)


def test_shard_samples_that_do_not_decode_are_skipped_by_name(tmp_path, caplog):
    good = png_bytes()
    shard = write_shard(tmp_path / "s-000000.tar", [
        ("0000", {"png": good, "txt": b"one"}), ("0001", {"png": good[: len(good) // 2], "txt": b"two"}),
        ("0002", {"png": good, "txt": b"caf\xe9"}), ("0003", {"png": good, "txt": b"four"})])
    with name_sample_errors(oc_data):
        info = oc_data.get_wds_dataset(wds_args(shard, 2), PREPROCESS, is_train=True, tokenizer=tokenize)
    assert oc_data.wds.__name__ == "webdataset" and oc_data.wds.decode is __import__("webdataset").decode  # put back
    with caplog.at_level(logging.WARNING):
        batches = list(info.dataloader)
    assert len(batches) == 32 and all(len(images) == 2 for images, _ in batches)  # 64 samples: the 2 good repeat
    warnings = [r.getMessage() for r in caplog.records if "Handling webdataset error" in r.getMessage()]
    assert f"SampleDecodeError('{shard} sample 0002: txt is not UTF-8 (byte 0xe9 at 3)')" in warnings[0] + warnings[1]
    assert any(f"{shard} sample 0001: png is truncated (PIL: image file is truncated" in w for w in warnings)


@pytest.mark.parametrize("resampled", [False, True])
def test_shards_that_form_no_batch_stop_instead_of_looping(tmp_path, resampled):
    good = png_bytes()
    shard = write_shard(tmp_path / "s.tar", [(f"{i:04d}", {"png": good, "txt": b"x"}) for i in range(3)]
                        + [("0009", {"png": b"", "txt": b"broken"})])
    broken = write_shard(tmp_path / "broken.tar", [(f"{i:04d}", {"png": b"", "txt": b"x"}) for i in range(3)])
    # a pass over the shard gives 3 samples, never a batch of 4; with --dataset-resampled samples
    # gather over draws, and only shards without a usable sample form no batch
    spec = broken if resampled else shard
    info = oc_data.get_wds_dataset(wds_args(spec, 4, resampled), PREPROCESS, is_train=True, tokenizer=tokenize)
    assert stop_passes_without_batch(info, f"--train-data {spec}", 4, buffered=10)
    with pytest.raises(NoBatchError) as e:
        next(iter(info.dataloader))
    if resampled:  # 10 x 1 shard, at least 2 x (10 buffered + 4)
        assert str(e.value).startswith(f"--train-data {spec}: 28 shards were drawn without forming a batch of 4: they "
                                       "hold no usable sample")
    else:
        assert str(e.value).startswith(f"--train-data {spec}: a whole pass over the shards (those of one data-loader "
                                       "worker) formed no batch of 4")
    # where batches form, the guard lets every epoch through
    info = oc_data.get_wds_dataset(wds_args(shard, 3, resampled), PREPROCESS, is_train=True, tokenizer=tokenize)
    assert stop_passes_without_batch(info, f"--train-data {shard}", 3, buffered=oc_data._SAMPLE_SHUFFLE_INITIAL)
    assert len(list(info.dataloader)) == len(list(info.dataloader)) == 22
    assert not stop_passes_without_batch(Namespace(dataloader=[1, 2]), "csv", 3)  # a CSV's loader: nothing to do
