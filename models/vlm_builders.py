"""Random-weight builds of the listing VLM's architecture (Idefics3, as in SmolVLM) for offline use.

Nothing can be downloaded here, so tests and benchmarks build the architecture from code:

- ``tiny``: a few-layer Llama text model and SigLIP-style vision tower on 64-pixel images, with a
  byte-level BPE tokenizer trained in-process on a small corpus. Same classes and code paths as the
  pretrained model; fast on CPU.
- ``random-full``: SmolVLM-256M-Instruct's real sizes (hard-coded from its published config), so a
  benchmark does the same compute as the pretrained model. Its tokenizer is the local one, but the
  embedding/LM-head width is the real 49,280, so per-token cost is unchanged.

Output of these models is noise by construction and is always labelled ``random_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.idefics3 import Idefics3ImageProcessor, Idefics3Processor

from models.categories import CATEGORIES
from models.identity import write_provenance
from models.prompting import SYSTEM_INSTRUCTION
from models.tiny import seeded

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<end_of_utterance>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]

# SmolVLM-style turns: "<|im_start|>Role: text<end_of_utterance>\n", the image as "<image>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ ' ' + m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ ' ' + c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>Assistant:{% endif %}"
)

# SmolVLM-256M-Instruct (HuggingFaceTB) main config values; a pretrained load reads the real file.
SMOLVLM_256M = {
    "text": {
        "vocab_size": 49280,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "scale_factor": 4,
    "image_seq_len": 64,  # (512 / 16) ** 2 / 4 ** 2
    "image_size": {"longest_edge": 2048},
    "max_image_size": {"longest_edge": 512},
}

TINY = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    },
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 8,
    },
    "scale_factor": 2,
    "image_seq_len": 16,  # (64 / 8) ** 2 / 2 ** 2
    "image_size": {"longest_edge": 64},
    "max_image_size": {"longest_edge": 64},
}


def _corpus() -> list[str]:
    """Text the tiny tokenizer learns merges from: prompts, schema keys and enum values."""
    lines = [SYSTEM_INSTRUCTION, "User: Assistant: System: Write the listing for the product in the photo."]
    for schema in CATEGORIES.values():
        lines.append(f'{{"title": "A {schema.name}", "description": "A {schema.name} in the photo", ')
        for name, values in schema.visual_attributes.items():
            lines.append(f'"{name}": ' + ", ".join(f'"{v}"' for v in values))
    return lines * 4


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes; xgrammar sees a BYTE_LEVEL vocab) with the VLM's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )


def _processor(tokenizer: PreTrainedTokenizerFast, sizes: dict, *, splitting: bool) -> Idefics3Processor:
    image_processor = Idefics3ImageProcessor(
        size=dict(sizes["image_size"]),
        max_image_size=dict(sizes["max_image_size"]),
        do_image_splitting=splitting,
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=sizes["image_seq_len"],
        chat_template=CHAT_TEMPLATE,
    )


def idefics3_config(tok: PreTrainedTokenizerFast, sizes: dict, vocab_size: int) -> Idefics3Config:
    """An Idefics3 config of the given sizes whose special-token ids match ``tok``."""
    return Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "tie_word_embeddings": False,
            **sizes["text"],
        },
        vision_config=dict(sizes["vision"]),
        scale_factor=sizes["scale_factor"],
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )


def _model(tok: PreTrainedTokenizerFast, sizes: dict, vocab_size: int, seed: int) -> Idefics3ForConditionalGeneration:
    with seeded(seed):
        model = Idefics3ForConditionalGeneration(idefics3_config(tok, sizes, vocab_size))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def build_tiny_vlm(seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The ``tiny`` profile: Idefics3 with random weights and a local processor (CPU-fast)."""
    tokenizer = build_tiny_tokenizer()
    processor = _processor(tokenizer, TINY, splitting=False)
    return _model(processor.tokenizer, TINY, len(processor.tokenizer), seed), processor


def build_random_full_vlm(seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The ``random-full`` profile: SmolVLM-256M's real sizes and image tiling, random weights."""
    tokenizer = build_tiny_tokenizer()
    processor = _processor(tokenizer, SMOLVLM_256M, splitting=True)
    return _model(processor.tokenizer, SMOLVLM_256M, SMOLVLM_256M["text"]["vocab_size"], seed), processor


def save_vlm(
    model: Idefics3ForConditionalGeneration,
    processor: Idefics3Processor,
    directory: Path,
    *,
    random_weights: bool,
    base: str,
    produced_by: str = "models.vlm_builders.save_vlm",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a loadable local directory (config, weights, processor, tokenizer, chat template) and
    its provenance file (``models.identity.write_provenance``).

    ``random_weights`` describes the weights being written, and a fine-tune inherits its base's
    flag: DPO on a tiny random model is still noise, so pass the base version's ``random_weights``
    and its ``canonical`` identity as ``base``. Loading the directory later, with any profile, reports
    that flag rather than guessing from the profile.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    write_provenance(directory, random_weights=random_weights, base=base, produced_by=produced_by, extra=extra)
    return directory
