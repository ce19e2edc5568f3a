"""Schema-constrained decoding with xgrammar: the listing grammar built from a category's JSON
Schema (whole, or one generation phase's part of it), a compiled-grammar cache, a per-row bitmask
logits processor for batched ``generate()``, and the completion of an output whose budget ran out.

Why the output is valid by construction: at every step the logits of tokens the category's grammar
cannot accept are set to -inf, so greedy decoding can only pick grammar-legal tokens.
Every schema has bounded strings, enumerated attributes and no recursion, so the grammar's language
is finite. A row that exhausts its budget is finished by the model itself under a closing mask
(``SchemaLogitsProcessor(closing=True)``: strings end as soon as they may, optional properties are
skipped, enum values are the model's most probable allowed ones), and the values finished that way
are reported (``forced_fields``) so that no consumer takes them for facts. Only if that still
leaves the output open (a cap on the completion's length) is it finished without the model, by
``force_complete``: the grammar-allowed token that closes structure soonest (a quote, a brace, …);
since every legal prefix of a finite language has a bounded legal completion, this terminates.
Nothing invalid is ever returned: if no completion is found within a hard cap, ModelError is raised.

Why the grammar is built here (``listing_ebnf``) and not by xgrammar's JSON Schema converter:
a listing's strings are narrower than JSON's. xgrammar's unbounded string rule admits every escape,
``\\u0000`` and lone surrogates among them (valid JSON that PostgreSQL's JSONB refuses, so persist
failed), and its bounded one admits the UTF-8 spelling of a surrogate (``ED A0 80``): one character
to the grammar, three U+FFFD after decoding, so the length bounds disagreed with ``json.loads``.
Here one rule, ``listing_char`` (see ``STRING_ESCAPES``), is the character of every string, and
``minLength``/``maxLength`` count it (``_Rules.string``), so the grammar counts characters as
``json.loads`` does; ``GrammarVocab.text`` decodes exactly the bytes the grammar matched.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xgrammar as xgr
from transformers import LogitsProcessor, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from models.categories import CategorySchema, ListingPart, part_schema
from models.errors import ModelError

# Compact but conventional JSON ("a": 1, "b": 2): no free whitespace, so a model cannot spend its
# budget on spaces, and the text looks like what models saw in training.
SEPARATORS = (", ", ": ")
FORCE_COMPLETION_CAP = 4096

# What a listing string may contain, as JSON text. Characters: anything but the quote, the
# backslash, control characters (C0 U+0000-U+001F, DEL, C1 U+0080-U+009F) and surrogate code points
# (U+D800-U+DFFF: the grammar would otherwise take their UTF-8 spelling ED A0 80 as one character).
# Escapes: only \" \\ and \/ (a quote, a backslash, a slash). No four-hex-digit \u escape at all:
# the tokenizer can spell any other character directly, and \u0000 or a lone surrogate is valid JSON that JSONB
# refuses; no \b \f \n \r \t: titles and descriptions are single-line text without control
# characters. Each escape is one character, as json.loads and the schema's length bounds count it.
STRING_ESCAPES = ('\\"', "\\\\", "\\/")
FORBIDDEN_CHARACTERS = "U+0000-U+001F, U+007F-U+009F, U+D800-U+DFFF"
# Recorded in model_input (v1: xgrammar's own JSON Schema rules). It names the language, not its
# spelling: the chained string bounds (``_Rules.string``) accept exactly what v2 accepted.
LISTING_GRAMMAR = "xgrammar.ebnf:listing-v2"
_CHAR_RULE = r'listing_char ::= [^"\\\0-\x1f\x7f-\x9f\uD800-\uDFFF] | "\\" ["\\/]'
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "examples"})

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
    token_bytes: tuple[bytes, ...]  # each token's bytes as the grammar matches them
    quote_ids: tuple[int, ...] = ()  # tokens that are exactly '"' (closing completion)
    brace_ids: tuple[int, ...] = ()  # tokens that are exactly '}'
    letter_ids: tuple[int, ...] = ()  # tokens that are exactly 'a': allowed only inside a string

    def mask(self, bitmask: torch.Tensor) -> None:
        """Apply the static ban on top of a grammar bitmask, in place."""
        bitmask &= self.allow_bits

    def text(self, token_ids: Sequence[int]) -> str:
        """The text of grammar-accepted tokens, from the bytes the grammar matched (strict UTF-8).

        Not ``tokenizer.decode``: that may replace bytes (U+FFFD) or tidy spaces, and then the text
        ``json.loads`` reads is not the text whose characters the grammar counted."""
        try:
            return b"".join(self.token_bytes[t] for t in token_ids).decode("utf-8")
        except (IndexError, UnicodeDecodeError) as exc:
            raise ModelError(f"grammar-accepted tokens are not UTF-8 text: {exc}") from exc


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
    # listing_char refuses raw U+0000..U+001F itself; the static ban is a second line that needs no
    # grammar (no free whitespace anywhere, and strings can always continue with a letter).
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
        info, vocab_size, stops, ranks * vocab_size + torch.arange(vocab_size), banned, pack_bitmask(~banned),
        tuple(decoded), *(tuple(i for i, tok in enumerate(decoded[:vocab_size]) if tok == want and not banned[i])
                          for want in (b'"', b"}", b"a")),
    )


def _forbidden(text: str) -> bool:
    return any(c < "\x20" or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in text)


def _literal(value: str, where: str) -> str:
    """An EBNF literal of ``value``'s JSON text (a key or an enum value), within the escape policy."""
    if _forbidden(value):
        raise ValueError(f"{where}: {value!r} has a character listings may not contain ({FORBIDDEN_CHARACTERS})")
    return json.dumps(json.dumps(value, ensure_ascii=False), ensure_ascii=False)


def _keys(node: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(node) - allowed - _ANNOTATIONS
    if unknown:
        raise ValueError(f"{where}: listing grammars do not support {sorted(unknown)}")


StringEncoding = Literal["chain", "repetition"]


class _Rules:
    def __init__(self, strings: StringEncoding = "chain") -> None:
        self.lines: list[str] = []
        self.strings = strings

    def add(self, name: str, body: str) -> str:
        self.lines.append(f"{name} ::= {body}")
        return name

    def value(self, node: Mapping[str, Any], name: str, where: str) -> str:
        if "enum" in node:
            _keys(node, {"type", "enum"}, where)
            if node.get("type", "string") != "string" or not node["enum"] or not all(
                    isinstance(v, str) for v in node["enum"]):
                raise ValueError(f"{where}: an enum must be a non-empty list of strings")
            return self.add(name, " | ".join(_literal(v, where) for v in node["enum"]))
        kind = node.get("type")
        if kind == "string":
            _keys(node, {"type", "minLength", "maxLength"}, where)
            low, high = int(node.get("minLength", 0)), node.get("maxLength")
            if high is None or low > int(high):
                raise ValueError(f"{where}: a listing string needs maxLength >= minLength (the language is finite)")
            return self.string(name, low, int(high))
        if kind == "object":
            return self.object(node, name, where)
        raise ValueError(f"{where}: listing grammars support objects, enums and bounded strings, not {kind!r}")

    def string(self, name: str, low: int, high: int) -> str:
        """A quoted string of ``low``..``high`` listing characters, counted by a chain of rules: rule
        ``i`` has read ``i`` characters and either closes the string (from ``low`` on) or reads one
        more. Not ``listing_char{low,high}``: xgrammar 0.2 checks most of the vocabulary again at
        every step inside a counted repetition, and more so the further in (above 128 it keeps about
        as many parser states alive as characters read). With a 49k-token vocabulary one mask inside
        a 400-character description took 1.0-1.9 s. Each rule of the chain has its own mask
        precomputed when the grammar is compiled (about 0.04 ms per step then), at a compile cost
        linear in ``high`` (``infra/bench/bench_grammar.py``; README, "Grammar masks for bounded
        strings").
        The language is the same, character for character; ``strings="repetition"`` writes the
        counted repetition instead, the reference the chain is tested and benchmarked against."""
        if self.strings == "repetition":
            return self.add(name, f'"\\"" listing_char{{{low},{high}}} "\\""')

        def at(i: int) -> str:
            return f"{name}_n{i}"

        for i in range(high, -1, -1):
            more = f"listing_char {at(i + 1)}"
            self.add(at(i), '"\\""' if i == high else more if i < low else f'"\\"" | {more}')
        return self.add(name, f'"\\"" {at(0)}')

    def object(self, node: Mapping[str, Any], name: str, where: str) -> str:
        """Properties in schema order, optional ones skippable, no others (``additionalProperties``
        must be false). ``rest(i, first)``: properties i.. with none written yet (``first``) or after
        one was (each then starts with the separator)."""
        _keys(node, {"type", "properties", "required", "additionalProperties"}, where)
        if node.get("additionalProperties", True) is not False:
            raise ValueError(f"{where}: listing objects need additionalProperties: false")
        props = list(node.get("properties", {}).items())
        required = set(node.get("required", ()))
        if not required <= {key for key, _ in props}:
            raise ValueError(f"{where}: required names a property the schema does not define")
        colon, comma = json.dumps(SEPARATORS[1]), json.dumps(SEPARATORS[0])
        pairs = [(f"{_literal(key, where)} {colon} {self.value(sub, f'{name}_{i}', f'{where}.{key}')}",
                  key in required) for i, (key, sub) in enumerate(props)]
        made: dict[tuple[int, bool], str] = {}

        def rest(i: int, first: bool) -> str:
            if i == len(pairs):
                return '""'
            if (i, first) not in made:
                pair, needed = pairs[i]
                this = f"{pair} {rest(i + 1, False)}" if first else f"{comma} {pair} {rest(i + 1, False)}"
                skip = "" if needed else f" | {rest(i + 1, first)}"
                made[i, first] = self.add(f"{name}_{'first' if first else 'next'}{i}", f"({this}){skip}")
            return made[i, first]

        return self.add(name, f'"{{" {rest(0, True)} "}}"')


def listing_ebnf(json_schema: Mapping[str, Any], *, strings: StringEncoding = "chain") -> str:
    """The xgrammar EBNF of a listing schema: JSON with ``SEPARATORS`` and no other whitespace,
    objects, string enums and bounded strings of ``listing_char``. Anything else raises ValueError.
    ``strings``: how a string's length bounds are written (``_Rules.string``)."""
    if json_schema.get("type") != "object":
        raise ValueError("$: a listing is a JSON object")
    rules = _Rules(strings)
    rules.object(json_schema, "root", "$")
    return "\n".join([*rules.lines, _CHAR_RULE]) + "\n"


def worst_case_chars(json_schema: Mapping[str, Any]) -> int:
    """The length of the longest JSON text of ``listing_ebnf(json_schema)``, in characters, every
    string character counted as a two-character escape: an upper bound on the tokens a decoder can
    spend on it when every token spells at least one character (ASCII text does; a non-ASCII
    character spelled byte by byte can cost more, and then the completion of ``finish_row`` closes
    the output). The budget of a generation phase is sized from it (``models.listing``)."""
    if "enum" in json_schema:
        return max(len(json.dumps(v, ensure_ascii=False)) for v in json_schema["enum"])
    if json_schema.get("type") == "string":
        return 2 + 2 * int(json_schema["maxLength"])
    props = list(json_schema.get("properties", {}).items())
    pairs = sum(len(json.dumps(k)) + len(SEPARATORS[1]) + worst_case_chars(v) for k, v in props)
    return 2 + pairs + len(SEPARATORS[0]) * max(0, len(props) - 1)


class MaskFiller:
    """Fills the token bitmask of a batch's rows at one decoding step: with more than one thread,
    all live rows at once on xgrammar's native batch matcher (its own threads); with one, row by
    row on the calling thread. The rows' masks are independent, so both give the same bits. Doing the
    rows in parallel raised batch throughput while the string bounds were counted repetitions, whose
    fill was half the model thread's time; with the chained bounds it makes little difference on
    the CPU (README, "Grammar masks in parallel").

    ``overlap``: each step's masks are prepared on a thread of the filler's own
    (``SchemaLogitsProcessor.look_ahead``) while the model computes the logits they will mask,
    instead of after (README, "Grammar masks during the forward pass"). The thread is started on
    first use, so a process may fork before it."""

    def __init__(self, threads: int = 1, *, overlap: bool = False) -> None:
        if threads < 1:
            raise ValueError(f"mask filler threads must be at least 1, got {threads}")
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads) if threads > 1 else None
        self._lock = threading.Lock()  # one batch matcher; a generator may be shared by threads
        self.overlap = overlap
        self._ahead: ThreadPoolExecutor | None = None
        self._starting = threading.Lock()

    def fill(self, matchers: Sequence[xgr.GrammarMatcher], bitmask: torch.Tensor) -> None:
        live = []
        for row, matcher in enumerate(matchers):
            if matcher.is_terminated():
                bitmask[row].fill_(-1)  # finished row: generate() pads it anyway
            else:
                live.append(row)
        if self._batch is not None and len(live) > 1:
            with self._lock:
                self._batch.batch_fill_next_token_bitmask([matchers[r] for r in live], bitmask, indices=live)
            return
        for row in live:
            matchers[row].fill_next_token_bitmask(bitmask, row)

    def submit(self, prepare: Callable[[], None]) -> Future[None]:
        """Run ``prepare`` (one step's mask) on the filler's own thread."""
        with self._starting:
            if self._ahead is None:
                self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        return self._ahead.submit(prepare)


class GrammarCache:
    """One compiled grammar per (schema_id, part), shared by all rows and calls (compilation is the
    slow part). ``part``: the whole listing, or one generation phase (``categories.part_schema``).
    ``filler`` fills the masks of the rows decoded with these grammars."""

    def __init__(self, vocab: GrammarVocab, *, fill_threads: int = 1, overlap: bool = False) -> None:
        self.vocab = vocab
        self.filler = MaskFiller(fill_threads, overlap=overlap)
        self._compiler = xgr.GrammarCompiler(vocab.info)
        self._compiled: dict[tuple[str, str], xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def get(self, schema: CategorySchema, part: ListingPart = "listing") -> xgr.CompiledGrammar:
        with self._lock:
            key = (schema.schema_id, part)
            if key not in self._compiled:
                self._compiled[key] = self._compiler.compile_grammar(listing_ebnf(part_schema(schema, part)))
            return self._compiled[key]

    def matcher(self, schema: CategorySchema, part: ListingPart = "listing") -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.get(schema, part), override_stop_tokens=list(self.vocab.stop_token_ids))


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks each row's logits to the tokens its own grammar matcher allows next.

    One matcher per row (rows may use different category schemas). Single-use: ``generate()`` does
    not call processors after the last step, so a fresh instance is made per call; the first call
    sees the input as given (a prompt, or a prompt plus tokens the matchers already accepted).

    ``closing``: the budget is spent and the output is being finished by the model. Wherever the
    grammar allows a structural closer (``"`` ends a string that is long enough, ``}`` skips the
    remaining optional properties) only closers stay allowed; elsewhere (an enum value being
    spelled, a string below its minimum length) the model's own choice among the allowed tokens
    decides. So the completion is as short as the grammar permits and every value in it is the
    model's most probable allowed one, never a fixed rank.

    ``bans``: per row, token sequences that must not be produced (the phrases a constrained retry
    of a listing's text may not repeat). A sequence's last token is masked where the row's output
    ends with the rest of it, unless that would leave the row no allowed token.
    """

    def __init__(self, matchers: list[xgr.GrammarMatcher], vocab: GrammarVocab, *, closing: bool = False,
                 bans: Sequence[Sequence[Sequence[int]]] | None = None, filler: MaskFiller | None = None) -> None:
        self.matchers = matchers
        self.vocab = vocab
        self.filler = filler or MaskFiller()
        self.vocab_size = vocab.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(matchers), vocab.vocab_size)
        self.closing = closing
        self.bans = [list(b) for b in bans] if bans is not None else [[] for _ in matchers]
        self._prompt_len: int | None = None
        self._staged: torch.Tensor | None = None  # pinned host copy of the mask (CUDA only)
        self._ahead: Future[None] | None = None  # the next step's mask, being prepared (overlap)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.matchers):
            raise ModelError(f"batch of {input_ids.shape[0]} rows for {len(self.matchers)} grammar matchers")
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.result()  # this step's mask, prepared while the model computed ``scores``
        else:
            self._prepare(*self._sampled(input_ids))
        masked = scores if scores.dtype in (torch.float32, torch.float16, torch.bfloat16) else scores.float()
        # The whole batch's mask goes to the device in one copy (pinned, asynchronous on CUDA) and is
        # applied by one kernel.
        xgr.apply_token_bitmask_inplace(masked, self._device_bitmask(masked.device), vocab_size=self.vocab_size)
        return masked if masked is scores else masked.to(scores.dtype)

    def look_ahead(self, input_ids: torch.LongTensor) -> None:
        """Start the next step's mask on the filler's thread, from the tokens just appended
        (``MaskLookahead`` calls this between a step's sampling and the next forward pass)."""
        sampled = self._sampled(input_ids)
        self._ahead = self.filler.submit(lambda: self._prepare(*sampled))

    def stopping_criteria(self) -> StoppingCriteriaList:
        """What ``generate()`` is given beside this processor: the look-ahead when the filler overlaps."""
        return StoppingCriteriaList([MaskLookahead(self)] if self.filler.overlap else [])

    def settle(self) -> None:
        """Wait for a mask still being prepared after ``generate()`` returned or failed (the look-ahead
        of its last step, which nothing reads: the tokens are replayed into fresh matchers)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            wait_for([ahead])

    def _sampled(self, input_ids: torch.LongTensor) -> tuple[list[int] | None, list[list[int]] | None]:
        """What the mask depends on, read off the device: the tokens sampled at the last step
        (None at the first call, whose input is the prompt) and, only when some row has bans, the
        rows' recent tails. The matchers run on the host: one device-to-host copy of the batch's
        last tokens per step, never one synchronisation per row."""
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
            last = None
        else:
            last = input_ids[:, -1].tolist()
        tails = input_ids[:, -_BAN_TAIL:].tolist() if any(self.bans) else None
        return last, tails

    def _prepare(self, last: list[int] | None, tails: list[list[int]] | None) -> None:
        """The host bitmask of the next step: advance the matchers by ``last``, fill, then apply the
        vocabulary's bans, the closing restriction and the rows' banned phrases."""
        if last is not None:
            for matcher, token in zip(self.matchers, last):
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise ModelError("decoder produced a token outside the grammar mask")
        self.filler.fill(self.matchers, self.bitmask)
        self.vocab.mask(self.bitmask)
        if self.closing:
            for row in range(len(self.matchers)):
                _keep_only(self.bitmask[row], _closers(self.bitmask[row], self.vocab))
        if tails is not None:
            for row, bans in enumerate(self.bans):
                if bans:
                    _ban_sequences(self.bitmask[row], bans, tails[row])

    def _device_bitmask(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.bitmask
        if self._staged is None:
            self._staged = self.bitmask.pin_memory()
        # Safe to overwrite: the previous step's copy has landed, since this step's mask began by
        # reading the sampled tokens back (``tolist`` waits for the stream).
        self._staged.copy_(self.bitmask)
        return self._staged.to(device, non_blocking=True)


_BAN_TAIL = 16  # banned phrases are a few tokens long


class MaskLookahead(StoppingCriteria):
    """Not a stopping rule: ``generate()`` calls its stopping criteria right after appending a
    step's tokens and before the next forward pass, the one point where the next step's mask can
    start so that it is filled while the model computes the logits it will mask. Stops no row."""

    def __init__(self, processor: SchemaLogitsProcessor) -> None:
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.processor.look_ahead(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _closers(row: torch.Tensor, vocab: GrammarVocab) -> list[int]:
    """The closing tokens allowed here: a quote (ends a string that may end, or opens a value);
    else, outside a string (no letter allowed), a brace (skips the optional properties left)."""
    quotes = [t for t in vocab.quote_ids if _bit(row, t)]
    if quotes:
        return quotes
    in_string = any(_bit(row, t) for t in vocab.letter_ids)
    return [] if in_string else [t for t in vocab.brace_ids if _bit(row, t)]


def _bit(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


def _clear(row: torch.Tensor, token: int) -> None:
    word = int(row[token // 32]) & ~(1 << (token % 32)) & 0xFFFFFFFF
    row[token // 32] = word - 2**32 if word >= 2**31 else word


def _keep_only(row: torch.Tensor, tokens: Sequence[int]) -> None:
    """Restrict a bitmask row to ``tokens`` (no change when the list is empty)."""
    if not tokens:
        return
    row.zero_()
    for token in tokens:
        word = int(row[token // 32]) | (1 << (token % 32))
        row[token // 32] = word - 2**32 if word >= 2**31 else word


def _ban_sequences(row: torch.Tensor, bans: Sequence[Sequence[int]], tail: Sequence[int]) -> None:
    """Mask the last token of every banned sequence whose other tokens end ``tail``."""
    last = []
    for seq in bans:
        head = list(seq[:-1])
        if seq and len(head) <= len(tail) and list(tail[len(tail) - len(head):]) == head and _bit(row, seq[-1]):
            last.append(seq[-1])
    if not last:
        return
    saved = row.clone()
    for token in last:
        _clear(row, token)
    if not bool(row.any()):
        row.copy_(saved)  # nothing else is allowed: the post-generation check catches the phrase


def leaf_spans(raw: str) -> list[tuple[str, int, int]]:
    """(dotted key path, start, end) of every string value in ``raw``, a compact JSON object of
    objects and strings as the listing grammars produce; character offsets into ``raw``."""
    spans: list[tuple[str, int, int]] = []
    decoder = json.JSONDecoder()

    def obj(pos: int, prefix: str) -> int:
        assert raw[pos] == "{"
        pos += 1
        while raw[pos] != "}":
            if raw[pos] == ",":
                pos += len(SEPARATORS[0])
            key, pos = decoder.raw_decode(raw, pos)
            pos += len(SEPARATORS[1])
            path = f"{prefix}{key}"
            if raw[pos] == "{":
                pos = obj(pos, f"{path}.")
            else:
                start = pos
                _, pos = decoder.raw_decode(raw, pos)
                spans.append((path, start, pos))
        return pos + 1

    obj(0, "")
    return spans


def forced_fields(raw: str, cutoff_bytes: int) -> tuple[str, ...]:
    """The values of ``raw`` not finished within its first ``cutoff_bytes`` bytes (the budget)."""
    cutoff = len(raw.encode("utf-8")[:cutoff_bytes].decode("utf-8", errors="ignore"))
    return tuple(path for path, _, end in leaf_spans(raw) if end > cutoff)


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


def replay(matcher: xgr.GrammarMatcher, new_tokens: Sequence[int], vocab: GrammarVocab) -> list[int]:
    """Feed generated tokens into ``matcher`` up to its stop token; the accepted ones, stop excluded."""
    kept: list[int] = []
    stops = set(vocab.stop_token_ids)
    for token in new_tokens:
        if matcher.is_terminated():
            break  # the rest is padding after the stop token
        if not matcher.accept_token(int(token)):
            raise ModelError("generated token rejected by the listing grammar")
        if int(token) not in stops:
            kept.append(int(token))
    return kept


def finish_row(matcher: xgr.GrammarMatcher, new_tokens: Sequence[int], vocab: GrammarVocab) -> ConstrainedRow:
    """Replay what ``generate()`` produced into a fresh matcher, then force-complete if needed.

    Replaying double-checks every model token against the grammar and also accepts the final
    token, which generate() sampled without calling the processor again.
    """
    kept = replay(matcher, new_tokens, vocab)
    forced = [] if matcher.is_terminated() else force_complete(matcher, vocab)
    return ConstrainedRow(kept + forced, generated=len(kept), forced=len(forced))
