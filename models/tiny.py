"""Small random-weight builds of the production architectures, and tokenizers made without a hub.

The ``tiny`` profile runs the same classes and code paths as production (OWLv2 through
``AutoModelForZeroShotObjectDetection``, open_clip's ``CLIP``) with a few layers of width 32–64, so
tests and offline smoke runs exercise real pre/post-processing in seconds. Nothing here downloads:
the CLIP BPE tokenizer is rebuilt from the vocabulary file that open_clip ships inside its package.

Random weights produce arbitrary boxes, embeddings and text; every version built here says
``random_weights=True``.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch

TINY_CLIP_ARCH = "catalog-tiny-clip"
TINY_CLIP_IMAGE_SIZE = 64
# Same width as ViT-B-32's output so tiny vectors go into the same 512-d pgvector/HNSW index.
CLIP_EMBED_DIM = 512
TINY_OWLV2_IMAGE_SIZE = 128
OWLV2_BASE_IMAGE_SIZE = 960  # google/owlv2-base-patch16-ensemble
CLIP_CONTEXT_LENGTH = 16  # OWL text queries are short; 16 is OWLv2's own max_position_embeddings


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic random init without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_revision(seed: int) -> str:
    return f"random-seed{seed}"


# --- CLIP BPE tokenizer (shared by OWLv2's processor and anything else CLIP-tokenized) ------------


@lru_cache(maxsize=1)
def _clip_bpe_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's 49,408-token byte-level BPE vocabulary and merge list, from open_clip's bundled file.

    The layout (256 byte symbols, their end-of-word forms, one token per merge, then the two special
    tokens) is CLIP's published scheme, so ids match the pretrained CLIP/OWL text embeddings.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    n_merges = 49408 - 2 * 256 - 2
    merges = tuple(tuple(line.split()) for line in lines[1 : n_merges + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(model_max_length: int = CLIP_CONTEXT_LENGTH) -> Any:
    """A transformers ``CLIPTokenizer`` identical in ids to the hub's, built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


# --- OWLv2 --------------------------------------------------------------------------------------


def tiny_owlv2_config() -> Any:
    from transformers import Owlv2Config

    return Owlv2Config(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": CLIP_CONTEXT_LENGTH},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": TINY_OWLV2_IMAGE_SIZE, "patch_size": 16},
        projection_dim=32,
    )


def base_owlv2_config() -> Any:
    """The architecture of google/owlv2-base-patch16-ensemble (ViT-B/16 at 960 px), for random-full runs."""
    from transformers import Owlv2Config

    return Owlv2Config(vision_config={"image_size": OWLV2_BASE_IMAGE_SIZE, "patch_size": 16})


def build_owlv2_processor(image_size: int) -> Any:
    """OWLv2's processor (pad-to-square image processor + CLIP tokenizer) without touching a hub."""
    from transformers import Owlv2ImageProcessor, Owlv2Processor

    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    return Owlv2Processor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


def build_random_owlv2(config: Any, seed: int) -> tuple[Any, Any]:
    """(model, processor) for an OWLv2 config with random weights."""
    from transformers import AutoModelForZeroShotObjectDetection

    with seeded(seed):
        model = AutoModelForZeroShotObjectDetection.from_config(config)
    return model, build_owlv2_processor(config.vision_config.image_size)


# --- open_clip ----------------------------------------------------------------------------------


def tiny_open_clip_config() -> dict[str, Any]:
    return {
        "embed_dim": CLIP_EMBED_DIM,
        "vision_cfg": {"image_size": TINY_CLIP_IMAGE_SIZE, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def register_tiny_open_clip() -> str:
    """Make the tiny architecture known to open_clip's factory (idempotent); returns its name."""
    from open_clip import factory

    # open_clip's public add_model_config only reads files; the registry dict is the in-memory door.
    factory._MODEL_CONFIGS.setdefault(TINY_CLIP_ARCH, tiny_open_clip_config())  # noqa: SLF001
    return TINY_CLIP_ARCH
