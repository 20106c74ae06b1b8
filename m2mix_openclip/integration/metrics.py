"""The ``geometry`` evaluation metric: embedding_geometry of the validation set."""

import logging
import math

import torch

from ..metrics import embedding_geometry

# embedding_geometry's keys, in its order
GEOMETRY_KEYS = ("alignment", "uniformity_image", "uniformity_text", "uniformity_joint", "relative_alignment",
                 "modality_gap", "positive_cosine", "negative_cosine")


def geometry_metrics(image_features, text_features):
    """Alignment, uniformity (image, text, joint), relative alignment, modality gap and mean
    positive / negative cosine of the validation features (see ``embedding_geometry``).

    Features that hold NaN or Inf (a diverged model, kept training with ``--on-nonfinite
    continue``) give NaN for every key, with a warning, so that the evaluation reports them
    instead of ending the run."""
    if not bool(torch.isfinite(image_features).all() & torch.isfinite(text_features).all()):
        logging.warning("geometry: the validation features hold NaN or Inf (has the model diverged?); the geometry "
                        "metrics are reported as NaN")
        return dict.fromkeys(GEOMETRY_KEYS, math.nan)
    return embedding_geometry(image_features, text_features)
