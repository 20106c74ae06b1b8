"""Checks of a training command before the model is built, and the missing-image error."""

import argparse
import os

import pytest

from m2mix_openclip.integration.preflight import (MissingImageError, PreflightError, check_args, one_line,
                                                  report_missing_images)


def make_args(**overrides):
    args = argparse.Namespace(train_data=None, val_data=None, dataset_type="auto", csv_separator="\t",
                              csv_img_key="filepath", csv_caption_key="title", batch_size=8, loss="m2mix")
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def csv_file(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    path = tmp_path / "train.csv"
    path.write_text(f"filepath\ttitle\n{image}\ta caption\n")
    return path


def test_a_good_command_passes(csv_file):
    check_args(make_args(train_data=str(csv_file), val_data=str(csv_file)))


def test_missing_train_data_names_the_flag_and_file(tmp_path):
    with pytest.raises(PreflightError, match=r"^--train-data .*missing\.csv: file not found$"):
        check_args(make_args(train_data=str(tmp_path / "missing.csv")))
    with pytest.raises(PreflightError, match=r"^--val-data "):
        check_args(make_args(val_data=str(tmp_path / "missing.csv")))


def test_comma_separated_csv_names_the_separator_and_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("filepath,title\nx.png,a caption\n")
    with pytest.raises(PreflightError) as e:
        check_args(make_args(train_data=str(path)))
    message = str(e.value)
    assert "no column 'filepath' with separator '\\t'" in message
    assert "columns found: ['filepath,title']" in message and "--csv-separator ','" in message


def test_a_first_image_that_does_not_exist(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("filepath\ttitle\nimages/x.png\ta caption\n")
    with pytest.raises(PreflightError, match=r"line 2 names image 'images/x.png', which does not exist "
                                             r"\(relative paths are read from the current directory"):
        check_args(make_args(train_data=str(path)))


def test_shards_that_do_not_match(tmp_path):
    (tmp_path / "s-000000.tar").write_bytes(b"")
    check_args(make_args(train_data=str(tmp_path / "s-{000000..000000}.tar")))
    with pytest.raises(PreflightError, match=r"1 of 2 shard\(s\) not found, e\.g\. .*s-000001\.tar"):
        check_args(make_args(train_data=str(tmp_path / "s-{000000..000001}.tar")))


def test_unknown_extension_asks_for_dataset_type(tmp_path):
    with pytest.raises(PreflightError, match="--dataset-type"):
        check_args(make_args(train_data=str(tmp_path / "data.parquet")))
    check_args(make_args(train_data="anything", dataset_type="synthetic"))


def test_batch_of_one_is_refused_for_contrastive_losses(csv_file, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PreflightError, match=r"^--batch-size 1 .*global batch of 1 pair"):
        check_args(make_args(train_data=str(csv_file), batch_size=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_args(make_args(train_data=str(csv_file), batch_size=1))


def test_missing_image_names_file_line_and_image(tmp_path):
    class Dataset:
        def __init__(self, input_filename, images):
            self.images = images

        def __getitem__(self, idx):
            return open(self.images[idx]).read()

    with report_missing_images(Dataset):
        data = Dataset("train.csv", ["/nowhere/a.png", "/nowhere/b.png"])
        with pytest.raises(MissingImageError, match=r"^train\.csv line 3: image '/nowhere/b\.png' not found$"):
            data[1]
    assert Dataset.__getitem__.__name__ == "__getitem__" and not hasattr(Dataset("x", []), "_m2mix_source")


def test_one_line_of_a_worker_error():
    wrapped = MissingImageError("Caught MissingImageError in DataLoader worker process 0.\nOriginal Traceback:\n"
                                "  File x\nm2mix.MissingImageError: t.csv line 3: image 'b.png' not found\n")
    assert one_line(wrapped) == "t.csv line 3: image 'b.png' not found"


def test_a_mistyped_flag_gets_the_nearest_known_one():
    from m2mix_openclip.integration.suggest import suggest_flags
    known = ["--m2mix-weight", "--m2mix-alpha", "--vmix-weight", "--batch-size", "-h"]
    assert suggest_flags("unrecognized arguments: --m2mix-wieght 0.1", known) == \
        "unrecognized arguments: --m2mix-wieght (did you mean --m2mix-weight?)"
    assert suggest_flags("unrecognized arguments: --batch=3 --zzz", known) == \
        "unrecognized arguments: --batch (did you mean --batch-size?), --zzz"
    assert suggest_flags("argument --lr: invalid float value", known) is None


def test_a_name_whose_folder_holds_a_run(tmp_path):
    run = tmp_path / "logs" / "exp"
    args = make_args(logs=str(tmp_path / "logs"), name="exp", resume=None)
    check_args(args)  # no folder yet
    (run / "checkpoints").mkdir(parents=True)
    check_args(args)  # a folder without a log (OpenCLIP made it, nothing ran): OpenCLIP takes it too
    (run / "out-0.log").write_text("")  # --log-local writes out-RANK.log
    with pytest.raises(PreflightError, match=r"^--name exp: .*exp already holds a run \(no checkpoint: .*out-0\.log"):
        check_args(args)
    for name in ("epoch_2.pt", "epoch_10.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    os.utime(run / "checkpoints" / "epoch_2.pt", (0, 0))  # older, although it sorts after epoch_10.pt
    with pytest.raises(PreflightError, match=r"\(2 checkpoint\(s\), newest epoch_10\.pt; --resume latest continues"):
        check_args(args)
    check_args(make_args(logs=str(tmp_path / "logs"), name="exp", resume="latest"))
    check_args(make_args(logs=str(tmp_path / "logs"), name=None, resume=None))  # OpenCLIP names it by the time


def test_report_to_a_package_that_is_missing(csv_file, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    for report_to in ("tensorboard", "wandb,tensorboard", "all"):
        with pytest.raises(PreflightError, match=r"^--report-to tensorboard needs the tensorboard package, which is "
                                                 r"not installed: pip install 'm2mix-openclip\[tensorboard\]'"):
            check_args(make_args(train_data=str(csv_file), report_to=report_to))
    check_args(make_args(train_data=str(csv_file), report_to=""))
