"""Zero-shot grounding: find the product named by its category and crop it.

Merchant photos show garments on beds, floors and hangers among other things; CLIP embeddings and
VLM descriptions of the crop are about the product, not the clutter. The detector is any
transformers ``AutoModelForZeroShotObjectDetection`` (OWLv2 by default, Grounding DINO and others by
id); post-processing goes through the processor's own ``post_process_grounded_object_detection`` so
the box format is the library's, not ours. When the best box scores below the threshold the full image
is used and the result says so (``fallback=True``), so downstream stages never depend on a guess.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from models.base import ModelVersionInfo, ModelWrapper
from models.devices import halve_on_oom, inference_context, select_device
from models.identity import ModelIdentity, model_identity
from models.loading import resolve_model_ref, weights_missing
from models.prompts import detection_prompt
from models.tiny import base_owlv2_config, build_owlv2_processor, build_random_owlv2, tiny_owlv2_config

from models.config import DEFAULT_CACHE_DIR, DEFAULT_DETECTOR  # noqa: E402  (re-exported)

from models.boxes import Box, clip_box, padded_crop_box, product_crop  # noqa: E402,F401  (re-exported)


def preprocess_on_device(processor: Any, device: Any) -> dict[str, Any]:
    """Processor keyword arguments that resize and pad on the model's device.

    OWLv2 pads every photo to a square and resizes it to 960 px before the model sees it; done by
    the CPU that costs more than the detector itself on a GPU. The torchvision image-processor
    backend takes a ``device``: the decoded uint8 photo is copied over and resized there. Processors
    without that backend (the PIL one, other detectors) keep preprocessing on the CPU."""
    if getattr(device, "type", str(device)) == "cpu":
        return {}
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # pragma: no cover - older transformers
        return {}
    image_processor = getattr(processor, "image_processor", None)
    return {"device": device} if isinstance(image_processor, TorchvisionBackend) else {}


@dataclass(frozen=True)
class GroundingResult:
    """Where the product is (``box`` in source-image pixels, x0 y0 x1 y1) and the crop to use downstream."""

    box: Box | None
    score: float | None
    fallback: bool
    prompt: str
    crop: Image.Image


class Grounder(ModelWrapper[Image.Image, GroundingResult]):
    """Batched zero-shot detector; one query per product, so a batch mixes categories freely.

    A box is used only when its score is strictly above ``threshold`` (so 1.0 always falls back).
    """

    kind = "detector"

    def __init__(
        self,
        ref: str = DEFAULT_DETECTOR,
        *,
        profile: str = "pretrained",
        device: str = "auto",
        cache_dir: Path = DEFAULT_CACHE_DIR,
        s3_endpoint_url: str | None = None,
        threshold: float = 0.2,
        padding: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.ref, self.profile, self.device_spec = ref, profile, device
        self.cache_dir, self.s3_endpoint_url = Path(cache_dir), s3_endpoint_url
        self.threshold, self.padding, self.seed = threshold, padding, seed
        self._model: Any = None
        self._processor: Any = None
        self._identity: ModelIdentity | None = None
        self._square_targets = False
        self._postprocess_takes_input_ids = False
        self._image_kwargs: dict[str, Any] = {}

    # --- lifecycle ---------------------------------------------------------------------------------

    def _load(self) -> None:
        device = select_device(self.device_spec)
        if self.profile == "tiny":
            model, processor = build_random_owlv2(tiny_owlv2_config(), self.seed)
        elif self.profile == "random-full":
            model, processor = self._random_full()
        else:
            model, processor = self._pretrained()
            self._identity = None  # pinned to what was loaded (the directory may have changed since)
            self.identity()
        self._model = model.to(device).eval()
        self._processor = processor
        self.device = device
        # OWL-ViT/OWLv2 pad to a square at the bottom/right before resizing, so their relative boxes
        # refer to the padded square; scaling by (side, side) maps them back onto the source pixels.
        self._square_targets = model.config.model_type in {"owlv2", "owlvit"}
        post = processor.post_process_grounded_object_detection
        self._postprocess_takes_input_ids = "input_ids" in inspect.signature(post).parameters
        self._image_kwargs = preprocess_on_device(processor, device)

    def _pretrained(self) -> tuple[Any, Any]:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        source = resolve_model_ref(self.ref, cache_dir=self.cache_dir, s3_endpoint_url=self.s3_endpoint_url,
                                   kind=self.kind)
        try:
            processor = AutoProcessor.from_pretrained(source)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(source)
        except OSError as exc:
            raise weights_missing(self.kind, self.ref, str(exc).splitlines()[0]) from exc
        return model, processor

    def _random_full(self) -> tuple[Any, Any]:
        """Real-size architecture with random weights: the config from the ref when one is readable
        locally, else OWLv2-base's (the default), so benchmarks measure production compute offline."""
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

        source = resolve_model_ref(self.ref, cache_dir=self.cache_dir, s3_endpoint_url=self.s3_endpoint_url,
                                   kind=self.kind)
        try:
            config = AutoConfig.from_pretrained(source)
            processor = AutoProcessor.from_pretrained(source)
        except OSError:
            if "owlv2" not in self.ref.lower():
                raise weights_missing(self.kind, self.ref, "random-full needs its config.json locally") from None
            return build_random_owlv2(base_owlv2_config(), self.seed)
        from models.tiny import seeded

        with seeded(self.seed):
            model = AutoModelForZeroShotObjectDetection.from_config(config)
        if processor is None:  # pragma: no cover - defensive; AutoProcessor raises instead
            processor = build_owlv2_processor(config.vision_config.image_size)
        return model, processor

    def identity(self) -> ModelIdentity:
        """The registry identity (``models.identity``), known without loading; once per instance."""
        if self._identity is None:
            self._identity = model_identity(self.kind, self.ref, profile=self.profile, cache_dir=self.cache_dir,
                                            s3_endpoint_url=self.s3_endpoint_url, seed=self.seed)
        return self._identity

    def version(self) -> ModelVersionInfo:
        return self.identity()

    # --- inference ---------------------------------------------------------------------------------

    def predict(self, batch: list[Image.Image], categories: list[str]) -> list[GroundingResult]:  # type: ignore[override]
        """Ground each image with the detector query for its own category."""
        if len(batch) != len(categories):
            raise ValueError(f"{len(batch)} images but {len(categories)} categories")
        return super().predict(batch, categories=categories)

    def _predict(self, batch: list[Image.Image], **kwargs: Any) -> list[GroundingResult]:
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in batch]
        prompts = [detection_prompt(c) for c in kwargs["categories"]]
        best = halve_on_oom(lambda a, b: self._best_boxes(images[a:b], prompts[a:b]), len(images))
        return [self._result(im, prompt, box, score) for im, prompt, (box, score) in zip(images, prompts, best)]

    def _best_boxes(self, images: list[Image.Image], prompts: list[str]) -> list[tuple[Box | None, float | None]]:
        queries = [[p] for p in prompts]
        inputs = self._processor(text=queries, images=images, return_tensors="pt", **self._image_kwargs).to(self.device)
        with inference_context(self.device):
            outputs = self._model(**inputs)
        sizes = [(max(im.size),) * 2 if self._square_targets else (im.height, im.width) for im in images]
        extra = {"input_ids": inputs["input_ids"]} if self._postprocess_takes_input_ids else {}
        detections = self._processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=sizes, text_labels=queries, **extra)
        best: list[tuple[Box | None, float | None]] = []
        for image, det in zip(images, detections):
            scores = det["scores"].float()
            if scores.numel() == 0:
                best.append((None, None))
                continue
            i = int(scores.argmax())
            box = clip_box(tuple(det["boxes"][i].float().tolist()), image.size)  # type: ignore[arg-type]
            best.append((box, float(scores[i])))
        return best

    def _result(self, image: Image.Image, prompt: str, box: Box | None, score: float | None) -> GroundingResult:
        if box is None or score is None or not score > self.threshold:
            return GroundingResult(box=box, score=score, fallback=True, prompt=prompt, crop=image)
        crop = product_crop(image, box, self.padding)
        return GroundingResult(box=box, score=score, fallback=False, prompt=prompt, crop=crop)
