"""Direct Preference Optimization of the listing VLM, written against the transformers model.

Per pair the policy and a frozen reference score the *completion* tokens (chosen and rejected
listing JSON, each closed by the stop token the decoder ends on) given the same prompt and image;
the loss is ``-log σ(β · ((π_c − ref_c) − (π_r − ref_r)))`` over summed token log-probabilities.
With LoRA (peft) the reference is the same network with its adapters disabled, so no second copy
of the weights is held; the adapters are merged before the model is returned.

TRL's DPOTrainer does the same maths but wants in-memory images and a processor it can call
itself; pairs here carry image *references* resolved by the caller, and the loop is a few lines.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from models.tiny import seeded


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str  # the rendered prompt, image token included
    chosen: str
    rejected: str
    image: Image.Image


@dataclass(frozen=True)
class DpoConfig:
    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: int = 1
    max_steps: int | None = None
    lora_rank: int = 8  # 0: full fine-tuning against a frozen copy
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class DpoReport:
    steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    holdout_loss: float | None = None
    holdout_reward_accuracy: float | None = None  # share of held-out pairs the policy now prefers correctly
    holdout_reward_margin: float | None = None
    trainable_parameters: int = 0


def _nested(processor: Any) -> bool:
    return type(processor).__name__.startswith(("Idefics", "SmolVLM"))


def encode_pair(processor: Any, example: PreferenceExample, device: torch.device,
                dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One batch of two rows (prompt+chosen, prompt+rejected), right-padded; returns the model
    inputs, a mask of completion tokens (aligned with the shifted targets) and the prompt length."""
    tokenizer = processor.tokenizer
    image = example.image.convert("RGB")
    images: Any = [[image], [image]] if _nested(processor) else [image, image]
    enc = processor(text=[example.prompt, example.prompt], images=images, return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    stop = tokenizer.eos_token_id
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] + [stop]
                   for c in (example.chosen, example.rejected)]
    width = len(prompt_ids) + max(len(c) for c in completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    input_ids = torch.full((2, width), pad, dtype=torch.long)
    attention = torch.zeros((2, width), dtype=torch.long)
    completion_mask = torch.zeros((2, width - 1), dtype=torch.bool)
    for row, ids in enumerate(completions):
        end = len(prompt_ids) + len(ids)
        input_ids[row, : len(prompt_ids)] = prompt_ids
        input_ids[row, len(prompt_ids): end] = torch.tensor(ids)
        attention[row, :end] = 1
        completion_mask[row, len(prompt_ids) - 1: end - 1] = True  # logits at t predict token t+1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
    for key, value in enc.items():
        if key not in ("input_ids", "attention_mask"):
            inputs[key] = value
    moved = {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return moved, completion_mask.to(device), len(prompt_ids)


def completion_logps(model: Any, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens: shape (2,) = (chosen, rejected)."""
    logits = model(**inputs).logits[:, :-1].float()
    targets = inputs["input_ids"][:, 1:]
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward margin) from (chosen, rejected) log-probs of the policy and the reference."""
    margin = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    return -F.logsigmoid(margin), margin.detach()


class PreferenceTuner:
    """Runs DPO on a copy of ``model`` (the caller's model is left untouched)."""

    def __init__(self, model: Any, processor: Any, config: DpoConfig = DpoConfig()) -> None:
        self.processor = processor
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        with seeded(config.seed):
            self.policy, self._reference = self._prepare(copy.deepcopy(model))

    def _prepare(self, model: Any) -> tuple[Any, Any]:
        if self.config.lora_rank <= 0:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            return model.train().requires_grad_(True), reference
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(self.config.lora_targets), bias="none")
        return get_peft_model(model, lora).train(), None

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self._reference is not None:
            yield self._reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def _reference_logps(self, encoded: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor, int]]) -> list[torch.Tensor]:
        with torch.no_grad(), self._reference_model() as ref:
            return [completion_logps(ref, inputs, mask) for inputs, mask, _ in encoded]

    def _encode(self, examples: Sequence[PreferenceExample]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, int]]:
        return [encode_pair(self.processor, e, self.device, self.dtype) for e in examples]

    def train(self, train: Sequence[PreferenceExample], holdout: Sequence[PreferenceExample] = ()) -> DpoReport:
        c = self.config
        encoded, held = self._encode(train), self._encode(holdout)
        ref_train, ref_held = self._reference_logps(encoded), self._reference_logps(held)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        report = DpoReport(trainable_parameters=sum(p.numel() for p in params))
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate)
        total = c.max_steps if c.max_steps is not None else c.epochs * len(encoded)
        self.policy.train()
        while report.steps < total and encoded:
            index = report.steps % len(encoded)
            inputs, mask, _ = encoded[index]
            loss, _ = dpo_loss(completion_logps(self.policy, inputs, mask), ref_train[index], c.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            optimizer.step()
            report.train_losses.append(round(float(loss.detach()), 6))
            report.steps += 1
        if held:
            self.policy.eval()
            with torch.no_grad():
                results = [dpo_loss(completion_logps(self.policy, i, m), r, c.beta) for (i, m, _), r in zip(held, ref_held, strict=True)]
            margins = [float(m) for _, m in results]
            report.holdout_loss = round(sum(float(loss) for loss, _ in results) / len(results), 6)
            report.holdout_reward_accuracy = sum(m > 0 for m in margins) / len(margins)
            report.holdout_reward_margin = round(sum(margins) / len(margins), 6)
        if any(math.isnan(x) for x in report.train_losses):
            raise FloatingPointError("DPO loss became NaN; lower the learning rate")
        return report

    def trained_model(self) -> Any:
        """The tuned network as a plain transformers model (LoRA adapters merged), in eval mode."""
        model = self.policy.merge_and_unload() if self._reference is None else self.policy
        return model.eval().requires_grad_(False)
