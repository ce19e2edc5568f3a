"""CLIP embeddings of product crops and of short visual descriptions (open_clip).

Image and text vectors live in one space, so SQL users can search products by photo or by words, and
the verifier can score attribute values against the image. Vectors are float32 and L2-normalised
(cosine = dot product, what the pgvector HNSW index uses). Every profile emits 512-d vectors: the tiny
architecture keeps ViT-B-32's ``embed_dim`` so tiny runs write into the same index shape.
"""

from __future__ import annotations

from dataclasses import replace

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.base import ModelVersionInfo, ModelWrapper
from models.devices import halve_on_oom, inference_context, select_device
from models.identity import ModelIdentity, model_identity, model_name
from models.loading import is_s3_uri, local_path, looks_like_path, resolve_model_ref, weights_missing
from models.prompts import category_noun
from models.tiny import TINY_CLIP_ARCH, register_tiny_open_clip, seeded

from models.config import DEFAULT_CACHE_DIR, DEFAULT_CLIP  # noqa: E402  (re-exported)


class ClipEmbedder(ModelWrapper[Image.Image, np.ndarray]):
    """open_clip model by ``ARCH/pretrained-tag``, local directory (``open_clip_config.json`` + weights),
    ``hf-hub:org/repo`` or ``s3://`` prefix mirroring such a directory."""

    kind = "clip"

    def __init__(
        self,
        ref: str = DEFAULT_CLIP,
        *,
        profile: str = "pretrained",
        device: str = "auto",
        cache_dir: Path = DEFAULT_CACHE_DIR,
        s3_endpoint_url: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.ref, self.profile, self.device_spec = ref, profile, device
        self.cache_dir, self.s3_endpoint_url, self.seed = Path(cache_dir), s3_endpoint_url, seed
        self._model: Any = None
        self._preprocess: Callable[[Image.Image], torch.Tensor] | None = None
        self._tokenizer: Any = None
        self._name = model_name(self.kind, ref, profile=profile)  # the open_clip arch for random profiles
        self._identity: ModelIdentity | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def _load(self) -> None:
        import open_clip

        device = select_device(self.device_spec)
        if self.profile == "tiny":
            name, pretrained = register_tiny_open_clip(), None
        elif self.profile == "random-full":
            name, pretrained = self._name, None
        else:
            name, pretrained = self._pretrained_source()
        try:
            with seeded(self.seed):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=device, load_weights=self.profile == "pretrained")
        except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
            if self.profile != "pretrained":
                raise
            raise weights_missing(self.kind, self.ref, str(exc).splitlines()[0]) from exc
        if self.profile == "pretrained":
            self._identity = None  # pinned to what was loaded (the directory may have changed since)
            self.identity()
        self._model = model.eval()
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(name)
        self.device = device

    def _pretrained_source(self) -> tuple[str, str | None]:
        """(open_clip model name, pretrained tag) for a pretrained ref, resolving dirs and s3."""
        ref = self.ref.strip()
        if ref.startswith("hf-hub:"):
            return ref, None
        if is_s3_uri(ref) or looks_like_path(ref) or local_path(ref).is_dir():
            directory = Path(resolve_model_ref(ref, cache_dir=self.cache_dir,
                                               s3_endpoint_url=self.s3_endpoint_url, kind=self.kind))
            if not (directory / "open_clip_config.json").is_file():
                raise weights_missing(self.kind, ref, f"{directory} has no open_clip_config.json")
            return f"local-dir:{directory}", None
        arch, _, tag = ref.partition("/")
        if not tag:
            raise weights_missing(self.kind, ref, "expected 'ARCH/pretrained-tag' (e.g. ViT-B-32/laion2b_s34b_b79k)")
        return arch, tag

    def identity(self) -> ModelIdentity:
        """The registry identity (``models.identity``), known without loading; once per instance.

        The backfill registers what this returns and workers register ``ModelBundle.versions()``,
        which returns the same, so one clip model is one registry row."""
        if self._identity is None:
            self._identity = model_identity(self.kind, self.ref, profile=self.profile, cache_dir=self.cache_dir,
                                            s3_endpoint_url=self.s3_endpoint_url, seed=self.seed)
        return self._identity

    def version(self) -> ModelVersionInfo:
        return replace(self.identity(), dims=self.dims)

    @property
    def dims(self) -> int | None:
        """Vector width; known before loading for built-in architectures and config dirs."""
        if self._model is not None:
            out = getattr(self._model.visual, "output_dim", None)
            if out:
                return int(out)
        return _config_embed_dim(self._name, self.ref)

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        self.load()
        assert self._preprocess is not None
        return self._preprocess

    @property
    def logit_scale(self) -> float:
        """The model's learned softmax temperature for image-text logits (~100 pretrained, ~14 random)."""
        self.load()
        return float(self._model.logit_scale.exp().item())

    # --- inference ---------------------------------------------------------------------------------

    def _predict(self, batch: list[Image.Image], **kwargs: Any) -> list[np.ndarray]:
        return list(self.embed_images(batch))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(n, d) float32, unit-norm rows."""
        self.load()
        if not images:
            return np.zeros((0, self.dims or 0), dtype=np.float32)
        pixels = torch.stack([self._preprocess(im.convert("RGB")) for im in images])  # type: ignore[misc]
        chunks = halve_on_oom(lambda a, b: [self._encode(self._model.encode_image, pixels[a:b])], len(images))
        return np.concatenate(chunks)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32, unit-norm rows."""
        self.load()
        if not texts:
            return np.zeros((0, self.dims or 0), dtype=np.float32)
        tokens = self._tokenizer(list(texts))
        encode = lambda t: encode_text_to_eot(self._model, t)  # noqa: E731
        chunks = halve_on_oom(lambda a, b: [self._encode(encode, tokens[a:b])], len(texts))
        return np.concatenate(chunks)

    def _encode(self, encoder: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> np.ndarray:
        with inference_context(self.device):
            features = encoder(inputs.to(self.device))
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype(np.float32, copy=False)


def encode_text_to_eot(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed only up to the batch's last end-of-text token.

    open_clip pads every text to 77 tokens, but a CLIP text tower with a causal mask that pools the
    end-of-text token (argmax pooling) never lets a later position influence it: the padding is pure
    cost, about three quarters of it for the 10-20 word descriptions embedded here. For such a model
    the same layers run on the trimmed batch (position embeddings and mask cut to its length); any
    other text tower (no causal mask, another pooling, a ``CustomTextCLIP``) gets ``encode_text`` as
    is. tests/models/test_embeddings.py checks the two agree."""
    import open_clip

    mask = getattr(model, "attn_mask", None)
    if (type(model) is not open_clip.CLIP or getattr(model, "text_pool_type", None) != "argmax" or mask is None
            or getattr(model, "cls_emb", None) is not None):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    if length >= tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=mask[:length, :length]))
    x = open_clip.transformer.text_global_pool(x, tokens, "argmax")
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def _config_embed_dim(name: str, ref: str) -> int | None:
    import open_clip

    if name == TINY_CLIP_ARCH:
        register_tiny_open_clip()
    cfg = open_clip.get_model_config(name.partition("/")[0])
    if cfg:
        return int(cfg["embed_dim"])
    config_file = local_path(ref) / "open_clip_config.json"
    if config_file.is_file():
        return int(json.loads(config_file.read_text())["model_cfg"]["embed_dim"])
    return None


# --- visual-only text for the text embedding (the VL-CLIP idea) ------------------------------------

_ADJECTIVE_ATTRIBUTES = ("color", "colour", "primary_color", "pattern")
_UNINFORMATIVE = {"", "unknown", "other", "none", "n/a", "solid"}
_MIN_WORDS, _MAX_WORDS = 10, 20
_FILLER = "clothing item for sale in an online marketplace"


def visual_description(category: str, attributes: dict[str, str]) -> str:
    """A 10–20 word description of what the product looks like, from verified visual attributes only.

    Merchant titles mix brand, size and marketing words that CLIP cannot see; embedding only visual
    facts keeps text vectors comparable with image vectors. Deterministic: same inputs, same string.
    """
    values = {k: str(v).strip().lower().replace("_", " ") for k, v in attributes.items() if v is not None}
    adjectives = [values[k] for k in _ADJECTIVE_ATTRIBUTES if values.get(k, "") not in _UNINFORMATIVE]
    details = [f"{v} {k.replace('_', ' ')}" for k, v in sorted(values.items())
               if k not in _ADJECTIVE_ATTRIBUTES and v not in _UNINFORMATIVE]
    head = " ".join(["a catalog photo of a", *adjectives, category_noun(category)])
    while True:
        text = head + (" with " + _join(details) if details else "")
        if len(text.split()) <= _MAX_WORDS or not details:
            break
        details.pop()
    if len(text.split()) < _MIN_WORDS:
        text += ", a " + _FILLER
    return " ".join(text.split()[:_MAX_WORDS])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def save_clip(embedder: ClipEmbedder, directory: Path, *, random_weights: bool, base: str,
              produced_by: str = "models.embeddings.save_clip") -> Path:
    """Write a loaded open_clip model as a local directory that ``ClipEmbedder`` loads back with the
    pretrained profile (``open_clip_config.json`` with its ``model_cfg``, the state dict), plus its
    provenance file. A fine-tune (or a tiny model saved for a blue/green rehearsal) passes its
    base's ``random_weights`` and canonical identity."""
    import open_clip

    from models.identity import write_provenance

    embedder.load()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = TINY_CLIP_ARCH if embedder.profile == "tiny" else embedder._name  # noqa: SLF001
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:  # itself loaded from a directory: its own config
        model_cfg = json.loads((local_path(embedder.ref) / "open_clip_config.json").read_text())["model_cfg"]
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    torch.save(embedder._model.state_dict(), directory / "open_clip_pytorch_model.bin")  # noqa: SLF001
    write_provenance(directory, random_weights=random_weights, base=base, produced_by=produced_by)
    return directory
