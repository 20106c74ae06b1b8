"""The ``geometry`` evaluation metric: embedding_geometry of the validation set."""

from ..metrics import embedding_geometry


def geometry_metrics(image_features, text_features):
    """Alignment, uniformity (image, text, joint), relative alignment, modality gap and mean
    positive / negative cosine of the validation features (see ``embedding_geometry``)."""
    return embedding_geometry(image_features, text_features)
