"""Typed errors of the model layer. Each carries a stable ``code`` from the closed set that
``listing.failed`` publishes (see tasks/errors.py), plus a machine-readable ``reason``."""

from __future__ import annotations


class ModelLayerError(Exception):
    code: str = "model_error"
    retryable: bool = False

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class ImageRejected(ModelLayerError):
    """The bytes are not an image we accept (format, size, frames, corruption)."""

    code = "image_rejected"


class UnsupportedCategory(ModelLayerError):
    code = "unsupported_category"


class ModelError(ModelLayerError):
    """The model failed on otherwise valid input."""

    code = "model_error"


class WeightsMissing(ModelError):
    """Configured weights cannot be found; the message says which setting to change."""


class ModelOutOfMemory(ModelError):
    """The accelerator ran out of memory even at batch size 1."""

    retryable = True
