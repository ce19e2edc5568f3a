"""Schema-constrained decoding with xgrammar: compiled-grammar cache, a per-row bitmask logits
processor for batched ``generate()``, and deterministic force-completion when the budget runs out.

Why the output is valid by construction: at every step the logits of tokens the category's JSON
Schema grammar cannot accept are set to -inf, so greedy decoding can only pick grammar-legal tokens.
Every schema has bounded strings, enumerated attributes and no recursion, so the grammar's language
is finite. A row that exhausts ``max_new_tokens`` is completed without the model by repeatedly
taking the grammar-allowed token that closes structure soonest (a quote, a brace, …); since every
legal prefix of a finite language has a bounded legal completion, this terminates. Nothing invalid
is ever returned: if a completion cannot be found within a hard cap, ModelError is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from models.categories import CategorySchema
from models.errors import ModelError

# Compact but conventional JSON ("a": 1, "b": 2): no free whitespace, so a model cannot spend its
# budget on spaces, and the text looks like what models saw in training.
SEPARATORS = (", ", ": ")
FORCE_COMPLETION_CAP = 4096

# Lower rank = preferred while force-completing: a quote closes a string (or opens a value); inside
# a string below minLength, or while spelling an enum value, a lower-case letter; structural closers
# only where letters are not allowed (so a description is padded with "a", not with "}").
_PREFERRED = {b'"': 0, b"}": 2, b"]": 3, b",": 4, b":": 5}


@dataclass(frozen=True)
class GrammarVocab:
    """The model's vocabulary as xgrammar sees it, plus the force-completion token ranking."""

    info: xgr.TokenizerInfo
    vocab_size: int  # logits width; may exceed len(tokenizer) (padded embedding matrix)
    stop_token_ids: tuple[int, ...]
    completion_rank: torch.Tensor  # int64 [vocab_size]: rank * vocab_size + token id
    banned: torch.Tensor  # bool [vocab_size]: tokens with raw control bytes (invalid inside JSON strings)
    allow_bits: torch.Tensor  # int32 bitmask row that clears the banned tokens

    def mask(self, bitmask: torch.Tensor) -> None:
        """Apply the static ban on top of a grammar bitmask, in place."""
        bitmask &= self.allow_bits


def _rank(token: bytes) -> int:
    if token in _PREFERRED:
        return _PREFERRED[token]
    if len(token) == 1:
        if 0x61 <= token[0] <= 0x7A:
            return 1
        if token.isalnum() or token == b" ":
            return 11
        return 12
    return 50


def _has_control_byte(token: bytes) -> bool:
    # xgrammar's JSON string rule admits raw U+0000..U+001F, which strict JSON parsers reject; the
    # schemas never need them (no free whitespace, strings can always continue with a letter).
    return any(b < 0x20 for b in token)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Bool [vocab] -> xgrammar's int32 bitmask layout (bit i % 32 of word i // 32)."""
    words = (allowed.numel() + 31) // 32
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[: allowed.numel()] = allowed.to(torch.int64)
    packed = (padded.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def grammar_vocab(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    stop_token_ids: Sequence[int],
    banned_token_ids: Sequence[int] = (),
) -> GrammarVocab:
    """``banned_token_ids``: added/special tokens (image, chat-turn markers) that may spell valid
    characters but must never appear inside a listing; stop tokens are exempt."""
    stops = tuple(dict.fromkeys(int(t) for t in stop_token_ids if t is not None))
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stops))
    decoded = info.decoded_vocab
    ranks = torch.tensor([_rank(decoded[i]) if i < len(decoded) else 99 for i in range(vocab_size)])
    special = set(info.special_token_ids) | set(stops)
    banned = torch.tensor(
        [i < len(decoded) and i not in special and _has_control_byte(decoded[i]) for i in range(vocab_size)]
    )
    extra = [i for i in banned_token_ids if 0 <= i < vocab_size and i not in stops]
    banned[extra] = True
    return GrammarVocab(
        info, vocab_size, stops, ranks * vocab_size + torch.arange(vocab_size), banned, pack_bitmask(~banned)
    )


class GrammarCache:
    """One compiled grammar per schema_id, shared by all rows and calls (compilation is the slow part)."""

    def __init__(self, vocab: GrammarVocab) -> None:
        self.vocab = vocab
        self._compiler = xgr.GrammarCompiler(vocab.info)
        self._compiled: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def get(self, schema: CategorySchema) -> xgr.CompiledGrammar:
        with self._lock:
            if schema.schema_id not in self._compiled:
                self._compiled[schema.schema_id] = self._compiler.compile_json_schema(
                    dict(schema.json_schema), any_whitespace=False, separators=SEPARATORS, strict_mode=True
                )
            return self._compiled[schema.schema_id]

    def matcher(self, schema: CategorySchema) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.get(schema), override_stop_tokens=list(self.vocab.stop_token_ids))


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks each row's logits to the tokens its own grammar matcher allows next.

    One matcher per row (rows may use different category schemas). Single-use: ``generate()`` does
    not call processors after the last step, so a fresh instance is made per call.
    """

    def __init__(self, matchers: list[xgr.GrammarMatcher], vocab: GrammarVocab) -> None:
        self.matchers = matchers
        self.vocab = vocab
        self.vocab_size = vocab.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(matchers), vocab.vocab_size)
        self._prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.matchers):
            raise ModelError(f"batch of {input_ids.shape[0]} rows for {len(self.matchers)} grammar matchers")
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        else:
            for row, matcher in enumerate(self.matchers):
                if not matcher.is_terminated() and not matcher.accept_token(int(input_ids[row, -1])):
                    raise ModelError("decoder produced a token outside the grammar mask")
        for row, matcher in enumerate(self.matchers):
            if matcher.is_terminated():
                self.bitmask[row].fill_(-1)  # finished row: generate() pads it anyway
            else:
                matcher.fill_next_token_bitmask(self.bitmask, row)
        self.vocab.mask(self.bitmask)
        masked = scores if scores.dtype in (torch.float32, torch.float16, torch.bfloat16) else scores.float()
        xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), vocab_size=self.vocab_size)
        return masked if masked is scores else masked.to(scores.dtype)


def allowed_tokens(matcher: xgr.GrammarMatcher, vocab: GrammarVocab) -> torch.Tensor:
    """Bool [vocab_size]: which tokens the matcher accepts next, static ban applied."""
    bitmask = xgr.allocate_token_bitmask(1, vocab.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    vocab.mask(bitmask)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[: vocab.vocab_size].bool()


def force_complete(matcher: xgr.GrammarMatcher, vocab: GrammarVocab) -> list[int]:
    """Deterministically finish a partial output; returns the appended token ids (no stop token)."""
    appended: list[int] = []
    sentinel = torch.iinfo(torch.int64).max
    while not matcher.is_completed():
        if len(appended) >= FORCE_COMPLETION_CAP:
            raise ModelError("constrained decoding could not complete the JSON within the safety cap")
        allowed = allowed_tokens(matcher, vocab)
        allowed[list(vocab.stop_token_ids)] = False
        best = int(torch.where(allowed, vocab.completion_rank, sentinel).argmin())
        if not allowed[best] or not matcher.accept_token(best):
            raise ModelError("grammar allows no continuation of a partial listing")
        appended.append(best)
    return appended


@dataclass(frozen=True)
class ConstrainedRow:
    """One row's accepted output tokens (stop token excluded) and how it ended."""

    token_ids: list[int]
    generated: int  # tokens chosen by the model
    forced: int  # tokens appended by force_complete


def finish_row(matcher: xgr.GrammarMatcher, new_tokens: Sequence[int], vocab: GrammarVocab) -> ConstrainedRow:
    """Replay what ``generate()`` produced into a fresh matcher, then force-complete if needed.

    Replaying double-checks every model token against the grammar and also accepts the final
    token, which generate() sampled without calling the processor again.
    """
    kept: list[int] = []
    stops = set(vocab.stop_token_ids)
    for token in new_tokens:
        if matcher.is_terminated():
            break  # the rest is padding after the stop token
        if not matcher.accept_token(int(token)):
            raise ModelError("generated token rejected by the listing grammar")
        if int(token) not in stops:
            kept.append(int(token))
    forced = [] if matcher.is_terminated() else force_complete(matcher, vocab)
    return ConstrainedRow(kept + forced, generated=len(kept), forced=len(forced))
