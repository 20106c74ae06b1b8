"""Loading models and checkpoints: any OpenCLIP model, with a checkpoint read safely.

Floor 1 of evaluation (see :mod:`m2mix_openclip.datasets` for the layers). The one place that
reads checkpoints: a new checkpoint form (an exported model, a file of another trainer) is a new
branch of :func:`read_checkpoint` here and nowhere else.

- Checkpoints load with ``torch.load(..., weights_only=True)``: no pickled code runs. The numpy
  scalars that OpenCLIP below 2.30 stores (its learning rates) are allowed through the version
  adapter (``openclip_compat.numpy_scalars_allowed``).
- A training checkpoint (``{"state_dict": ...}`` with ``module.`` prefixes from
  DistributedDataParallel) and a bare state dict both work.
- A ``local-dir:`` folder's own weights (``m2mix-export``'s): OpenCLIP 3.x loads them; before 3.0
  the folder's ``open_clip_pytorch_model.bin`` is read here (``openclip_compat.local_dir_weights``).
- Errors name the file and the fix: a missing file, an unreadable one, one that does not fit the
  model (listing missing, unexpected and mis-shaped keys), pretrained weights that cannot be had.

Weight-space interpolation (WiSE-FT, Wortsman et al. 2022; ``m2mix-wiseft``) is
:func:`interpolate_state_dicts`: every floating-point tensor, ``logit_scale`` included.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch

from .integration.openclip_compat import local_dir_weights, numpy_scalars_allowed
from .integration.openclip_compat import model_name as supported_model_name
from .integration.quiet import PRETRAINED_FAILURE, RANDOM_INIT, dropped_log_messages

__all__ = ["read_checkpoint", "load_model", "interpolate_state_dicts"]


def _state_dict_mismatch(model_state: dict, state: dict, limit: int = 5) -> str:
    """Missing keys, unexpected keys and shape mismatches, each with a count and the first names."""
    def listed(names):
        names = sorted(names)
        return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    parts = []
    missing = set(model_state) - set(state)
    unexpected = set(state) - set(model_state)
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
              for k in sorted(set(state) & set(model_state))
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(model_state[k].shape)]
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listed(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:limit])
                     + (f"; ... ({len(shapes)} in all)" if len(shapes) > limit else ""))
    return "; ".join(parts)


def read_checkpoint(checkpoint: str) -> dict:
    """The model's state dict from a checkpoint file, without ``module.`` prefixes.

    Raises:
        FileNotFoundError: no such file. ValueError: it cannot be read with ``weights_only=True``
            (truncated, pickled code, another format) or holds no state dict.
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        with numpy_scalars_allowed():  # the learning rates in checkpoints of OpenCLIP < 2.30
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, pickles with code, other formats
        raise ValueError(f"cannot read checkpoint {checkpoint} as a PyTorch state dict "
                         f"(weights_only=True): {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {checkpoint} holds {type(state).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_model(model_name: str, checkpoint: Optional[str] = None, pretrained: Optional[str] = None,
               device: str = "cpu"):
    """(model, preprocess, tokenizer) for an OpenCLIP model in eval mode, with a checkpoint
    loaded safely (:func:`read_checkpoint`).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: an unreadable checkpoint, one that does not fit the model (the message lists
            missing, unexpected and mis-shaped keys), ``--pretrained`` with a ``local-dir:`` model,
            or pretrained weights that cannot be had (not cached and no network).
    """
    import open_clip
    if model_name.startswith("local-dir:") and pretrained:
        raise ValueError("OpenCLIP ignores --pretrained for local-dir: models; pass --checkpoint instead")
    if checkpoint is None:
        checkpoint = local_dir_weights(model_name)  # a folder's own weights, before OpenCLIP 3.0
    model_name = supported_model_name(model_name)  # local-dir: before OpenCLIP 3.0 too
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    # held back: the random-init warning when the checkpoint's weights replace the random ones, and
    # OpenCLIP's ERROR line for a pretrained tag that cannot be had (the error below restates it)
    held_back = (RANDOM_INIT if state is not None else ()) + (PRETRAINED_FAILURE if pretrained else ())
    try:
        with dropped_log_messages(*held_back):
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                         device=device)
    except Exception as e:
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if tags and pretrained not in tags and not os.path.exists(pretrained):
            hint = f"the tags of {model_name!r}: {', '.join(tags)}"
        else:
            hint = ("offline? the weights must already be in the Hugging Face / OpenCLIP cache; "
                    "`open_clip.list_pretrained()` lists the models and tags")
        raise ValueError(f"cannot load --pretrained {pretrained!r} for --model {model_name!r}: "
                         f"{type(e).__name__}: {first} ({hint})") from e
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            details = _state_dict_mismatch(model.state_dict(), state) or str(e).strip()
            raise ValueError(f"checkpoint {checkpoint} does not fit model {model_name!r}: {details} "
                             f"(is --model the architecture it was trained with?)") from e
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def interpolate_state_dicts(zero_shot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                            alpha: float) -> Dict[str, torch.Tensor]:
    r"""WiSE-FT's weight-space ensemble:
    :math:`\theta(\alpha) = (1 - \alpha)\,\theta_{\text{zero-shot}} + \alpha\,\theta_{\text{fine-tuned}}`
    for every floating-point tensor (``logit_scale`` included); tensors that are not floating
    point (integer buffers such as a BatchNorm's ``num_batches_tracked``) are the fine-tuned
    model's. Computed with ``torch.lerp`` in at least float32, then cast to the zero-shot
    tensor's dtype, so that alpha 0 gives the zero-shot weights and alpha 1 the fine-tuned ones
    exactly (bit for bit where the dtypes agree).

    Raises:
        ValueError: the two hold different keys or shapes (the first few named).
    """
    missing, extra = sorted(set(zero_shot) - set(finetuned)), sorted(set(finetuned) - set(zero_shot))
    shapes = [k for k in zero_shot if k in finetuned and tuple(zero_shot[k].shape) != tuple(finetuned[k].shape)]
    if missing or extra or shapes:
        problems = [f"{label}: {', '.join(keys[:5])}" + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                    for label, keys in (("only in the zero-shot model", missing),
                                        ("only in the fine-tuned model", extra), ("shapes differ", shapes)) if keys]
        raise ValueError("the zero-shot and fine-tuned weights do not match (" + "; ".join(problems)
                         + "): were both made from the same --model?")
    merged = {}
    for key, start in zero_shot.items():
        end = finetuned[key]
        if start.is_floating_point():
            work = torch.promote_types(torch.promote_types(start.dtype, end.dtype), torch.float32)
            merged[key] = torch.lerp(start.to(work), end.to(device=start.device, dtype=work), alpha).to(start.dtype)
        else:
            merged[key] = end.clone()
    return merged
