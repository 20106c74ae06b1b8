"""Evaluation of any OpenCLIP model on image-caption data: embeddings, retrieval, zero-shot,
calibration, embedding arithmetic, and checkpoint loading with clear errors."""

from __future__ import annotations

import glob
import io
import os
import tarfile
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .metrics import embedding_geometry


# -- data -----------------------------------------------------------------------------------------
def load_pairs(data: str, img_key: str = "filepath", caption_key: str = "title", label_key: str = "label",
               sep: str = "\t") -> List[dict]:
    """Image-caption pairs (``image`` path or bytes, ``caption``, optional ``label``) from a CSV
    file or webdataset shards (a path, a glob or a brace pattern such as ``shard-{000000..000003}.tar``)."""
    if data.endswith(".csv") or data.endswith(".tsv"):
        from .data import read_csv
        rows = read_csv(data, img_key, caption_key, sep)
        return [{"image": r[img_key], "caption": r[caption_key],
                 "label": int(r[label_key]) if r.get(label_key, "") != "" else None} for r in rows]
    import braceexpand
    paths = [p for pattern in braceexpand.braceexpand(data) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise FileNotFoundError(f"no CSV or .tar shards match {data!r}")
    samples: Dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, ext = member.name.rsplit(".", 1)
                payload = tar.extractfile(member).read()
                sample = samples.setdefault(f"{path}:{key}", {"label": None})
                if ext in ("png", "jpg", "jpeg", "webp"):
                    sample["image"] = payload
                elif ext == "txt":
                    sample["caption"] = payload.decode()
                elif ext == "cls":
                    sample["label"] = int(payload.decode())
    pairs = [s for s in samples.values() if "image" in s and "caption" in s]
    if not pairs:
        raise ValueError(f"{data!r}: shards hold no sample with both an image (png/jpg) and a txt caption")
    return pairs


def _open_image(image):
    return Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image).convert("RGB")


# -- models ---------------------------------------------------------------------------------------
def load_model(model_name: str, checkpoint: Optional[str] = None, pretrained: Optional[str] = None,
               device: str = "cpu"):
    """(model, preprocess, tokenizer) for an OpenCLIP model, with a checkpoint loaded safely
    (``weights_only=True``). A training checkpoint (``state_dict`` key, ``module.`` prefixes)
    or a bare state dict both work."""
    import open_clip
    if model_name.startswith("local-dir:") and pretrained:
        raise ValueError("OpenCLIP ignores --pretrained for local-dir: models; pass --checkpoint instead")
    from .integration.openclip_compat import model_name as supported_model_name, numpy_scalars_allowed
    model_name = supported_model_name(model_name)  # local-dir: before OpenCLIP 3.0 too
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    if checkpoint is not None:
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
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {checkpoint} does not fit model {model_name!r}: "
                             f"{str(e).splitlines()[0]} (is --model the architecture it was trained with?)") from e
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def encode(model, preprocess, tokenizer, pairs: Sequence[dict], batch_size: int = 256, device: str = "cpu",
           desc: str = "embedding", progress: bool = True):
    """Unit-norm (image_features, text_features), each (N, D), in batches with a progress bar."""
    from tqdm import tqdm
    images, texts = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = pairs[start:start + batch_size]
        pixels = torch.stack([preprocess(_open_image(p["image"])) for p in chunk]).to(device)
        tokens = tokenizer([p["caption"] for p in chunk]).to(device)
        images.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
        texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(images), torch.cat(texts)


@torch.no_grad()
def class_text_features(model, tokenizer, class_names: Sequence[str], templates: Sequence[str], device="cpu"):
    """(C, D) zero-shot classifier: the normalised mean of each class's prompt embeddings."""
    weights = []
    for index, name in enumerate(class_names):
        prompts = [t.format(name=name, digit=index, c=name) for t in templates]
        emb = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1).cpu())
    return torch.stack(weights)


# -- metrics --------------------------------------------------------------------------------------
def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|."""
    confidence, correct = confidence.double(), correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        if inside.any():
            ece += inside.double().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return ece


def retrieval_metrics(image_features, text_features, logit_scale: float = 100.0,
                      labels: Optional[torch.Tensor] = None, ks=(1, 5, 10)) -> Dict[str, float]:
    """R@K both ways, label-level precision@1 (the top hit shares the query's label) and the
    ECE of the top-1 softmax confidence."""
    sims = image_features @ text_features.T  # (N, N)
    out = {}
    truth = torch.arange(sims.shape[0])
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        order = s.argsort(dim=1, descending=True)
        rank = (order == truth[:, None]).float().argmax(dim=1)
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
        top = order[:, 0]
        if labels is not None:
            out[f"{name}_label_precision@1"] = (labels[top] == labels).float().mean().item()
        confidence = (logit_scale * s).softmax(dim=1).max(dim=1).values
        out[f"{name}_ece"] = expected_calibration_error(confidence, top == truth)
    return out


def zero_shot_metrics(image_features, classifier, labels, logit_scale: float = 100.0) -> Dict[str, float]:
    """Zero-shot top-1 accuracy and the ECE of its softmax confidence."""
    probs = (logit_scale * image_features @ classifier.T).softmax(dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = prediction == labels
    return {"zero_shot_accuracy": correct.float().mean().item(),
            "zero_shot_ece": expected_calibration_error(confidence, correct)}


def embedding_arithmetic(query_images, source_texts, target_texts, gallery, target_index,
                         query_index=None, scale: float = 1.0) -> Dict[str, float]:
    """SIMAT-style structure awareness: retrieve the target image with ``x + s (t_target - t_source)``.

    Args:
        query_images: (Q, D) image embeddings; source_texts, target_texts: (Q, D) text embeddings.
        gallery: (G, D) image embeddings to retrieve from; target_index: (Q,) the right gallery row.
        query_index: (Q,) the query's own gallery row, never counted as a hit (as SIMAT does).
    Returns:
        ``arithmetic_R@1`` and ``arithmetic_R@5``.
    """
    queries = F.normalize(query_images + scale * (target_texts - source_texts), dim=-1)
    sims = queries @ F.normalize(gallery, dim=-1).T  # (Q, G)
    if query_index is not None:
        sims[torch.arange(len(queries)), query_index] = -float("inf")
    order = sims.argsort(dim=1, descending=True)
    rank = (order == target_index[:, None]).float().argmax(dim=1)
    return {"arithmetic_R@1": (rank < 1).float().mean().item(), "arithmetic_R@5": (rank < 5).float().mean().item()}


def evaluate_features(image_features, text_features, labels=None, classifier=None, logit_scale=100.0):
    out = dict(embedding_geometry(image_features, text_features))
    out.update(retrieval_metrics(image_features, text_features, logit_scale, labels))
    if classifier is not None and labels is not None:
        out.update(zero_shot_metrics(image_features, classifier, labels, logit_scale))
    return out
