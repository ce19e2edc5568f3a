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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonschema import Draft202012Validator, ValidationError
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, LogitsProcessorList

from models.config import DEFAULT_CACHE_DIR, mask_fill_threads
from models.base import ModelVersionInfo, ModelWrapper
from models.categories import CategorySchema, ListingPart, part_schema, validate_listing
from models.constrained import (
    LISTING_GRAMMAR,
    SEPARATORS,
    GrammarCache,
    GrammarVocab,
    SchemaLogitsProcessor,
    finish_row,
    forced_fields,
    replay,
    grammar_vocab,
    worst_case_chars,
)
from models.devices import halve_on_oom, select_device
from models.errors import ModelError
from models.identity import ModelIdentity, model_identity
from models.loading import resolve_model_ref, weights_missing
from models.prompting import IMAGE_PLACEHOLDER, ListingPrompt, build_attribute_prompt, build_text_prompt

DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"
# The ceiling of one phase's budget; each phase's own budget is its schema part's worst case
# (``worst_case_chars``: ~990 tokens for the text of every schema, 140-330 for the attributes), so
# by default no ASCII listing can run out.
DEFAULT_MAX_NEW_TOKENS = 1024
GENERATION = "two-phase-v1"  # recorded in model_input: attributes, verification, then text
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
class TextRequest:
    """Phase two for one product: its request, the verified facts (kept visual attribute values,
    the verifier's and the merchant's) and, on a retry, the phrases the text must not contain."""

    request: ListingRequest
    facts: Mapping[str, str]
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class PhaseOutput:
    """One phase's schema-valid JSON and how it was produced.

    ``forced_fields``: the values (dotted paths) that were not finished within the budget and were
    completed under the closing mask: the model's most probable allowed tokens, but not what it
    would have written with room; never to be published as facts."""

    part: str
    output: dict[str, Any]
    raw_text: str
    record: dict[str, Any]  # the exact prompt and decoding of this phase
    tokens: int
    forced_tokens: int = 0
    forced_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class GeneratedListing:
    """A schema-valid listing plus what is needed to reproduce the model input (DPO pairs)."""

    output: dict[str, Any]
    raw_text: str
    model_input: dict[str, Any]
    tokens: int  # output tokens of both phases, completed ones included
    forced_tokens: int = 0  # > 0: a budget ran out and the model finished under the closing mask
    schema_id: str = ""
    random_weights: bool = False
    forced_fields: tuple[str, ...] = ()  # "title", "description", "attributes.<name>"


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
        grammar_threads: int | None = None,
        grammar_overlap: bool | None = None,
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
        self.grammar_threads = mask_fill_threads(int(
            grammar_threads if grammar_threads is not None else _config_value(config, "grammar_threads", 0)))
        self.grammar_overlap = bool(
            grammar_overlap if grammar_overlap is not None else _config_value(config, "grammar_overlap", True))
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
        self._grammars = GrammarCache(self._grammar_vocab(), fill_threads=self.grammar_threads,
                                      overlap=self.grammar_overlap)

    def set_grammar_overlap(self, on: bool) -> None:
        """Switch the grammar look-ahead for later calls, loaded or not (a benchmark's A/B in one
        process; the listings are the same either way)."""
        self.grammar_overlap = on
        if self._grammars is not None:
            self._grammars.filler.overlap = on

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
    #
    # Two phases, each one batched ``generate()`` under its own grammar: the attributes
    # (``describe_attributes``), then, once the caller has verified them, the title and description
    # written from the verified facts (``write_text``). ``predict`` runs both back to back without
    # verification (benchmarks, DPO evaluation); the pipeline (``models.batch``) verifies between.

    def _predict(self, batch: list[ListingRequest], **kwargs: Any) -> list[GeneratedListing]:
        cap = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
        attributes = self.describe_attributes(batch, max_new_tokens=cap)
        texts = self.write_text([TextRequest(r, {k: v for k, v in a.output.items() if isinstance(v, str)})
                                 for r, a in zip(batch, attributes, strict=True)], max_new_tokens=cap)
        random = self.identity().random_weights
        return [combine(r, a, t, self.model_input(r, {"attributes": a, "text": t}), random_weights=random)
                for r, a, t in zip(batch, attributes, texts, strict=True)]

    def describe_attributes(self, batch: list[ListingRequest], *, max_new_tokens: int | None = None) -> list[PhaseOutput]:
        """Phase one: each product's visual attributes, valid under its schema's attribute grammar."""
        self.load()
        prompts = [build_attribute_prompt(r.schema, merchant_title=r.merchant_title,
                                          merchant_description=r.merchant_description,
                                          merchant_attributes=r.merchant_attributes, locale=r.locale) for r in batch]
        return self._phase("attributes", batch, prompts, [()] * len(batch), max_new_tokens)

    def write_text(self, batch: list[TextRequest], *, max_new_tokens: int | None = None) -> list[PhaseOutput]:
        """Phase two: title and description from the verified facts; ``avoid`` phrases are banned
        from decoding (a retry after the truth check, ``models.truth``) and named in the prompt."""
        self.load()
        prompts = [build_text_prompt(t.request.schema, facts=t.facts, merchant_title=t.request.merchant_title,
                                     merchant_description=t.request.merchant_description,
                                     merchant_attributes=t.request.merchant_attributes, locale=t.request.locale,
                                     avoid=t.avoid) for t in batch]
        return self._phase("text", [t.request for t in batch], prompts, [t.avoid for t in batch], max_new_tokens)

    def _phase(self, part: ListingPart, batch: list[ListingRequest], prompts: list[ListingPrompt],
               avoid: list[tuple[str, ...]], max_new_tokens: int | None) -> list[PhaseOutput]:
        if not batch:
            return []
        cap = int(max_new_tokens or self.max_new_tokens)
        return halve_on_oom(lambda a, b: self._generate(part, batch[a:b], prompts[a:b], avoid[a:b], cap), len(batch))

    def _render(self, prompt: ListingPrompt) -> str:
        return self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        nested = type(self.processor).__name__.startswith(("Idefics", "SmolVLM"))
        batch_images: Any = [[im] for im in images] if nested else images
        enc = self.processor(text=texts, images=batch_images, return_tensors="pt", padding=True)
        return {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items()}

    def budget(self, schema: CategorySchema, part: ListingPart, cap: int | None = None) -> int:
        """The token budget of one phase: the schema part's worst case (``worst_case_chars``),
        never above the configured ceiling ``max_new_tokens``."""
        return min(int(cap or self.max_new_tokens), worst_case_chars(part_schema(schema, part)))

    def _ban_ids(self, phrases: Sequence[str]) -> list[list[int]]:
        tokenizer = self.processor.tokenizer
        spellings = {v for p in phrases for v in (p, p.capitalize(), p.upper(), p.replace(" ", "-"))}
        seqs = {tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
                for sp in spellings for text in (sp, f" {sp}")}
        return [list(seq) for seq in seqs if seq]

    def _decode(self, inputs: dict[str, torch.Tensor], matchers: list[Any], bans: list[list[list[int]]],
                max_new: int, closing: bool) -> list[list[int]]:
        grammars = self._grammars
        assert grammars is not None
        processor = SchemaLogitsProcessor(matchers, grammars.vocab, closing=closing, bans=bans,
                                          filler=grammars.filler)
        gen_config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, num_beams=1,
            eos_token_id=list(grammars.vocab.stop_token_ids), pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        try:
            with torch.inference_mode():
                sequences = self.model.generate(**inputs, generation_config=gen_config,
                                                logits_processor=LogitsProcessorList([processor]),
                                                stopping_criteria=processor.stopping_criteria())
        finally:
            processor.settle()
        return sequences[:, inputs["input_ids"].shape[1]:].tolist()

    def _generate(self, part: ListingPart, batch: list[ListingRequest], prompts: list[ListingPrompt],
                  avoid: list[tuple[str, ...]], cap: int) -> list[PhaseOutput]:
        grammars = self._grammars
        assert grammars is not None
        texts = [self._render(p) for p in prompts]
        images = [r.image.convert("RGB") for r in batch]
        budget = max(self.budget(r.schema, part, cap) for r in batch)
        bans = [self._ban_ids(a) if a else [] for a in avoid]
        first = self._decode(self._inputs(texts, images), [grammars.matcher(r.schema, part) for r in batch], bans,
                             budget, closing=False)
        matchers = [grammars.matcher(r.schema, part) for r in batch]
        rows = [(m, replay(m, tokens, grammars.vocab)) for m, tokens in zip(matchers, first, strict=True)]
        open_rows = [i for i, (matcher, _) in enumerate(rows) if not matcher.is_terminated()]
        if open_rows:  # the budget ran out: the model finishes these rows under the closing mask
            inputs = self._inputs([texts[i] for i in open_rows], [images[i] for i in open_rows])
            spent = torch.tensor([rows[i][1] for i in open_rows], device=self.device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], spent], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(spent)], dim=1)
            worst = max(worst_case_chars(part_schema(batch[i].schema, part)) for i in open_rows)
            tails = self._decode(inputs, [rows[i][0] for i in open_rows], [bans[i] for i in open_rows], worst,
                                 closing=True)
            for i, tail in zip(open_rows, tails, strict=True):
                first[i] = rows[i][1] + tail
        return [self._finish(part, r, p, t, tokens, budget)
                for r, p, t, tokens in zip(batch, prompts, texts, first, strict=True)]

    def _finish(self, part: ListingPart, req: ListingRequest, prompt: ListingPrompt, text: str,
                new_tokens: list[int], budget: int) -> PhaseOutput:
        assert self._grammars is not None
        vocab = self._grammars.vocab
        row = finish_row(self._grammars.matcher(req.schema, part), new_tokens, vocab)
        raw = vocab.text(row.token_ids)  # the bytes the grammar counted, not decode()'s tidy-up
        try:
            output = json.loads(raw)
            Draft202012Validator(dict(part_schema(req.schema, part))).validate(output)
        except (ValueError, ValidationError) as exc:  # unreachable unless the grammar and schema disagree
            raise ModelError(f"constrained output failed validation: {exc}") from exc
        within = row.token_ids[:budget]
        forced = max(0, len(row.token_ids) - budget)
        cutoff = sum(len(vocab.token_bytes[t]) for t in within)
        return PhaseOutput(
            part=part, output=output, raw_text=raw, record=self._record(req, prompt, text, budget),
            tokens=len(row.token_ids), forced_tokens=forced,
            forced_fields=forced_fields(raw, cutoff) if forced else (),
        )

    def _record(self, req: ListingRequest, prompt: ListingPrompt, text: str, budget: int) -> dict[str, Any]:
        record = prompt.record()
        for message in record["messages"]:
            for part in message["content"]:
                if part.get("type") == "image":
                    part["image_ref"] = req.image_ref or IMAGE_PLACEHOLDER
        record.update(prompt_text=text, decoding={"strategy": "greedy", "max_new_tokens": budget,
                                                  "grammar": LISTING_GRAMMAR, "separators": list(SEPARATORS)})
        return record

    def model_input(self, req: ListingRequest, phases: Mapping[str, PhaseOutput]) -> dict[str, Any]:
        """What reproduces a listing: each phase's exact prompt, decoding and output, the image
        reference and the model (DPO pairs are built per phase from it)."""
        return {"schema_id": req.schema.schema_id, "locale": phases["attributes"].record["locale"],
                "merchant_data": phases["attributes"].record["merchant_data"],
                "image": {"ref": req.image_ref or IMAGE_PLACEHOLDER, "size": list(req.image.size)},
                "model": self.version().key, "generation": GENERATION,
                "phases": {name: {**p.record, "output": p.output, "raw_text": p.raw_text}
                           for name, p in phases.items()}}


def combine(req: ListingRequest, attributes: PhaseOutput, text: PhaseOutput, model_input: dict[str, Any], *,
            random_weights: bool) -> GeneratedListing:
    """One listing from the two phases: the text's fields, then the attributes, in schema order."""
    output = {**text.output, "attributes": attributes.output}
    try:
        validate_listing(req.schema, output)
    except ValidationError as exc:  # unreachable: each part is valid under its part of the schema
        raise ModelError(f"combined listing failed validation: {exc}") from exc
    raw = f"{text.raw_text[:-1]}{SEPARATORS[0]}{json.dumps('attributes')}{SEPARATORS[1]}{attributes.raw_text}}}"
    forced = (*text.forced_fields, *(f"attributes.{f}" for f in attributes.forced_fields))
    return GeneratedListing(
        output=output, raw_text=raw, model_input=model_input,
        tokens=attributes.tokens + text.tokens, forced_tokens=attributes.forced_tokens + text.forced_tokens,
        schema_id=req.schema.schema_id, random_weights=random_weights, forced_fields=forced,
    )
