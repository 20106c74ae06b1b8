"""Checks of a training command before the model is built, and the missing-image error."""

import argparse
import io
import os
import tarfile

import pytest

from m2mix_openclip.integration.preflight import MissingImageError, PreflightError, check_args, one_line
from m2mix_openclip.integration.sample_errors import report_bad_samples


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


def write_shard(path, members):
    """A tar at ``path`` holding ``members`` ({name: bytes}) in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(key, image=b"\x89PNG not decoded here", caption=b"a caption"):
    return {f"{key}.png": image, f"{key}.txt": caption}


def test_shards_that_do_not_match(tmp_path):
    write_shard(tmp_path / "s-000000.tar", sample_members("0000"))
    check_args(make_args(train_data=str(tmp_path / "s-{000000..000000}.tar")))
    with pytest.raises(PreflightError, match=r"1 of 2 shard\(s\) not found, e\.g\. .*s-000001\.tar"):
        check_args(make_args(train_data=str(tmp_path / "s-{000000..000001}.tar")))


def test_a_dataset_type_that_contradicts_an_extension(csv_file, tmp_path):
    """OpenCLIP applies --dataset-type to --train-data and --val-data alike: shards and a CSV need it left out."""
    shard = write_shard(tmp_path / "s-000000.tar", sample_members("0000"))
    check_args(make_args(train_data=shard, val_data=str(csv_file)))  # auto: each by its extension
    with pytest.raises(PreflightError, match=r"^--val-data .*train\.csv: --dataset-type webdataset reads it as "
                                             r"webdataset, but its extension says csv; leave --dataset-type out"):
        check_args(make_args(train_data=shard, val_data=str(csv_file), dataset_type="webdataset"))


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

    with report_bad_samples(Dataset):
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
    import torch
    for name in ("epoch_10.pt", "epoch_2.pt"):
        torch.save({"epoch": 1, "state_dict": {}}, run / "checkpoints" / name)
    # OpenCLIP's --resume latest takes the last name in natural order, whatever the times
    os.utime(run / "checkpoints" / "epoch_10.pt", (0, 0))
    with pytest.raises(PreflightError, match=r"\(--resume latest continues from epoch_10\.pt\)"):
        check_args(args)
    # a checkpoint cut short is skipped, as --resume latest skips it, and said so
    (run / "checkpoints" / "epoch_11.pt").write_bytes((run / "checkpoints" / "epoch_10.pt").read_bytes()[:300])
    with pytest.raises(PreflightError, match=r"\(--resume latest continues from epoch_10\.pt, skipping epoch_11\.pt is "
                                             r"cut short \(300 bytes and no zip directory at its end"):
        check_args(args)
    os.remove(run / "checkpoints" / "epoch_11.pt")
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


# -- shards as OpenCLIP's loader reads them ----------------------------------------------------------
def test_a_glob_is_answered_with_the_brace_pattern_that_names_the_same_files(tmp_path):
    import braceexpand
    for i in (0, 1, 2, 3):
        write_shard(tmp_path / f"finetune-{i:06d}.tar", sample_members("0000"))
    spec = str(tmp_path / "finetune-*.tar")
    with pytest.raises(PreflightError) as e:
        check_args(make_args(train_data=spec, dataset_type="webdataset"))
    message = str(e.value)
    assert message.startswith(f"--train-data {spec}: OpenCLIP reads shard names literally and expands only brace "
                              "patterns and '::' lists")
    assert message.endswith(
        f"the glob matches 4 file(s) here: use --train-data '{tmp_path}/finetune-{{000000..000003}}.tar'")
    assert "\n" not in message
    suggested = message.rsplit("--train-data '", 1)[1][:-1]
    check_args(make_args(train_data=suggested, dataset_type="webdataset"))  # the suggestion passes

    # a gap, and names that are not numbers: the suggestion still expands to exactly the files
    from m2mix_openclip.integration.preflight import brace_pattern
    for names in (["s-000000.tar", "s-000001.tar", "s-000003.tar", "s-000007.tar", "s-000008.tar"],
                  ["train-a.tar", "train-b.tar", "train-cc.tar"], ["x/part-09.tar", "x/part-10.tar"]):
        pattern = brace_pattern(names)
        assert sorted(braceexpand.braceexpand(pattern)) == names, pattern
    assert brace_pattern(["s-000000.tar", "s-000001.tar"]) == "s-{000000..000001}.tar"
    # a glob inside a '::' list gets its own part replaced
    other = write_shard(tmp_path / "other.tar", sample_members("0000"))
    with pytest.raises(PreflightError, match=r"use --train-data '.*other\.tar::.*finetune-\{000000\.\.000003\}\.tar'$"):
        check_args(make_args(train_data=f"{other}::{spec}", dataset_type="webdataset"))


def test_empty_unreadable_and_sampleless_shards_are_named_before_training(tmp_path):
    good = write_shard(tmp_path / "s-000000.tar", sample_members("0000"))
    (tmp_path / "s-000001.tar").write_bytes(b"")
    (tmp_path / "s-000002.tar").write_bytes(os.urandom(2048))
    spec = str(tmp_path / "s-{000000..000002}.tar")
    with pytest.raises(PreflightError) as e:
        check_args(make_args(train_data=spec))
    message = str(e.value)
    assert message.startswith(f"--train-data {spec}: 2 of 3 shard(s) cannot be read: {tmp_path}/s-000001.tar is empty "
                              f"(0 bytes); {tmp_path}/s-000002.tar is not a readable tar (")
    assert message.endswith("; remove them from the pattern or re-create them")
    # '::' lists are OpenCLIP's too
    check_args(make_args(train_data=f"{good}::{good}"))
    # members that never form a sample OpenCLIP trains on (no caption next to the image)
    odd = write_shard(tmp_path / "odd.tar", {"0000.jpg": b"x", "0000.json": b"{}", "0001.jpg": b"x"})
    with pytest.raises(PreflightError, match=r"odd\.tar holds no sample with an image \(jpg/png/jpeg/webp\) and a txt "
                                             r"caption next to each other \(member extensions found: \.jpg, \.json\)"):
        check_args(make_args(train_data=odd))


# -- every CSV row, as OpenCLIP's pandas reader reads it ------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"png")
    return str(path)


def test_empty_captions_and_short_rows_are_refused_with_their_lines(tmp_path, image):
    path = tmp_path / "t.csv"
    rows = [f"{image}\tone", f"{image}\t", f"{image}\tthree", image, f"{image}\tNA", f"{image}\tsix"]
    path.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    with pytest.raises(PreflightError) as e:
        check_args(make_args(train_data=str(path)))
    assert str(e.value) == (
        f"--train-data {path}: 3 row(s) have no caption (--csv-caption-key title: an empty field, a row shorter than "
        "the header, or a text pandas reads as missing such as 'NA'), on line(s) 3, 5, 6; OpenCLIP would train on "
        "them as the text 'nan': fill them in or remove those rows")
    # blank lines (pandas skips them) and a caption over two quoted lines move the rows' lines
    path.write_text(f'filepath\ttitle\n\n{image}\t"two\nlines"\n\n{image}\t\n' + f"{image}\tok\n" * 7)
    with pytest.raises(PreflightError, match=r"1 row\(s\) have no caption .* on line\(s\) 6;"):
        check_args(make_args(train_data=str(path)))
    # many: the first five and a count
    path.write_text("filepath\ttitle\n" + f"{image}\t\n" * 8)
    with pytest.raises(PreflightError, match=r"8 row\(s\) have no caption .* on line\(s\) 2, 3, 4, 5, 6 and 3 more;"):
        check_args(make_args(train_data=str(path)))
    # and images
    path.write_text(f"filepath\ttitle\n{image}\tone\n\ttwo\n")
    with pytest.raises(PreflightError, match=r"1 row\(s\) have no image path \(--csv-img-key filepath.* line\(s\) 3;"):
        check_args(make_args(train_data=str(path)))


def test_a_byte_order_mark_is_read_as_pandas_reads_it(tmp_path, image):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"filepath\ttitle\n{image}\ta caption\n".encode())
    check_args(make_args(train_data=str(path)))


def test_a_byte_that_is_not_utf8_names_its_line_and_column(tmp_path, image):
    path = tmp_path / "latin.csv"
    lines = [f"{image}\tcaption {i}".encode() for i in range(40)]
    lines[30] = f"{image}\tcaf".encode() + b"\xe9 au lait"
    path.write_bytes(b"filepath\ttitle\n" + b"\n".join(lines) + b"\n")
    column = len(f"{image}\tcaf") + 1
    with pytest.raises(PreflightError) as e:
        check_args(make_args(train_data=str(path)))
    assert str(e.value) == (f"--train-data {path} line 32: byte 0xe9 at column {column} is not UTF-8, which OpenCLIP's "
                            "trainer reads CSV files as: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def test_a_row_pandas_cannot_split_is_one_line(tmp_path, image):
    path = tmp_path / "wide.csv"
    path.write_text(f"filepath\ttitle\n{image}\tone\n{image}\ttwo\textra\n")
    with pytest.raises(PreflightError, match=r"^--train-data .*wide\.csv: pandas, which OpenCLIP's trainer reads CSV "
                                             r"files with, cannot read it: .*Expected 2 fields in line 3, saw 3$"):
        check_args(make_args(train_data=str(path)))
