"""Bad data met while OpenCLIP trains: one line naming the file, never a traceback or a silent loop.

The pre-flight checks (:mod:`.preflight`) read what can be read cheaply before the model is
built: the CSV's every row, every shard's first header, the first shard's first sample. What only
the training finds is reported here, in the process that finds it (DataLoader workers included):

- a CSV row (OpenCLIP's ``CsvDataset``) whose image is missing, empty, truncated or not an image
  stops the run with :class:`~m2mix_openclip.datasets.MissingImageError` or
  :class:`UnreadableImageError`, naming the CSV, its line and the image: a CSV names a fixed set
  of samples, and OpenCLIP would end in a traceback;
- a shard sample that cannot be decoded is skipped, as OpenCLIP's webdataset pipeline skips it
  (web-scale shards hold a few broken samples), but its warning names the shard, the sample and
  the member (``Handling webdataset error (SampleDecodeError('s-000001.tar sample 0003: png is
  truncated ...')). Ignoring.``) instead of an anonymous ``BytesIO``;
- shards that form no batch (every sample broken, or fewer usable samples than a batch per
  worker) stop the run with :class:`NoBatchError`, where OpenCLIP's training pipeline would repeat
  its pass over them forever.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import types
from typing import Optional

import webdataset
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset

from ..datasets import IMAGE_EXTENSIONS, missing_image_error
from .preflight import csv_row_lines

__all__ = ["UnreadableImageError", "SampleDecodeError", "NoBatchError", "image_problem", "report_bad_samples",
           "name_sample_errors", "stop_passes_without_batch", "CountedShards", "GuardedPipeline"]


class UnreadableImageError(ValueError):
    """An image that a CSV row names is empty, truncated or not an image (the message names the
    file, line and image). Constructed from its message alone, so that a DataLoader worker can
    re-raise it."""


class SampleDecodeError(ValueError):
    """A shard sample that cannot be decoded; the message names the shard, the sample and the member."""


class NoBatchError(RuntimeError):
    """Training shards that form no batch; the message names them and the fix."""


def _decode_problem(error: Exception) -> str:
    text = str(error)
    if "truncated" in text.lower():
        return f"is truncated (PIL: {text})"
    return f"cannot be decoded ({type(error).__name__}: {text})"


def image_problem(image) -> Optional[str]:
    """What keeps PIL from reading ``image`` (a path or encoded bytes), as "is empty (0 bytes)",
    "is truncated (...)", ...; None where it reads, or where a path does not exist."""
    if isinstance(image, (bytes, bytearray)):
        size, source = len(image), io.BytesIO(image)
    else:
        if not os.path.isfile(image):
            return None
        size, source = os.path.getsize(image), image
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with Image.open(source) as opened:
            opened.load()
    except UnidentifiedImageError:
        return "is not an image PIL can read (a wrong extension, or an error page saved as an image?)"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError or DecompressionBombError for bad files
        return _decode_problem(e)
    return None


@contextlib.contextmanager
def report_bad_samples(dataset_class):
    """Within the context, ``dataset_class`` (OpenCLIP's ``CsvDataset``) remembers its file and,
    for a row whose image is missing or unreadable, raises ``MissingImageError`` or
    :class:`UnreadableImageError` naming the file, line and image. Other errors pass unchanged."""
    original_init, original_getitem = dataset_class.__init__, dataset_class.__getitem__
    signature = inspect.signature(original_init)

    def __init__(self, input_filename, *args, **kwargs):
        original_init(self, input_filename, *args, **kwargs)
        bound = signature.bind_partial(self, input_filename, *args, **kwargs)
        self._m2mix_source = (input_filename, bound.arguments.get("sep", "\t"))

    def __getitem__(self, idx):
        try:
            return original_getitem(self, idx)
        except Exception as e:
            source, sep = getattr(self, "_m2mix_source", ("the CSV", "\t"))
            image = str(self.images[idx])
            missing = isinstance(e, FileNotFoundError)
            problem = None if missing else image_problem(image)
            if not missing and problem is None:
                raise
            line = csv_row_lines(source, sep, rows=idx + 1)[idx] if os.path.isfile(source) else idx + 2
            if missing:
                raise missing_image_error(source, line, image) from None
            raise UnreadableImageError(f"{source} line {line}: image {image!r} {problem}") from None

    dataset_class.__init__, dataset_class.__getitem__ = __init__, __getitem__
    try:
        yield
    finally:
        dataset_class.__init__, dataset_class.__getitem__ = original_init, original_getitem


# -- shards ---------------------------------------------------------------------------------------
def _member_problem(sample: dict) -> str:
    """Which member of a shard sample cannot be decoded, and why (called once decoding failed)."""
    for extension in IMAGE_EXTENSIONS:
        if isinstance(sample.get(extension), (bytes, bytearray)):
            problem = image_problem(sample[extension])
            if problem is not None:
                return f"{extension} {problem}"
    text = sample.get("txt")
    if isinstance(text, (bytes, bytearray)):
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"txt is not UTF-8 (byte 0x{text[e.start]:02x} at {e.start})"
    return ""


def _naming_decode(wds):
    """``webdataset.decode`` whose failures name the shard, the sample and the member: each sample
    is decoded alone by webdataset's own stage, and a failure reaches the pipeline's handler
    (OpenCLIP's "Handling webdataset error ... Ignoring.") as a :class:`SampleDecodeError`."""

    def decode(*args, handler=wds.reraise_exception, **kwargs):
        decode_one = wds.decode(*args, **kwargs)  # raises where a sample cannot be decoded

        def stage(samples):
            for sample in samples:
                try:
                    decoded = list(decode_one(iter([sample])))
                except Exception as e:
                    where = f"{sample.get('__url__', 'a shard')} sample {sample.get('__key__', '?')}"
                    named = SampleDecodeError(f"{where}: {_member_problem(sample) or _decode_problem(e)}")
                    if handler(named):
                        continue
                    break
                yield from decoded
        return stage

    return decode


@contextlib.contextmanager
def name_sample_errors(data_module):
    """Within the context, the webdataset pipelines that ``data_module`` (OpenCLIP's ``data``)
    builds decode through :func:`_naming_decode`."""
    wds = getattr(data_module, "wds", None)
    if wds is None or not hasattr(wds, "decode"):
        yield
        return
    shim = types.ModuleType(wds.__name__)
    shim.__dict__.update(wds.__dict__)
    shim.decode = _naming_decode(wds)
    data_module.wds = shim
    try:
        yield
    finally:
        data_module.wds = wds


class _NoBatchGuard:
    """Counts, in one DataLoader worker, the shards drawn and the passes begun since the last batch."""

    def __init__(self, describe: str, batch_size: int, draw_limit: int):
        self.describe, self.batch_size, self.draw_limit = describe, batch_size, draw_limit
        self.draws = 0
        self.passes_without_batch = 0

    def pass_begins(self):
        if self.passes_without_batch >= 1:
            raise NoBatchError(
                f"{self.describe}: a whole pass over the shards (those of one data-loader worker) formed no batch of "
                f"{self.batch_size}: they hold fewer usable samples (an image and a txt caption that decode; see the "
                "warnings above) than a batch; check the shards, or lower --batch-size or --workers (OpenCLIP would "
                "repeat the pass forever)")
        self.passes_without_batch += 1

    def draw(self):
        self.draws += 1
        if self.draws > self.draw_limit:
            raise NoBatchError(
                f"{self.describe}: {self.draws - 1} shards were drawn without forming a batch of {self.batch_size}: "
                "they hold no usable sample (an image and a txt caption that decode; see the warnings above); check "
                "the shards (OpenCLIP would keep drawing forever)")

    def batch_formed(self):
        self.draws = 0
        self.passes_without_batch = 0


class CountedShards(IterableDataset):
    """A training pipeline's shard list (its first stage) that tells the guard of each pass and draw."""

    def __init__(self, shards, guard: _NoBatchGuard):
        super().__init__()
        self.shards, self.guard = shards, guard

    def __iter__(self):
        self.guard.pass_begins()
        for shard in self.shards:
            self.guard.draw()
            yield shard


class GuardedPipeline(webdataset.DataPipeline):
    """OpenCLIP's training pipeline, whose batches reset its guard (the class its instance is given)."""

    def iterator(self):
        for batch in super().iterator():
            self._m2mix_guard.batch_formed()
            yield batch


def stop_passes_without_batch(data_info, describe: str, batch_size: int, buffered: int = 1000) -> bool:
    """Makes OpenCLIP's webdataset training pipeline (``data_info``, the ``DataInfo`` its
    ``get_data`` returns under ``"train"``) raise :class:`NoBatchError` where a whole pass over its
    shards forms no batch, or where more shards are drawn without one than a batch could need
    (``--dataset-resampled``, whose passes never end): 10 x the number of shards, and at least
    2 x (``buffered``, the samples its shuffle buffer holds before the first leaves it, + a batch).
    Returns whether it is such a pipeline (a CSV's DataLoader ends each epoch by itself)."""
    loader = getattr(data_info, "dataloader", None)
    stages = getattr(loader, "pipeline", None) or [None]
    dataset = getattr(stages[0], "dataset", None)  # wds.WebLoader: a pipeline around a DataLoader of the dataset
    if not isinstance(dataset, webdataset.DataPipeline) or dataset.repetitions == 1 or not dataset.pipeline:
        return False
    shards = dataset.pipeline[0]
    count = len(getattr(shards, "urls", ()))
    guard = _NoBatchGuard(describe, batch_size, draw_limit=max(10 * count, 2 * (buffered + batch_size)))
    dataset.pipeline[0] = CountedShards(shards, guard)
    dataset._m2mix_guard = guard
    dataset.__class__ = GuardedPipeline
    return True
