"""Checks of a training command before the model is built, and the missing-image error."""

import argparse
import os

import pytest

from m2mix_openclip.integration.preflight import (
    MissingImageError,
    PreflightError,
    check_args,
    one_line,
    report_missing_images,
)


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
    with pytest.raises(PreflightError, match=r"r\.csv line 2: image 'images/x.png' not found "
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


@pytest.fixture
def ranks(monkeypatch):
    """Sets the launcher's rank variables as torchrun does."""
    for key in ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "RANK", "PMI_RANK",
                "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)

    def set_ranks(local, rank, world):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
    return set_ranks


def test_a_name_whose_folder_holds_a_run(tmp_path, ranks):
    run = tmp_path / "logs" / "exp"
    args = make_args(logs=str(tmp_path / "logs"), name="exp", resume=None, log_local=False, save_most_recent=False)
    check_args(args)  # no folder yet
    (run / "checkpoints").mkdir(parents=True)
    check_args(args)  # a folder without a log (OpenCLIP made it, nothing ran): OpenCLIP takes it too
    (run / "out.log").write_text("")
    with pytest.raises(PreflightError, match=r"^--name exp: .*exp already holds a run \(no checkpoint to resume "
                                             r"from: .*out\.log; --resume latest starts again in the same folder\)"):
        check_args(args)
    for name in ("epoch_10.pt", "epoch_2.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    # OpenCLIP's --resume latest takes the last name in natural order, whatever the times
    os.utime(run / "checkpoints" / "epoch_10.pt", (0, 0))
    with pytest.raises(PreflightError, match=r"\(--resume latest continues from epoch_10\.pt\)"):
        check_args(args)
    # with --save-most-recent OpenCLIP reads only epoch_latest.pt
    with pytest.raises(PreflightError, match=r"\(no checkpoint to resume from"):
        check_args(make_args(**{**vars(args), "save_most_recent": True}))
    check_args(make_args(**{**vars(args), "resume": "latest"}))
    check_args(make_args(**{**vars(args), "name": None}))  # OpenCLIP names it by the time

    # only where OpenCLIP looks: rank 0 (another rank would see the log that rank 0 has just made)
    ranks(local=1, rank=1, world=8)
    check_args(args)
    ranks(local=0, rank=8, world=16)  # local rank 0 of the second node: not global rank 0
    check_args(args)
    # --log-local: out-RANK (no extension) on each node's local rank 0; out.log is not that file
    local = make_args(**{**vars(args), "log_local": True})
    check_args(local)
    (run / "out-8").write_text("")
    with pytest.raises(PreflightError, match=r"already holds a run \(--resume latest continues from epoch_10\.pt\)"):
        check_args(local)


def test_report_to_a_package_that_is_missing(csv_file, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what OpenCLIP imports fails
    for report_to in ("tensorboard", "wandb,tensorboard", "all"):
        with pytest.raises(PreflightError, match=r"^--report-to tensorboard needs the tensorboard package, which is "
                                                 r"not installed: pip install 'm2mix-openclip\[tensorboard\]'"):
            check_args(make_args(train_data=str(csv_file), report_to=report_to, logs="./logs"))
    check_args(make_args(train_data=str(csv_file), report_to=""))
    # OpenCLIP needs tensorboard only where it saves logs
    check_args(make_args(train_data=str(csv_file), report_to="tensorboard", logs="none"))
