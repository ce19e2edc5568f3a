"""The listing grammar: which characters and escapes a listing string may contain, how its length
bounds count, and that whatever the constrained decoder emits round-trips through ``json.loads``
and is accepted by PostgreSQL's JSONB.

The grammar is driven directly (``GrammarMatcher.accept_string`` on bytes, as byte-level tokens
reach it) and by random logits over the tiny model's real vocabulary, biased towards the tokens
that spell escapes and multi-byte characters, through the generator's own ``_finish``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xgrammar as xgr
from PIL import Image
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from models.categories import CATEGORIES, CategorySchema
from models.categories import part_schema
from models.constrained import MaskFiller, SchemaLogitsProcessor, finish_row, listing_ebnf, pack_bitmask
from models.errors import ModelError
from models.listing import ListingGenerator, ListingRequest, PhaseOutput, TextRequest
from models.prompting import build_attribute_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TITLE = b'{"title": "'  # every schema starts here; the title is 10..80 characters
ALLOWED_ESCAPES = [b'\\"', b"\\\\", b"\\/"]
REFUSED = {
    "NUL escape": b"\\u0000", "control escape": b"\\u001f", "any \\u escape": b"\\u0041",
    "lone high surrogate": b"\\ud800", "lone low surrogate": b"\\udfff", "surrogate pair": b"\\ud83d\\ude00",
    "backspace": b"\\b", "form feed": b"\\f", "newline": b"\\n", "carriage return": b"\\r", "tab": b"\\t",
    "raw NUL": b"\x00", "raw tab": b"\t", "raw unit separator": b"\x1f", "raw DEL": b"\x7f", "raw C1 NEL": b"\xc2\x85",
    "UTF-8 of U+D800": b"\xed\xa0\x80", "UTF-8 of U+DFFF": b"\xed\xbf\xbf", "invalid escape": b"\\x",
}
ACCEPTED = {"e acute": "é".encode(), "emoji": "😀".encode(), "U+D7FF": b"\xed\x9f\xbf", "U+E000": b"\xee\x80\x80",
            "no-break space": b"\xc2\xa0", **{e.decode(): e for e in ALLOWED_ESCAPES}}
UNBOUNDED = CategorySchema(
    name="note", version=1, schema_id="note@1", visual_attributes={},
    json_schema={"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"],
                 "additionalProperties": False})


def _accepts(generator: ListingGenerator, schema: CategorySchema, data: bytes) -> bool:
    assert generator._grammars is not None
    return generator._grammars.matcher(schema).accept_string(data)


def _completes(generator: ListingGenerator, schema: CategorySchema, data: bytes) -> bool:
    assert generator._grammars is not None
    matcher = generator._grammars.matcher(schema)
    return matcher.accept_string(data) and matcher.is_completed()


def _forbidden(value: str) -> bool:
    return any(c < "\x20" or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in value)


def _escapes(raw: str) -> list[str]:
    found, i = [], 0
    while i < len(raw):
        if raw[i] == "\\":
            found.append(raw[i:i + 2])
            i += 2
        else:
            i += 1
    return found


# --- what a string may contain ------------------------------------------------------------------


def test_the_grammar_refuses_escapes_and_characters_outside_the_policy(generator: ListingGenerator) -> None:
    """Every \\u escape (NUL, controls, surrogates, even a valid pair), the control escapes, raw
    control characters, and the UTF-8 spelling of a surrogate, in every schema's title."""
    admitted = [(schema.schema_id, name) for schema in CATEGORIES.values() for name, probe in REFUSED.items()
                if _accepts(generator, schema, TITLE + b"ab" + probe)]
    assert admitted == []
    assert all(_accepts(generator, schema, TITLE + b"ab") for schema in CATEGORIES.values())


def test_the_grammar_admits_the_policys_escapes_and_any_other_character(generator: ListingGenerator) -> None:
    refused = [(schema.schema_id, name) for schema in CATEGORIES.values() for name, probe in ACCEPTED.items()
               if not _accepts(generator, schema, TITLE + b"ab" + probe)]
    assert refused == []


def test_length_bounds_count_characters_as_json_loads_does(generator: ListingGenerator) -> None:
    """An escape is one character, an emoji (4 bytes, 2 UTF-16 units) is one character: exactly
    80 of either fit a title and 81 do not, and 9 are too few."""
    schema = CATEGORIES["dress"]
    for char in (b'\\"', b"\\\\", b"\\/", "😀".encode(), "é".encode(), b"a"):
        for n, fits in ((9, False), (10, True), (80, True), (81, False)):
            title = b'"' + char * n + b'"'
            assert len(json.loads(title)) == n
            assert _accepts(generator, schema, b'{"title": ' + title + b', "description": "') is fits, (char, n)


def test_schema_objects_with_escaped_titles_are_exactly_what_the_grammar_accepts(
        generator: ListingGenerator) -> None:
    """Required attributes only, every attribute, an unknown one, a missing one: each schema's
    objects, serialised as the decoder writes them, with a title that needs the allowed escapes."""
    title = 'A 34" "wide" jeans \\ slash/ 😀'
    for schema in CATEGORIES.values():
        attrs = schema.visual_attributes
        required = {k: attrs[k][0] for k in attrs if k in schema.required_attributes}
        every = {k: values[-1] for k, values in attrs.items()}

        def doc(attributes: dict[str, str]) -> bytes:
            return json.dumps({"title": title, "description": "d" * 20, "attributes": attributes},
                              separators=(", ", ": "), ensure_ascii=False).encode()

        assert _completes(generator, schema, doc(required)), schema.schema_id
        assert _completes(generator, schema, doc(every)), schema.schema_id
        assert not _accepts(generator, schema, doc({**required, "material": "cotton"}))
        if required:
            assert not _completes(generator, schema, doc(dict(list(required.items())[1:])))


@pytest.mark.parametrize("json_schema", [
    UNBOUNDED.json_schema,
    {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False},
    {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5, "pattern": "^a"}},
     "additionalProperties": False},
    {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}},  # additional properties open
    {"type": "object", "properties": {"s": {"enum": ["ok", "nul\u0000"]}}, "additionalProperties": False},
])
def test_a_schema_outside_what_listings_support_is_refused_not_loosened(generator: ListingGenerator,
                                                                          json_schema: dict) -> None:
    """Unbounded strings (xgrammar's rule admits \\u0000 and lone surrogates), other types, patterns,
    open objects, enum values that need a forbidden character: refused when compiled."""
    schema = CategorySchema(name="x", version=1, schema_id=f"x@{id(json_schema)}", json_schema=json_schema,
                            visual_attributes={})
    assert generator._grammars is not None
    with pytest.raises(ValueError):
        generator._grammars.get(schema)


# --- what the decoder emits -----------------------------------------------------------------------


def _random_logit_listing(generator: ListingGenerator, schema: CategorySchema, seed: int,
                          steps: int) -> tuple[PhaseOutput, list[int]]:
    """Decode ``steps`` tokens from seeded random logits under the schema's mask, favouring tokens
    with a backslash, a quote or a non-ASCII byte, then finish as ``generate()``'s output is
    finished (replay, force-completion, text, json.loads, validation)."""
    grammars = generator._grammars
    assert grammars is not None
    vocab = grammars.vocab
    decoded = vocab.info.decoded_vocab
    bias = torch.tensor([3.0 if i < len(decoded) and (b"\\" in decoded[i] or b'"' in decoded[i]
                                                      or any(b >= 0x80 for b in decoded[i])) else 0.0
                         for i in range(vocab.vocab_size)])
    rng = torch.Generator().manual_seed(seed)
    processor = SchemaLogitsProcessor([grammars.matcher(schema)], vocab)
    ids = torch.zeros(1, 1, dtype=torch.long)
    new: list[int] = []
    for _ in range(steps):
        token = int(processor(ids, torch.randn(1, vocab.vocab_size, generator=rng) * 2 + bias).argmax())
        new.append(token)
        if token in vocab.stop_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    request = ListingRequest(image=Image.new("RGB", (8, 8)), schema=schema, image_ref=f"walk:{seed}")
    prompt = build_attribute_prompt(schema, merchant_title="", merchant_description="", merchant_attributes={},
                                    locale="en")
    listing = generator._finish("listing", request, prompt, "", new, steps)
    return listing, finish_row(grammars.matcher(schema), new, vocab).token_ids


def _walks(generator: ListingGenerator, seeds: range) -> list[tuple[PhaseOutput, list[int]]]:
    names = sorted(CATEGORIES)
    return [_random_logit_listing(generator, CATEGORIES[names[seed % len(names)]], seed, 20 + seed * 7 % 140)
            for seed in seeds]


def test_random_logit_listings_over_many_seeds_hold_the_policy_and_the_bounds(generator: ListingGenerator) -> None:
    decoded = generator._grammars.vocab.info.decoded_vocab  # type: ignore[union-attr]
    seen_escape = seen_multibyte = False
    for listing, tokens in _walks(generator, range(66)):
        schema = CATEGORIES[listing.record["schema_id"].split("@")[0]]
        raw = listing.raw_text
        assert raw.encode("utf-8") == b"".join(decoded[t] for t in tokens)  # the text is what the grammar read
        assert json.loads(raw) == listing.output
        assert set(_escapes(raw)) <= {'\\"', "\\\\", "\\/"}, raw
        for field in ("title", "description"):
            value, bounds = listing.output[field], schema.json_schema["properties"][field]
            assert bounds["minLength"] <= len(value) <= bounds["maxLength"], (field, value)
            assert not _forbidden(value), ascii(value)
        seen_escape |= bool(_escapes(raw))
        seen_multibyte |= any(len(c.encode()) >= 3 for c in raw)
    assert seen_escape and seen_multibyte  # the walks did reach the interesting corners


def test_listings_and_every_admitted_escape_are_accepted_by_postgres_jsonb(
        db_session, generator: ListingGenerator, sample_photos: list[tuple[Path, str]]) -> None:  # noqa: ANN001
    """Whatever the decoder can emit goes into a JSONB column as its raw text (PostgreSQL parses
    it) and as the parsed object (as SQLAlchemy's JSONB type sends it), and comes back equal."""
    assert generator._grammars is not None
    names = sorted(CATEGORIES)
    requests = [ListingRequest(image=Image.open(path).convert("RGB"), schema=CATEGORIES[names[i % len(names)]],
                               merchant_title=f"{category} 34\" \\ /", image_ref=f"sha256:{i}")
                for i, (path, category) in enumerate(sample_photos[:4])]
    docs = [listing.raw_text for listing in generator.predict(requests)]
    docs += [listing.raw_text for listing, _ in _walks(generator, range(100, 122))]
    probes = [b"\\" + bytes([c]) for c in b'"\\/bfnrt'] + [b"\\u" + u for u in
                                                           (b"0000", b"001f", b"0041", b"d800", b"dfff", b"fffe")]
    for schema in (CATEGORIES["dress"], UNBOUNDED):
        try:
            generator._grammars.get(schema)
        except ValueError:
            continue  # refused: the decoder never runs it
        prefix = TITLE if schema is not UNBOUNDED else b'{"note": "'
        for probe in probes:
            string = prefix + b"0123456789" + probe + b'"'
            if _accepts(generator, schema, string):
                docs.append(string.decode() + "}")
    db_session.execute(text("CREATE TEMP TABLE listing_docs (n int, raw jsonb, obj jsonb) ON COMMIT DROP"))
    insert = text("INSERT INTO listing_docs VALUES (:n, CAST(:raw AS jsonb), :obj)").bindparams(
        bindparam("obj", type_=JSONB))
    for n, raw in enumerate(docs):
        with db_session.begin_nested():
            db_session.execute(insert, {"n": n, "raw": raw, "obj": json.loads(raw)})
    back = db_session.execute(text("SELECT n, raw, obj FROM listing_docs ORDER BY n")).all()
    assert [(r.raw, r.obj) for r in back] == [(json.loads(d), json.loads(d)) for d in docs]
    assert any("\\" in d for d in docs)


# --- the masks of a batch's rows, filled in parallel ---------------------------------------------


def test_the_parallel_mask_filler_sets_the_same_bits_as_the_row_by_row_fill(generator: ListingGenerator) -> None:
    """Six rows under six schemas walk the grammar on seeded random allowed tokens; at every step
    the batch matcher's mask (two threads) equals the row-by-row one bit for bit, finished rows
    included (all ones, as generate() pads them)."""
    grammars = generator._grammars
    assert grammars is not None
    vocab = grammars.vocab
    names = sorted(CATEGORIES)[:6]
    matchers = [grammars.matcher(CATEGORIES[name]) for name in names]
    serial, parallel = MaskFiller(1), MaskFiller(2)
    expected = xgr.allocate_token_bitmask(len(matchers), vocab.vocab_size)
    got = xgr.allocate_token_bitmask(len(matchers), vocab.vocab_size)
    closers = [*vocab.quote_ids, *vocab.brace_ids, *vocab.stop_token_ids]
    rng = torch.Generator().manual_seed(7)
    finished_while_others_ran = 0
    for step in range(400):
        serial.fill(matchers, expected)
        got.fill_(0)
        parallel.fill(matchers, got)
        assert torch.equal(got, expected), f"step {step}"
        live = [m for m in matchers if not m.is_terminated()]
        if not live:
            break
        finished_while_others_ran += len(live) < len(matchers)
        scores = torch.randn(len(matchers), vocab.vocab_size, generator=rng)
        for row in range(len(matchers)):  # row r heads for the end from step 15 r: rows end apart
            if step >= 15 * row:
                scores[row, closers] += 50.0
        xgr.apply_token_bitmask_inplace(scores, expected, vocab_size=vocab.vocab_size)
        for row, matcher in enumerate(matchers):
            if not matcher.is_terminated():
                assert matcher.accept_token(int(scores[row].argmax()))
    assert all(m.is_terminated() for m in matchers)  # every row reached its end
    assert finished_while_others_ran  # the mixed batch (some rows done) was exercised


def _mixed_batch(photos: list[tuple[Path, str]], tag: str) -> list[ListingRequest]:
    """One request per photo, each under the next category's schema (so rows end apart)."""
    names = sorted(CATEGORIES)
    return [ListingRequest(image=Image.open(path).convert("RGB"), schema=CATEGORIES[names[i % len(names)]],
                           merchant_title=f"{category} {i}", image_ref=f"sha256:{tag}{i}")
            for i, (path, category) in enumerate(photos)]


def test_the_chained_length_bounds_set_the_same_mask_bits_as_xgrammars_counted_repetition(
        generator: ListingGenerator) -> None:
    """The text phase's grammar (a 10..80 title, a 20..400 description) written both ways, walked
    together on seeded random allowed tokens: at every step the two masks are equal bit for bit.
    Rows head for the closing quote from different steps, one never does (it is stopped by the
    400-character bound, past xgrammar's 128-character unrolling), and one favours escapes."""
    grammars = generator._grammars
    assert grammars is not None
    vocab = grammars.vocab
    text_part = part_schema(CATEGORIES["dress"], "text")
    compiler = xgr.GrammarCompiler(vocab.info)
    ways = {way: compiler.compile_grammar(listing_ebnf(text_part, strings=way)) for way in ("chain", "repetition")}
    rows = 3
    matchers = {way: [xgr.GrammarMatcher(g, override_stop_tokens=list(vocab.stop_token_ids)) for _ in range(rows)]
                for way, g in ways.items()}
    masks = {way: xgr.allocate_token_bitmask(rows, vocab.vocab_size) for way in ways}
    escapes = [i for i, tok in enumerate(vocab.token_bytes) if b"\\" in tok]
    assert escapes
    in_vocab = pack_bitmask(torch.ones(vocab.vocab_size, dtype=torch.bool))
    rng = torch.Generator().manual_seed(11)
    lengths = [0] * rows
    for step in range(2000):
        for way in ways:
            for row, m in enumerate(matchers[way]):
                if m.is_terminated():
                    masks[way][row].fill_(-1)
                else:
                    m.fill_next_token_bitmask(masks[way], row)
        # the bits of real tokens (the two set the padding bits past the vocabulary differently)
        assert torch.equal(masks["chain"] & in_vocab, masks["repetition"] & in_vocab), f"step {step}"
        if all(m.is_terminated() for m in matchers["chain"]):
            break
        scores = torch.randn(rows, vocab.vocab_size, generator=rng)
        scores[:, list(vocab.quote_ids)] -= 50.0  # strings run long unless a row heads for the end
        scores[2, escapes] += 3.0
        for row, start in ((0, 20), (2, 70)):  # row 1 never heads for the end
            if step >= start:
                scores[row, [*vocab.quote_ids, *vocab.brace_ids, *vocab.stop_token_ids]] += 100.0
        xgr.apply_token_bitmask_inplace(scores, masks["chain"], vocab_size=vocab.vocab_size)
        for row in range(rows):
            if matchers["chain"][row].is_terminated():
                continue
            token = int(scores[row].argmax())
            for way in ways:
                assert matchers[way][row].accept_token(token), (way, step, row)
            lengths[row] += len(vocab.token_bytes[token])
    assert all(m.is_terminated() for way in ways for m in matchers[way])
    assert max(lengths) > 400 + 80  # some row ran the description to its bound


def test_listings_decoded_with_parallel_masks_are_the_ones_decoded_row_by_row(
        generator: ListingGenerator, sample_photos: list[tuple[Path, str]]) -> None:
    """Greedy decoding of one mixed-schema batch gives the same listings, token for token, whether
    its masks are filled by two threads or row by row."""
    grammars = generator._grammars
    assert grammars is not None
    requests = _mixed_batch(sample_photos[:5], "par")
    before = grammars.filler
    try:
        grammars.filler = MaskFiller(1)
        serial = generator.predict(requests, max_new_tokens=40)
        grammars.filler = MaskFiller(2)
        parallel = generator.predict(requests, max_new_tokens=40)
    finally:
        grammars.filler = before
    assert [r.raw_text for r in parallel] == [r.raw_text for r in serial]
    assert [r.output for r in parallel] == [r.output for r in serial]


def test_the_grammar_thread_setting_reaches_the_generator_and_zero_means_every_core() -> None:
    import os

    from models.config import ModelConfig
    from workers.settings import Settings
    from workers.wiring import model_config

    assert model_config(Settings(models={"grammar_threads": 3})).grammar_threads == 3
    assert ListingGenerator(model_config(Settings(models={"grammar_threads": 3})), profile="tiny").grammar_threads == 3
    assert ListingGenerator(ModelConfig(), profile="tiny").grammar_threads == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="at least 1"):
        MaskFiller(0)


# --- the next step's masks, filled during the forward pass ---------------------------------------


class _CountingFiller(MaskFiller):
    """A mask filler that counts the steps prepared on its look-ahead thread."""

    def __init__(self, threads: int, *, overlap: bool) -> None:
        super().__init__(threads, overlap=overlap)
        self.ahead = 0

    def submit(self, prepare):  # noqa: ANN001, ANN201
        self.ahead += 1
        return super().submit(prepare)


def test_listings_decoded_with_masks_filled_during_the_forward_pass_are_the_ones_filled_after(
        generator: ListingGenerator, sample_photos: list[tuple[Path, str]]) -> None:
    """Both phases of a mixed-schema batch, with a budget short enough that rows are finished
    under the closing mask and a text retry whose phrases are banned: the same tokens whether each
    step's masks are prepared on the look-ahead thread (one or two fill threads) or after the
    forward pass on the model thread, and the look-ahead did run every step."""
    grammars = generator._grammars
    assert grammars is not None
    requests = _mixed_batch(sample_photos[:5], "ahead")
    before = grammars.filler

    def decode(filler: MaskFiller) -> tuple[list[PhaseOutput], list[PhaseOutput]]:
        grammars.filler = filler
        attributes = generator.describe_attributes(requests, max_new_tokens=40)
        retry = [TextRequest(r, {k: v for k, v in a.output.items() if isinstance(v, str)},
                             avoid=("soft", "classic fit"))
                 for r, a in zip(requests, attributes, strict=True)]
        return attributes, generator.write_text(retry, max_new_tokens=40)

    try:
        after = decode(_CountingFiller(1, overlap=False))
        fillers = [_CountingFiller(1, overlap=True), _CountingFiller(2, overlap=True)]
        during = [decode(f) for f in fillers]
    finally:
        grammars.filler = before
    assert any(out.forced_tokens for phase in after for out in phase)  # the closing pass ran
    for got in during:
        for phase, expected in zip(got, after, strict=True):
            assert [o.raw_text for o in phase] == [o.raw_text for o in expected]
            assert [o.output for o in phase] == [o.output for o in expected]
    tokens = sum(o.tokens for phase in after for o in phase)
    assert all(f.ahead >= tokens // len(requests) for f in fillers)  # at least one look-ahead per step


def test_a_look_ahead_that_fails_fails_the_next_step_and_settle_leaves_nothing_running(
        generator: ListingGenerator) -> None:
    """A token outside the grammar, met on the look-ahead thread, raises at the next step as it
    would without overlap; ``settle`` after a failed or unread look-ahead returns quietly."""
    grammars = generator._grammars
    assert grammars is not None
    vocab = grammars.vocab
    filler = MaskFiller(1, overlap=True)
    processor = SchemaLogitsProcessor([grammars.matcher(CATEGORIES[sorted(CATEGORIES)[0]])], vocab, filler=filler)
    assert len(processor.stopping_criteria()) == 1
    prompt = torch.tensor([[1, 2, 3]])
    scores = processor(prompt, torch.zeros(1, vocab.vocab_size))
    allowed = int(scores[0].argmax())
    refused = int(scores[0].argmin())
    assert scores[0, refused] == float("-inf")
    processor.look_ahead(torch.cat([prompt, torch.tensor([[refused]])], dim=1))
    with pytest.raises(ModelError, match="outside the grammar mask"):
        processor(prompt, torch.zeros(1, vocab.vocab_size))
    processor.settle()  # nothing left pending

    fresh = SchemaLogitsProcessor([grammars.matcher(CATEGORIES[sorted(CATEGORIES)[0]])], vocab, filler=filler)
    fresh(prompt, torch.zeros(1, vocab.vocab_size))
    fresh.look_ahead(torch.cat([prompt, torch.tensor([[refused]])], dim=1))
    fresh.settle()  # the failure is dropped: generate() is over and nothing reads that mask
    assert fresh._ahead is None
    fresh.look_ahead(torch.cat([prompt, torch.tensor([[allowed]])], dim=1))
    fresh.settle()
    assert not SchemaLogitsProcessor([grammars.matcher(CATEGORIES[sorted(CATEGORIES)[0]])], vocab,
                                     filler=MaskFiller(1)).stopping_criteria()


def test_the_grammar_overlap_setting_reaches_the_generator_and_is_on_by_default(generator: ListingGenerator) -> None:
    from models.config import ModelConfig
    from workers.settings import Settings
    from workers.wiring import model_config

    assert model_config(Settings()).grammar_overlap is True
    off = model_config(Settings(models={"grammar_overlap": False}))
    assert off.grammar_overlap is False
    assert ListingGenerator(off, profile="tiny").grammar_overlap is False
    assert ListingGenerator(ModelConfig(), profile="tiny").grammar_overlap is True
    grammars = generator._grammars
    assert grammars is not None and grammars.filler.overlap is True
    try:  # the benchmark's switch reaches a loaded generator's filler
        generator.set_grammar_overlap(False)
        assert generator.grammar_overlap is False and grammars.filler.overlap is False
    finally:
        generator.set_grammar_overlap(True)
    assert grammars.filler.overlap is True
