"""Contrastive training of the open_clip embedder on (crop, visual-only text) pairs.

The loss is open_clip's symmetric InfoNCE (image→text and text→image cross-entropy over the batch)
with **false-negative masking**: two items that share a ``negative_key`` (the same category, or the
same category and attribute vector) are never pushed apart -- their off-diagonal logits are masked
out. **Attribute-guided hard negatives** come from the batch sampler: batches are built from runs of
items of one category, so every batch holds same-category items with different attributes (the
negatives that teach attributes) next to other categories.

Everything works on tensors decoded once (``TrainingSet.pixels``: uint8, slightly larger than the
model's input so training can take random crops); the catalog task and the real-photo benchmark
both call ``train_contrastive`` and ``encode_images`` / ``encode_texts``. Pure functions over torch
and open_clip: no database, no storage.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.embeddings import encode_text_to_eot

SMALL_CLIP_ARCH = "catalog-small-clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TRAINABLE = ("all", "last-blocks")


@dataclass(frozen=True)
class ContrastiveConfig:
    epochs: int = 10
    max_seconds: float | None = None  # wall-clock budget; training stops at the first step past it
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    augment: bool = True  # random crop (from the cached margin) + horizontal flip
    run_length: int = 8  # items of one category placed together in a batch (the hard negatives)
    trainable: str = "all"  # "last-blocks": only the last ``last_blocks`` blocks of each tower + projections
    last_blocks: int = 1
    # The 49k-row token table is most of a small model's parameters; the catalog's words are few,
    # so it stays fixed (random or pretrained) and the layers above it learn.
    train_token_embedding: bool = False

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, not {self.trainable!r}")
        if self.batch_size < 2 or self.epochs < 1 or self.run_length < 1:
            raise ValueError("batch_size must be >= 2, epochs and run_length >= 1")


@dataclass
class TrainingSet:
    """Decoded examples: ``pixels`` (n, 3, S, S) uint8 at ``cache_size`` >= the model's input size."""

    pixels: torch.Tensor
    texts: list[str]
    categories: list[str]
    negative_keys: list[str]  # items sharing a key are not negatives of each other

    def __post_init__(self) -> None:
        n = self.pixels.shape[0]
        if not (len(self.texts) == len(self.categories) == len(self.negative_keys) == n):
            raise ValueError("pixels, texts, categories and negative_keys must have the same length")


@dataclass
class TrainingReport:
    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    examples: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    trainable_parameters: int = 0
    stopped_by_budget: bool = False


def small_clip_config(image_size: int = 64, embed_dim: int = 256) -> dict[str, Any]:
    """A small open_clip architecture for training from scratch on a CPU: timm's ResNet-10-T image
    tower (convolutions learn from a few thousand photos far better than a ViT of the same cost) and
    a two-layer text transformer with a short context (catalog texts are under 20 words)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "timm_model_name": "resnet10t", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear"},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    }


def register_small_open_clip(image_size: int = 64, embed_dim: int = 256) -> str:
    """Make the small architecture known to open_clip's factory; returns its name (with the sizes
    when they are not the defaults)."""
    from open_clip import factory

    name = SMALL_CLIP_ARCH if (image_size, embed_dim) == (64, 256) else f"{SMALL_CLIP_ARCH}-{image_size}-{embed_dim}"
    factory._MODEL_CONFIGS.setdefault(name, small_clip_config(image_size, embed_dim))  # noqa: SLF001
    return name


# --- data ------------------------------------------------------------------------------------------


def decode_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) uint8: shortest side resized to ``size``, centre-cropped (open_clip's eval
    transform without the normalisation), so training crops and pipeline crops look alike."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def stack_images(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    return torch.stack([decode_to_tensor(im, size) for im in images]) if images else torch.zeros((0, 3, size, size),
                                                                                                  dtype=torch.uint8)


def normalise(pixels: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN,
              std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    x = pixels.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def centre_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    s = pixels.shape[-1]
    off = (s - size) // 2
    return pixels[..., off:off + size, off:off + size]


def augment_batch(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-item random ``size`` crop from the cached margin and random horizontal flip."""
    n, s = pixels.shape[0], pixels.shape[-1]
    span = s - size + 1
    offsets = torch.randint(0, span, (n, 2), generator=generator).tolist()
    flips = torch.rand(n, generator=generator).lt(0.5).tolist()
    out = torch.empty((n, 3, size, size), dtype=pixels.dtype)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        crop = pixels[i, :, dy:dy + size, dx:dx + size]
        out[i] = crop.flip(-1) if flip else crop
    return out


def category_run_batches(categories: Sequence[str], batch_size: int, run_length: int,
                         rng: random.Random) -> list[list[int]]:
    """One epoch of batches: each category's items shuffled and cut into runs of ``run_length``,
    the runs shuffled and packed into batches. Same-category items (hard negatives when their
    attributes differ) share batches; every item appears exactly once."""
    by_category: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_category.setdefault(c, []).append(i)
    runs: list[list[int]] = []
    for name in sorted(by_category):
        items = by_category[name][:]
        rng.shuffle(items)
        runs.extend(items[i:i + run_length] for i in range(0, len(items), run_length))
    rng.shuffle(runs)
    flat = [i for run in runs for i in run]
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2].extend(batches.pop())
    return batches


# --- loss ------------------------------------------------------------------------------------------


def false_negative_mask(keys: Sequence[str]) -> torch.Tensor:
    """(n, n) bool: True where j is not i but shares i's key (a false negative to mask out)."""
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(k, len(index)) for k in keys])
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    return same & ~torch.eye(len(keys), dtype=torch.bool)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     keys: Sequence[str]) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (item i's image and text are the positive pair), with the
    logits of same-key pairs other than the diagonal masked out. Features must be unit-norm."""
    logits = logit_scale * image_features @ text_features.t()
    mask = false_negative_mask(keys).to(logits.device)
    logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# --- model helpers ---------------------------------------------------------------------------------


def image_size(model: Any) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def set_trainable(model: Any, trainable: str, last_blocks: int = 1, *, token_embedding: bool = False) -> int:
    """Freeze what is not trained; returns the number of trainable parameters."""
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in _last_blocks(model, last_blocks):
            for p in module.parameters():
                p.requires_grad_(True)
        for name, p in model.named_parameters():
            if name in {"logit_scale", "text_projection"} or name.startswith(("visual.proj", "ln_final",
                                                                              "visual.ln_post", "visual.attnpool")):
                p.requires_grad_(True)
    if not token_embedding and hasattr(model, "token_embedding"):
        model.token_embedding.weight.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _last_blocks(model: Any, n: int) -> list[Any]:
    blocks: list[Any] = []
    transformer = getattr(model.visual, "transformer", None)
    if transformer is not None:
        blocks.extend(list(transformer.resblocks)[-n:])
    elif hasattr(model.visual, "layer4"):  # ModifiedResNet
        blocks.append(model.visual.layer4)
    blocks.extend(list(model.transformer.resblocks)[-n:])
    return blocks


def _lr_at(step: int, total: int, config: ContrastiveConfig, elapsed: float) -> float:
    """Linear warm-up, then cosine decay to zero by the last step -- or by the time budget, whichever
    comes first, so a run cut by ``max_seconds`` still ends annealed."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.max_seconds:
        progress = max(progress, elapsed / config.max_seconds)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_contrastive(model: Any, tokenizer: Callable[[list[str]], torch.Tensor], data: TrainingSet,
                      config: ContrastiveConfig = ContrastiveConfig(), *,
                      progress: Callable[[dict[str, Any]], None] | None = None) -> TrainingReport:
    """Train ``model`` (an open_clip ``CLIP``) in place; returns what happened. Deterministic for a
    seed on one machine. ``progress`` gets a dict after every epoch (and at the budget stop)."""
    n = data.pixels.shape[0]
    if n < 2:
        raise ValueError("contrastive training needs at least two examples")
    size = image_size(model)
    if data.pixels.shape[-1] < size:
        raise ValueError(f"cached images are {data.pixels.shape[-1]} px, the model needs {size}")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    unique_texts = sorted(set(data.texts))
    text_index = {t: i for i, t in enumerate(unique_texts)}
    tokens = tokenizer(unique_texts)
    report = TrainingReport(examples=n, trainable_parameters=set_trainable(
        model, config.trainable, config.last_blocks, token_embedding=config.train_token_embedding))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = len(category_run_batches(data.categories, config.batch_size, config.run_length,
                                               random.Random(0)))
    total = steps_per_epoch * config.epochs
    started = time.monotonic()
    model.train()
    try:
        for epoch in range(config.epochs):
            epoch_losses: list[float] = []
            for batch in category_run_batches(data.categories, config.batch_size, config.run_length, rng):
                elapsed = time.monotonic() - started
                if config.max_seconds is not None and elapsed > config.max_seconds:
                    report.stopped_by_budget = True
                    break
                for group in optimiser.param_groups:
                    group["lr"] = _lr_at(report.steps, total, config, elapsed)
                pixels = data.pixels[batch]
                pixels = augment_batch(pixels, size, generator) if config.augment else centre_crop(pixels, size)
                images = normalise(pixels).to(device)
                batch_texts = [text_index[data.texts[i]] for i in batch]
                present = sorted(set(batch_texts))
                where = {t: j for j, t in enumerate(present)}
                text_feats = F.normalize(encode_text_to_eot(model, tokens[present].to(device)), dim=-1)
                text_feats = text_feats[[where[t] for t in batch_texts]]
                image_feats = F.normalize(model.encode_image(images), dim=-1)
                loss = contrastive_loss(image_feats, text_feats, model.logit_scale.exp().clamp(max=100.0),
                                        [data.negative_keys[i] for i in batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                value = float(loss.item())
                report.first_loss = value if report.first_loss is None else report.first_loss
                report.last_loss = value
                report.steps += 1
                epoch_losses.append(value)
            if epoch_losses:
                report.losses.append(sum(epoch_losses) / len(epoch_losses))
                report.epochs = round(report.steps / steps_per_epoch, 3)
            report.seconds = round(time.monotonic() - started, 2)
            if progress is not None and epoch_losses:
                progress({"epoch": epoch + 1, "steps": report.steps, "loss": report.losses[-1] if report.losses
                          else None, "seconds": report.seconds})
            if report.stopped_by_budget:
                break
    finally:
        model.eval()
    report.seconds = round(time.monotonic() - started, 2)
    return report


# --- inference on cached tensors -------------------------------------------------------------------


@torch.inference_mode()
def encode_images(model: Any, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(n, d) float32 unit-norm image vectors of cached uint8 pixels (centre crop, no augmentation)."""
    model.eval()
    size = image_size(model)
    device = next(model.parameters()).device
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = normalise(centre_crop(pixels[start:start + batch_size], size)).to(device)
        out.append(F.normalize(model.encode_image(chunk).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.visual.output_dim), dtype=np.float32)


@torch.inference_mode()
def encode_texts(model: Any, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str]) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    if not texts:
        return np.zeros((0, model.text_projection.shape[-1]), dtype=np.float32)
    feats = encode_text_to_eot(model, tokenizer(list(texts)).to(device)).float()
    return F.normalize(feats, dim=-1).cpu().numpy()


# --- the catalog's embedder: fine-tune a loaded ClipEmbedder, evaluate, save -----------------------


def fine_tune_clip(embedder: Any, crops: Sequence[Image.Image], texts: Sequence[str], categories: Sequence[str],
                   negative_keys: Sequence[str], config: ContrastiveConfig = ContrastiveConfig(), *,
                   margin: int = 8, progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, TrainingReport]:
    """A trained copy of ``embedder`` (a ``models.embeddings.ClipEmbedder``; the base is untouched):
    another ClipEmbedder instance holding the new weights, not yet saved, and the report."""
    import copy

    embedder.load()
    candidate = copy.copy(embedder)
    candidate._model = copy.deepcopy(embedder._model)  # noqa: SLF001 - same package's wrapper
    candidate._identity = None  # noqa: SLF001 - the weights are new: identity comes from where they are saved
    size = image_size(candidate._model)  # noqa: SLF001
    data = TrainingSet(pixels=stack_images(list(crops), size + margin), texts=list(texts),
                       categories=list(categories), negative_keys=list(negative_keys))
    report = train_contrastive(candidate._model, candidate._tokenizer, data, config,  # noqa: SLF001
                               progress=progress)
    return candidate, report


def evaluate_clip(embedder: Any, crops: Sequence[Image.Image], categories: Sequence[str],
                  attributes: Sequence[dict[str, Any]] | None = None,
                  noun: Callable[[str], str] = lambda c: c) -> dict[str, Any]:
    """``models.retrieval_eval.evaluate`` for a ClipEmbedder on held-out crops, through the
    embedder's own preprocessing (what the pipeline and the backfill run)."""
    from models.retrieval_eval import evaluate

    if not crops:
        return {"images": 0}
    vectors = embedder.embed_images(list(crops))
    return evaluate(vectors, categories, lambda t: embedder.embed_texts(list(t)), attributes=attributes, noun=noun)
