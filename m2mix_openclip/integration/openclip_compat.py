"""The one place that knows how OpenCLIP releases differ (open_clip_torch 2.20 to 3.x).

Every other module asks this one, never a version number. Differences between the supported
releases, found by looking at the installed code (signatures, argparse actions, attributes)
wherever that is possible:

- the trainer package: ``open_clip_train`` from 2.26.1 on; the 2.20-2.24 wheels (and clones,
  run from ``src/``) ship it as a top-level package named ``training``. Whichever is used must sit
  beside the imported ``open_clip`` and be OpenCLIP's trainer (its ``main`` binds
  ``open_clip.create_loss`` and its own ``train.train_one_epoch``), not an unrelated ``training``;
- the trainer's flags (``--siglip`` from 2.22, ``--device`` from 2.28, ``--loss-dist-impl`` from
  2.30): read from the parser that ``params.parse_args`` builds, or from the parsed arguments;
- ``SigLipLoss`` (2.22 on) and its ``dist_impl`` argument (2.30 on), read from ``open_clip.loss``
  (the model-side library: the losses ask without importing the trainer);
- ``local-dir:PATH`` model names (3.0 on): older releases get the folder's config registered
  in-process (``open_clip.add_model_config``) under a plain name, and the tools load the folder's
  ``open_clip_pytorch_model.bin`` themselves (:func:`local_dir_weights`), as 3.x loads it;
- a created model's preprocessing config: ``open_clip.get_model_preprocess_cfg`` where it exists,
  else the ``image_size`` / ``image_mean`` / ``image_std`` attributes (:func:`model_preprocess_cfg`);
- the tokenizer's context length: 2.20 always gives 77 tokens, whatever the model's config says;
- the trainer's ``precision.get_autocast`` takes the device type from 2.28 on; before, it knows
  CUDA only (:func:`evaluation_precision`);
- ``--resume`` of the trainer's own checkpoints before 2.30 with torch >= 2.6: the scheduler
  stores numpy learning rates, which ``torch.load``'s ``weights_only`` default then refuses
  (OpenCLIP's bug, fixed upstream in 2.30); :func:`numpy_scalars_allowed` reads such checkpoints.

``ClipLoss.forward`` takes ``logit_bias`` from 2.32 on; the m²-Mix losses take it on every
release, so nothing asks.

Below 2.20, from 4.0 on (OpenCLIP's main branch drops ``use_horovod`` and ``create_loss``), or
with a trainer that cannot be recognised, :func:`require_trainer` raises
:class:`UnsupportedOpenCLIP` with one line naming the installed version and the supported range.
Importing this module, or the loss, needs no trainer at all.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, FrozenSet, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch

SUPPORTED_RANGE = ">=2.20,<4"
_OLDEST = (2, 20)
_FIRST_UNSUPPORTED = (4,)
TRAINER_PACKAGES = ("open_clip_train", "training")  # newest layout first
LOCAL_DIR = "local-dir:"
DEFAULT_CONTEXT_LENGTH = 77


class UnsupportedOpenCLIP(RuntimeError):
    """The installed OpenCLIP cannot run ``m2mix-train``; the message is one line."""


@dataclass(frozen=True)
class Trainer:
    """OpenCLIP's trainer as installed: the package name and its three modules the launcher wraps."""

    package: str
    main: types.ModuleType
    params: types.ModuleType
    train: types.ModuleType

    @property
    def plugins_patch_applied(self) -> bool:
        """True when OpenCLIP carries one of ``patches/`` (it then has ``--loss`` itself)."""
        return importlib.util.find_spec(f"{self.package}.plugins") is not None


def _version_tuple(version: str) -> Tuple[int, ...]:
    """Leading release numbers of a version string: ``"4.2.0.dev0"`` -> ``(4, 2, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def openclip_version() -> str:
    """The version of the ``open_clip`` that Python imports (which may be a clone, not the installed wheel)."""
    from open_clip.version import __version__
    return __version__


def _where(module_name: str) -> str:
    spec = importlib.util.find_spec(module_name)
    return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))) if spec and spec.origin else "?"


def _unsupported(reason: str, version: Optional[str] = None) -> UnsupportedOpenCLIP:
    return UnsupportedOpenCLIP(
        f"OpenCLIP (open_clip_torch) {version or openclip_version()} at {_where('open_clip')}: {reason}; "
        f"m2mix-train supports open_clip_torch {SUPPORTED_RANGE} "
        f"(pip install 'open_clip_torch{SUPPORTED_RANGE}')")


def check_version(version: Optional[str] = None) -> None:
    """Raises :class:`UnsupportedOpenCLIP` for a release outside :data:`SUPPORTED_RANGE`."""
    version = openclip_version() if version is None else version
    numbers = _version_tuple(version)
    if not numbers:
        raise _unsupported("not a release number", version)
    if numbers < _OLDEST:
        raise _unsupported("older than the oldest supported release", version)
    if numbers >= _FIRST_UNSUPPORTED:
        raise _unsupported("its trainer (task API, no create_loss / train_one_epoch) is not supported yet", version)


def _beside_open_clip(package: str) -> bool:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:  # absent, or a namespace folder: not a trainer package
        return False
    return _where(package) == _where("open_clip")


def _is_openclip_trainer(package: str) -> bool:
    """The package's ``main`` is OpenCLIP's: it binds ``open_clip.create_loss`` and its own
    ``train_one_epoch``, ``parse_args`` and ``pt_load``, the names the launcher swaps."""
    folder = os.path.dirname(importlib.util.find_spec(package).origin)
    if not all(os.path.isfile(os.path.join(folder, f"{m}.py")) for m in ("main", "params", "train", "file_utils")):
        return False
    with open(os.path.join(folder, "main.py"), encoding="utf-8") as f:
        if "open_clip" not in f.read():  # an unrelated package named `training`: do not import it
            return False
    import open_clip
    main = importlib.import_module(f"{package}.main")
    train = importlib.import_module(f"{package}.train")
    params = importlib.import_module(f"{package}.params")
    plugins = getattr(main, "plugins", None)  # one of patches/ builds the loss there
    builds_loss = (getattr(main, "create_loss", None) is getattr(open_clip, "create_loss", object())
                   or callable(getattr(plugins, "create_loss", None)))
    return (builds_loss
            and getattr(main, "train_one_epoch", None) is getattr(train, "train_one_epoch", object())
            and getattr(main, "parse_args", None) is getattr(params, "parse_args", object())
            and callable(getattr(main, "pt_load", None)) and callable(getattr(train, "get_clip_metrics", None))
            and getattr(params, "argparse", None) is argparse)


@functools.lru_cache(maxsize=None)
def require_trainer() -> Trainer:
    """OpenCLIP's trainer beside the imported ``open_clip``, or :class:`UnsupportedOpenCLIP`."""
    check_version()
    beside = [p for p in TRAINER_PACKAGES if _beside_open_clip(p)]
    if not beside:
        found = [f"{p} at {_where(p)}" for p in TRAINER_PACKAGES if importlib.util.find_spec(p) is not None]
        raise _unsupported("no trainer package (open_clip_train, or training before 2.26) beside it"
                           + (f" (found {', '.join(found)}, from another OpenCLIP)" if found else ""))
    package = beside[0]
    if not _is_openclip_trainer(package):
        raise _unsupported(f"the trainer package {package!r} beside it is not a recognised OpenCLIP trainer")
    return Trainer(package, importlib.import_module(f"{package}.main"),
                   importlib.import_module(f"{package}.params"), importlib.import_module(f"{package}.train"))


class _ParserCaptured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


@functools.lru_cache(maxsize=None)
def trainer_flags() -> FrozenSet[str]:
    """Every option string of the installed trainer's parser (``--device``, ``--loss-dist-impl``, ...)."""
    params = require_trainer().params

    class Capturing(argparse.ArgumentParser):
        """Records the option strings of every argument (argparse has no public list of them;
        OpenCLIP's params.py adds each one to the parser itself, in no group)."""

        options: set

        def add_argument(self, *args, **kwargs):
            action = super().add_argument(*args, **kwargs)
            self.__dict__.setdefault("options", set()).update(action.option_strings)
            return action

        def parse_args(self, args=None, namespace=None):
            raise _ParserCaptured(self)

    shim = types.ModuleType("argparse")
    shim.__dict__.update(argparse.__dict__)
    shim.ArgumentParser = Capturing
    saved = params.argparse
    params.argparse = shim
    try:
        params.parse_args([])
    except _ParserCaptured as captured:
        return frozenset(captured.parser.options)
    finally:
        params.argparse = saved
    raise _unsupported("its params.parse_args does not build an argparse parser")


def has_flag(option: str) -> bool:
    """Whether the installed trainer takes ``option`` (e.g. ``"--device"``)."""
    return option in trainer_flags()


# trainer flags that the older supported releases lack: the first release with it, and what to do before
NEWER_TRAINER_FLAGS = {
    "--device": ("2.28", "it takes a visible GPU, else the CPU: leave --device out (CUDA_VISIBLE_DEVICES= keeps "
                         "it on the CPU)"),
    "--loss-dist-impl": ("2.30", "its SigLIP loss always exchanges caption chunks in both directions, as "
                                 "--loss-dist-impl bidir does: leave the flag out"),
    "--siglip": ("2.22", "it has no SigLIP loss: pip install 'open_clip_torch>=2.22,<4' for --siglip"),
}


def missing_flag_advice(option: str) -> Optional[str]:
    """For a trainer flag of newer releases that the installed trainer lacks: one line naming the
    installed version and what to do (``"OpenCLIP 2.24.0's trainer has no --device (it came in
    2.28); it takes a visible GPU, else the CPU: ..."``); None for any other flag."""
    if option not in NEWER_TRAINER_FLAGS or has_flag(option):
        return None
    first, instead = NEWER_TRAINER_FLAGS[option]
    return f"OpenCLIP {openclip_version()}'s trainer has no {option} (it came in {first}); {instead}"


def device_arguments(device: str) -> Tuple[List[str], dict]:
    """(trainer flags, environment variables) that run the trainer on ``device``: ``--device
    DEVICE`` where the trainer has the flag (2.28 on); before, it takes cuda when it sees a GPU,
    so the CPU is reached by hiding the GPUs, and a given GPU cannot be chosen."""
    if has_flag("--device"):
        return ["--device", device], {}
    if device == "cpu":
        return [], {"CUDA_VISIBLE_DEVICES": ""}
    if device == "cuda":
        return [], {}
    raise _unsupported(f"its trainer has no --device flag (2.28 on), so --device {device} cannot be chosen; "
                       "it runs on cuda when a GPU is visible, else on the CPU")


def has_siglip_loss() -> bool:
    """Whether ``open_clip.loss`` has ``SigLipLoss`` (2.22 on; 2.20 has neither it nor ``--siglip``).
    Reads the model-side library only, so the losses ask it without importing the trainer."""
    import open_clip.loss
    return hasattr(open_clip.loss, "SigLipLoss")


def siglip_loss_takes_dist_impl() -> bool:
    """Whether ``SigLipLoss.__init__`` takes ``dist_impl`` (2.30 on); before, it always exchanges
    caption chunks between processes in both directions (``"bidir"``)."""
    from open_clip.loss import SigLipLoss
    return "dist_impl" in inspect.signature(SigLipLoss.__init__).parameters


def siglip_requested(args) -> bool:
    """Whether the trainer's parsed ``args`` ask for SigLIP's loss (``--siglip``, 2.22 on; the
    trainers before have no such flag, hence no such attribute)."""
    return bool(getattr(args, "siglip", False))


def loss_dist_impl(args) -> Optional[str]:
    """The trainer's ``--loss-dist-impl`` from its parsed ``args`` (2.30 on), or None where the
    trainer has no such flag (its ``SigLipLoss`` then exchanges in both directions)."""
    return getattr(args, "loss_dist_impl", None)


def native_local_dir() -> bool:
    """Whether OpenCLIP itself resolves ``local-dir:PATH`` model names (3.0 on)."""
    import open_clip.factory
    return hasattr(open_clip.factory, "LOCAL_DIR_PREFIX")


def tokenizer_context_length(config_context_length: int) -> int:
    """The number of tokens ``open_clip.get_tokenizer`` gives for a model whose text config says
    ``config_context_length``: that number, except on 2.20, whose tokenizer always gives 77."""
    import open_clip
    if "context_length" in inspect.signature(open_clip.get_tokenizer).parameters:
        return config_context_length
    return DEFAULT_CONTEXT_LENGTH


def numpy_scalars_allowed():
    """A context in which ``torch.load(..., weights_only=True)`` also reads numpy float scalars,
    which the trainers before 2.30 store as learning rates in their checkpoints' optimizer state.
    Only the scalar constructor and float dtypes are allowed, no other code. (A torch without
    ``safe_globals`` loads them anyway: its ``weights_only`` default is False.)"""
    import contextlib

    import numpy as np
    import torch
    if not hasattr(torch.serialization, "safe_globals"):
        return contextlib.nullcontext()
    core = getattr(np, "_core", None) or np.core
    return torch.serialization.safe_globals(
        [core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float64, np.float32)])


def model_name(name: str) -> str:
    """A model name the installed OpenCLIP can create. ``local-dir:PATH`` stays as it is where
    OpenCLIP resolves it; on older releases, the folder's ``open_clip_config.json`` (its
    ``model_cfg``) is registered in-process with ``open_clip.add_model_config`` and its plain name
    returned. The folder's weights and ``preprocess_cfg`` are not read there (as ``--pretrained``
    is ignored for ``local-dir:`` models in 3.x)."""
    if not name.startswith(LOCAL_DIR) or native_local_dir():
        return name
    import open_clip
    folder = os.path.abspath(os.path.expanduser(name[len(LOCAL_DIR):]))
    path = os.path.join(folder, "open_clip_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {name}: no open_clip_config.json in {folder}")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    model_cfg = config.get("model_cfg", config)
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"--model {name}: {path} has no model_cfg with embed_dim, vision_cfg and text_cfg")
    context = model_cfg["text_cfg"].get("context_length", DEFAULT_CONTEXT_LENGTH)
    if tokenizer_context_length(context) != context:
        raise ValueError(
            f"--model {name}: text_cfg.context_length is {context}, but the tokenizer of OpenCLIP "
            f"{openclip_version()} always gives {DEFAULT_CONTEXT_LENGTH} tokens; set it to "
            f"{DEFAULT_CONTEXT_LENGTH} in {path}")
    # A plain name per folder (and content), so two folders never share a registry entry.
    digest = hashlib.sha1((folder + json.dumps(model_cfg, sort_keys=True)).encode()).hexdigest()[:12]
    plain = f"local-dir-{os.path.basename(folder) or 'model'}-{digest}"
    registered = os.path.join(tempfile.gettempdir(), "m2mix-openclip-models", f"{plain}.json")
    if open_clip.get_model_config(plain) is None:
        os.makedirs(os.path.dirname(registered), exist_ok=True)
        tmp = f"{registered}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(model_cfg, f)
        os.replace(tmp, registered)  # several processes may register the same folder at once
        open_clip.add_model_config(registered)
    return plain


LOCAL_DIR_WEIGHTS = "open_clip_pytorch_model.bin"  # the weights file of a model folder that m2mix-export writes


def local_dir_folder(name: str) -> Optional[str]:
    """The folder of a ``local-dir:PATH`` model name (absolute), or None for another name."""
    return os.path.abspath(os.path.expanduser(name[len(LOCAL_DIR):])) if name.startswith(LOCAL_DIR) else None


def local_dir_weights(name: str) -> Optional[str]:
    """The weights file the tools load themselves for ``name``: None where OpenCLIP resolves
    ``local-dir:`` and loads the folder's weights itself (3.0 on), or for other names; before 3.0,
    the folder's ``open_clip_pytorch_model.bin`` where there is one (as 3.x would load it)."""
    folder = local_dir_folder(name)
    if folder is None or native_local_dir():
        return None
    path = os.path.join(folder, LOCAL_DIR_WEIGHTS)
    return path if os.path.isfile(path) else None


def model_config(name: str) -> dict:
    """The ``model_cfg`` OpenCLIP builds ``name`` from: a ``local-dir:`` folder's
    ``open_clip_config.json``, else the installed release's registry (built-in names; ``hf-hub:``
    names from the Hugging Face cache where the release reads them).

    Raises:
        ValueError: no config for ``name`` (the message lists where it was looked for).
    """
    import open_clip
    folder = local_dir_folder(name)
    if folder is not None:
        path = os.path.join(folder, "open_clip_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model {name}: no open_clip_config.json in {folder}")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return config.get("model_cfg", config)
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"--model {name}: OpenCLIP {openclip_version()} has no config for it "
                         "(open_clip.list_models() lists the built-in names)")
    return config


def model_preprocess_cfg(model) -> dict:
    """The preprocessing OpenCLIP attached to a created model (size, mean, std, and where the
    release keeps them the interpolation, resize mode, fill colour), with lists for tuples."""
    import open_clip
    read = getattr(open_clip, "get_model_preprocess_cfg", None)
    if read is not None:
        config = dict(read(model))
    else:
        visual = getattr(model, "visual", model)
        config = {key: getattr(visual, attribute, None) for key, attribute in
                  (("size", "image_size"), ("mean", "image_mean"), ("std", "image_std"))}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()
            if value is not None}


def translate_model_argument(argv: Sequence[str]) -> List[str]:
    """``argv`` with the value of ``--model`` (``--model X`` or ``--model=X``) passed through
    :func:`model_name`, so that ``local-dir:`` works on every supported release."""
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--model" and i + 1 < len(out):
            out[i + 1] = model_name(out[i + 1])
        elif token.startswith("--model="):
            out[i] = "--model=" + model_name(token[len("--model="):])
    return out


def evaluation_passes_tokenizer() -> bool:
    """Whether the trainer's zero-shot evaluation takes the run's tokenizer, which its
    ``evaluate`` then passes (2.20's takes none: evaluation hooks get the model's tokenizer there).
    Read from the trainer's own ``zero_shot`` module, which the launcher never swaps."""
    zero_shot = importlib.import_module(f"{require_trainer().package}.zero_shot")
    return "tokenizer" in inspect.signature(zero_shot.zero_shot_eval).parameters


def _running_trainer_module(name: str) -> types.ModuleType:
    """The trainer's module ``name`` as the running trainer imported it (its ``train`` imports
    ``precision``): a patched clone run from its ``src/`` is another copy than the one installed
    beside ``open_clip``. Outside a trainer, the installed trainer's (:func:`require_trainer`)."""
    for package in TRAINER_PACKAGES:
        module = sys.modules.get(f"{package}.{name}")
        if module is not None:
            return module
    return importlib.import_module(f"{require_trainer().package}.{name}")


# What every release's get_autocast gives, for the releases whose get_autocast cannot reach the device.
_AUTOCAST_DTYPES = {"amp": "float16", "amp_bf16": "bfloat16", "amp_bfloat16": "bfloat16"}


def evaluation_precision(precision: str, device) -> Tuple[Callable[[], ContextManager], Optional[torch.dtype]]:
    """(autocast context factory, input dtype) for ``--precision`` on ``device``, as the trainer's
    ``evaluate`` makes them: ``open_clip.get_input_dtype(precision)`` and the trainer's own
    ``precision.get_autocast(precision, device_type=...)``. Before 2.28 that ``get_autocast`` takes
    no device type and opens CUDA's autocast whatever the device (a no-op with a warning on a CPU);
    there the same dtypes (amp: float16, amp_bf16: bfloat16) go to ``torch.autocast`` on the
    device, as the later releases do. Meta tensors get no autocast (there is none for them). Inside
    a trainer, its own ``get_autocast`` (a patched clone's too)."""
    import contextlib

    import open_clip
    import torch
    device = torch.device(device)
    input_dtype = open_clip.get_input_dtype(precision)
    if device.type == "meta":
        return contextlib.nullcontext, input_dtype
    precision_module = _running_trainer_module("precision")
    if "device_type" in inspect.signature(precision_module.get_autocast).parameters:
        return precision_module.get_autocast(precision, device_type=device.type), input_dtype
    if precision not in _AUTOCAST_DTYPES:
        return contextlib.nullcontext, input_dtype
    dtype = getattr(torch, _AUTOCAST_DTYPES[precision])
    return (lambda: torch.autocast(device.type, dtype=dtype)), input_dtype


def initialise_text_decoders(model) -> int:
    """Draws the output projection of every CoCa text decoder in ``model`` as OpenCLIP draws the
    text encoder's (normal, std ``width ** -0.5``); returns how many there were.

    OpenCLIP (every supported release) builds a CoCa text decoder's ``text_projection`` with
    ``torch.empty`` and never initialises it (``MultimodalTransformer.init_parameters`` is never
    called, and in 3.3 fails when called: it reads a ``transformer`` attribute the class lacks), so a
    CoCa created with random weights starts from whatever memory held: caption logits of 1e22 and a
    caption loss of 1e35 or NaN at the first step, at random. Pre-trained weights overwrite it; a
    model trained from random weights (tests, benchmarks) needs this first."""
    import torch

    decoders = [m for m in model.modules() if type(m).__name__ == "MultimodalTransformer"
                and isinstance(getattr(m, "text_projection", None), torch.nn.Parameter)]
    with torch.no_grad():
        for decoder in decoders:
            torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    return len(decoders)
