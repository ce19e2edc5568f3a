"""Device and precision choice for every model stage.

Kept in one place so that the grounder, the CLIP embedder and the VLM agree on what "auto" means and
on the autocast dtype, and so that a misconfigured worker fails at load with a message instead of
silently falling back to CPU (a GPU worker running on CPU looks healthy but is ~50x slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from models.errors import ModelError, ModelOutOfMemory
from models.oom import halve_on_oom as halve

T = TypeVar("T")


def select_device(spec: str = "auto") -> torch.device:
    """Turn the ``ENRICH_MODELS__DEVICE`` value (auto, cpu, cuda, cuda:N) into a ``torch.device``.

    ``auto`` prefers ``cuda:0`` when CUDA is usable; an explicit CUDA request on a machine without
    one is an error rather than a silent CPU fallback.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {spec!r} requested but CUDA is not available in this process "
                f"(torch {torch.__version__}); set ENRICH_MODELS__DEVICE=cpu or auto",
                reason="cuda_unavailable",
            )
        index = 0 if spec == "cuda" else _cuda_index(spec)
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible",
                reason="cuda_index_out_of_range",
            )
        return torch.device("cuda", index)
    raise ModelError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N", reason="bad_device")


def _cuda_index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise ModelError(f"bad CUDA device {spec!r}: expected cuda:N", reason="bad_device") from None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Reduced precision for CUDA inference (bf16 where the GPU supports it, else fp16); None on CPU.

    CPU stays fp32: CPU autocast to bf16 is slower than fp32 on most x86 parts and changes outputs.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """``torch.inference_mode()`` plus CUDA autocast when on a GPU: the one way every stage runs a model."""
    dtype = autocast_dtype(device)
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type="cuda", dtype=dtype):
                yield


def halve_on_oom(run: Callable[[int, int], list[T]], n: int) -> list[T]:
    """Run ``run(start, stop)`` over ``[0, n)``; on CUDA OOM split the slice in two and retry.

    A micro-batch that fits most of the time should not fail a whole batch of products because one
    batch had unusually large images; only a single item that still does not fit is an error. The
    splitting rule is ``models.oom.halve_on_oom``, shared with the pipeline's batch function.
    """
    def at_one(exc: BaseException) -> BaseException:
        return ModelOutOfMemory("CUDA out of memory at batch size 1", reason="cuda_oom")

    return halve(run, n, on_oom=torch.cuda.empty_cache, at_one=at_one)
