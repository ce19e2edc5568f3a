"""Listing generation: a vision-language model writes title, description and visual attributes for
one product photo, decoded under the category's JSON Schema so every output is schema-valid.

Default model: ``HuggingFaceTB/SmolVLM-256M-Instruct``. It is the smallest instruction-tuned VLM
in transformers' ``AutoModelForImageTextToText`` family (Idefics3 architecture: SigLIP vision tower,
pixel-shuffle connector, SmolLM2 text model), fast enough for CPU workers and cheap on a GPU, and
its 64-token image tiles keep prompts short. Larger models (e.g. ``Qwen/Qwen2-VL-2B-Instruct``) are
selected by id, local directory or s3:// URI; the prompt goes through each processor's own chat
template, and decoding constraints work with any tokenizer xgrammar can read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonschema import ValidationError
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, LogitsProcessorList

from models.config import DEFAULT_CACHE_DIR
from models.base import ModelVersionInfo, ModelWrapper
from models.categories import CategorySchema, validate_listing
from models.constrained import (
    LISTING_GRAMMAR,
    SEPARATORS,
    GrammarCache,
    GrammarVocab,
    SchemaLogitsProcessor,
    finish_row,
    grammar_vocab,
)
from models.devices import halve_on_oom, select_device
from models.errors import ModelError
from models.identity import ModelIdentity, model_identity
from models.loading import resolve_model_ref, weights_missing
from models.prompting import IMAGE_PLACEHOLDER, ListingPrompt, build_listing_prompt

DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEFAULT_MAX_NEW_TOKENS = 512  # > longest schema-valid listing (80 + 400 chars + attributes) at ~3 chars/token
PROFILES = ("pretrained", "random-full", "tiny")


@dataclass(frozen=True)
class ListingRequest:
    """One product to describe. ``image`` is the grounded crop (or the full photo on fallback)."""

    image: Image.Image
    schema: CategorySchema
    merchant_title: str = ""
    merchant_description: str = ""
    merchant_attributes: Mapping[str, Any] = field(default_factory=dict)
    locale: str = "en"
    image_ref: str | None = None  # e.g. the crop's sha256; recorded in model_input instead of pixels


@dataclass(frozen=True)
class GeneratedListing:
    """A schema-valid listing plus what is needed to reproduce the model input (DPO pairs)."""

    output: dict[str, Any]
    raw_text: str
    model_input: dict[str, Any]
    tokens: int  # output tokens, force-completed ones included
    forced_tokens: int = 0  # > 0: the budget ran out and the JSON was closed without the model
    schema_id: str = ""
    random_weights: bool = False


def _config_value(config: Any, name: str, default: Any) -> Any:
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


class ListingGenerator(ModelWrapper[ListingRequest, GeneratedListing]):
    """Batched, grammar-constrained listing VLM. Loads once (lock-protected) on first predict()."""

    def __init__(
        self,
        config: Any = None,
        *,
        profile: str | None = None,
        device: str | None = None,
        vlm: str | None = None,
        cache_dir: Path | str | None = None,
        s3_endpoint_url: str | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``config`` is a ``models.factory.ModelConfig`` (or anything with its fields); keywords override."""
        super().__init__()
        self.profile = profile or _config_value(config, "profile", "pretrained")
        self.profile = getattr(self.profile, "value", self.profile)  # StrEnum or str
        if self.profile not in PROFILES:
            raise ValueError(f"unknown VLM profile {self.profile!r}; expected one of {PROFILES}")
        self.device = select_device(str(device or _config_value(config, "device", "auto")))
        self.ref = vlm or _config_value(config, "vlm", DEFAULT_VLM)
        cache = cache_dir or _config_value(config, "cache_dir", None)
        self.cache_dir = Path(cache) if cache else None
        self.s3_endpoint_url = s3_endpoint_url or _config_value(config, "s3_endpoint_url", None)
        self.max_new_tokens = int(max_new_tokens or _config_value(config, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.seed = int(seed if seed is not None else _config_value(config, "seed", 0))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model: Any = None
        self.processor: Any = None
        self._grammars: GrammarCache | None = None
        self._identity: ModelIdentity | None = None

    # ---- loading -------------------------------------------------------------------------------

    def _load(self) -> None:
        if self.profile == "pretrained":
            model, processor = self._load_pretrained()
            self._identity = None  # pinned to what was loaded (the directory may have changed since)
            self.identity()
        else:
            from models.vlm_builders import build_random_full_vlm, build_tiny_vlm

            build = build_tiny_vlm if self.profile == "tiny" else build_random_full_vlm
            model, processor = build(seed=self.seed)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # generation appends on the right; prompts must end aligned
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._grammars = GrammarCache(self._grammar_vocab())

    def _load_pretrained(self) -> tuple[Any, Any]:
        # A hub id passes through unchanged; s3:// is mirrored to the cache; a missing path raises.
        ref = resolve_model_ref(self.ref, cache_dir=self.cache_dir or DEFAULT_CACHE_DIR,
                                s3_endpoint_url=self.s3_endpoint_url, kind="vlm")
        try:
            processor = AutoProcessor.from_pretrained(ref)
            model = AutoModelForImageTextToText.from_pretrained(ref, dtype=self.dtype)
        except OSError as exc:  # offline hub / incomplete directory
            raise weights_missing("vlm", self.ref, str(exc).splitlines()[0]) from exc
        return model, processor

    def _stop_token_ids(self) -> list[int]:
        tokenizer = self.processor.tokenizer
        ids: list[int] = []
        eos = self.model.generation_config.eos_token_id
        ids += eos if isinstance(eos, list) else [eos]
        ids.append(tokenizer.eos_token_id)
        eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        if isinstance(eou, int) and eou != tokenizer.unk_token_id:
            ids.append(eou)
        return [i for i in dict.fromkeys(ids) if i is not None]

    def _grammar_vocab(self) -> GrammarVocab:
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        tokenizer = self.processor.tokenizer
        added = [*tokenizer.all_special_ids, *getattr(tokenizer, "added_tokens_decoder", {}).keys()]
        return grammar_vocab(tokenizer, vocab_size, self._stop_token_ids(), banned_token_ids=added)

    def identity(self) -> ModelIdentity:
        """The registry identity (``models.identity``), known without loading; once per instance.

        ``random_weights`` follows the weights: a directory saved from a random model says so in its
        provenance file even when loaded with the pretrained profile."""
        if self._identity is None:
            self._identity = model_identity("vlm", self.ref, profile=self.profile, cache_dir=self.cache_dir,
                                            s3_endpoint_url=self.s3_endpoint_url, seed=self.seed)
        return self._identity

    def version(self) -> ModelVersionInfo:
        return self.identity()

    # ---- inference -----------------------------------------------------------------------------

    def _predict(self, batch: list[ListingRequest], **kwargs: Any) -> list[GeneratedListing]:
        max_new = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
        return halve_on_oom(lambda start, stop: self._generate(batch[start:stop], max_new), len(batch))

    def _render(self, prompt: ListingPrompt) -> str:
        return self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        nested = type(self.processor).__name__.startswith(("Idefics", "SmolVLM"))
        batch_images: Any = [[im] for im in images] if nested else images
        enc = self.processor(text=texts, images=batch_images, return_tensors="pt", padding=True)
        return {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items()}

    def _generate(self, batch: list[ListingRequest], max_new: int) -> list[GeneratedListing]:
        assert self._grammars is not None
        prompts = [
            build_listing_prompt(r.schema, merchant_title=r.merchant_title, merchant_description=r.merchant_description,
                                 merchant_attributes=r.merchant_attributes, locale=r.locale)
            for r in batch
        ]
        texts = [self._render(p) for p in prompts]
        inputs = self._inputs(texts, [r.image.convert("RGB") for r in batch])
        vocab = self._grammars.vocab
        processor = SchemaLogitsProcessor([self._grammars.matcher(r.schema) for r in batch], vocab)
        gen_config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, num_beams=1,
            eos_token_id=list(vocab.stop_token_ids), pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, generation_config=gen_config,
                                            logits_processor=LogitsProcessorList([processor]))
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._finish(req, prompt, text, row, max_new)
                for req, prompt, text, row in zip(batch, prompts, texts, new_tokens, strict=True)]

    def _finish(self, req: ListingRequest, prompt: ListingPrompt, text: str, new_tokens: list[int],
                max_new: int) -> GeneratedListing:
        assert self._grammars is not None
        row = finish_row(self._grammars.matcher(req.schema), new_tokens, self._grammars.vocab)
        raw = self._grammars.vocab.text(row.token_ids)  # the bytes the grammar counted, not decode()'s tidy-up
        try:
            output = json.loads(raw)
            validate_listing(req.schema, output)
        except (ValueError, ValidationError) as exc:  # unreachable unless the grammar and schema disagree
            raise ModelError(f"constrained output failed validation: {exc}") from exc
        return GeneratedListing(
            output=output,
            raw_text=raw,
            model_input=self._model_input(req, prompt, text, max_new),
            tokens=len(row.token_ids),
            forced_tokens=row.forced,
            schema_id=req.schema.schema_id,
            random_weights=self.identity().random_weights,
        )

    def _model_input(self, req: ListingRequest, prompt: ListingPrompt, text: str, max_new: int) -> dict[str, Any]:
        record = prompt.record()
        for message in record["messages"]:
            for part in message["content"]:
                if part.get("type") == "image":
                    part["image_ref"] = req.image_ref or IMAGE_PLACEHOLDER
        record.update(
            prompt_text=text,
            image={"ref": req.image_ref or IMAGE_PLACEHOLDER, "size": list(req.image.size)},
            model=self.version().key,
            decoding={"strategy": "greedy", "max_new_tokens": max_new, "grammar": LISTING_GRAMMAR,
                      "separators": list(SEPARATORS)},
        )
        return record
