"""The closed set of error codes ``listing.failed`` publishes, and the errors the pipeline raises.

Permanent errors fail the job at once; transient ones are retried with backoff and jitter, and
fail with their code (``retryable: true``) when the retries run out.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    invalid_event = "invalid_event"  # the event does not match its JSON Schema (or is not JSON)
    stale_version = "stale_version"  # an older product version than the one already stored
    url_not_allowed = "url_not_allowed"  # scheme, host, address, bucket or key refused by policy
    image_fetch_failed = "image_fetch_failed"  # network/S3/HTTP error fetching an image
    image_rejected = "image_rejected"  # not an acceptable image: format, size, frames, corrupt
    unsupported_category = "unsupported_category"  # no schema for the category (when configured to reject)
    model_error = "model_error"  # a model failed on valid input
    model_out_of_memory = "model_out_of_memory"  # accelerator OOM even at batch size 1
    worker_lost = "worker_lost"  # the task killed its worker on every delivery (poison), dead-lettered
    internal_error = "internal_error"  # an unexpected bug; details in the logs under the event id


class PipelineError(Exception):
    """A failure with a documented code. ``retryable`` tells the caller whether trying later may help."""

    def __init__(self, code: ErrorCode, detail: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.retryable = retryable


class TransientError(PipelineError):
    """Worth retrying (network, S3, database hiccup): retried with backoff, then failed with ``code``."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(code, detail, retryable=True)
