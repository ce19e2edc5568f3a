"""Grammar mask cost per decoding step for the listing text phase (not a test).

A listing's title and description are bounded strings (10..80 and 20..400 characters). This script
compiles the text phase's grammar of a category four ways and walks each matcher over the same
listing, token by token, timing every ``fill_next_token_bitmask``:

- ``chain``: the grammar the generator uses (``models.constrained.listing_ebnf``), whose length
  bounds are a chain of rules, one per character read;
- ``repetition``: the same language with xgrammar's counted repetition ``listing_char{lo,hi}``
  (what ``listing_ebnf`` wrote before);
- ``xgrammar json``: the peer, xgrammar's own JSON Schema converter on the same schema, with the
  same separators and no free whitespace (``compile_json_schema``);

and, as the floor, ``unbounded``: the chain's grammar with the bounds dropped (``listing_char*``),
which no listing may use. It does so over two vocabularies: the tiny profile's tokenizer (955
tokens, what the tests and the CPU benchmarks decode with) and a byte-level BPE of 49,152 tokens,
SmolVLM's vocabulary size, trained here in a few seconds on the Python sources of the installed
packages. That tokenizer is a stand-in for a real model's: mask cost depends on how many tokens
the grammar must check, and this one has as many as the pretrained model.

    .venv/bin/python infra/bench/bench_grammar.py
    .venv/bin/python infra/bench/bench_grammar.py --vocab tiny --category shirt

Prints, per vocabulary and grammar: compile seconds, fill milliseconds per step (p50, p95, max,
and the mean over the description's last 50 steps), the fill time of the whole listing and its
ratio to the chain's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BPE_SIZE = 49152  # SmolVLM-256M's vocabulary
WORDS = ("soft cotton jersey with a relaxed fit, ribbed cuffs and a rounded neckline; machine washable, "
         "true to size, photographed flat on a plain background. ")


def tiny_tokenizer():  # noqa: ANN201
    from models.vlm_builders import build_tiny_tokenizer

    return build_tiny_tokenizer()


def trained_bpe(size: int):  # noqa: ANN201
    """A byte-level BPE of ``size`` tokens trained on the installed packages' Python sources."""
    import sysconfig

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    site = sysconfig.get_paths()["purelib"]
    files = sorted(glob.glob(f"{site}/**/*.py", recursive=True))[:4000]
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    path = Path(tempfile.mkdtemp()) / "bpe.json"
    bpe.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")


def listing_text(schema: dict) -> str:
    """A text-phase listing that fills the title and the description to their upper bounds."""
    from models.constrained import SEPARATORS

    doc = {key: (WORDS * 8)[: node["maxLength"]] for key, node in schema["properties"].items()}
    return json.dumps(doc, separators=SEPARATORS, ensure_ascii=False)


def grammars(info, schema: dict) -> dict[str, object]:  # noqa: ANN001
    """(name -> compiled grammar, compile seconds) for the four ways, compiled without the cache."""
    import xgrammar as xgr

    from models.constrained import SEPARATORS, listing_ebnf

    chain = listing_ebnf(schema)
    sources = {
        "chain": lambda c: c.compile_grammar(chain),
        "repetition": lambda c: c.compile_grammar(listing_ebnf(schema, strings="repetition")),
        "xgrammar json": lambda c: c.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                         separators=SEPARATORS),
        "unbounded": lambda c: c.compile_grammar(re.sub(r'"\\"" \w+_n0', r'"\\"" listing_char* "\\""', chain)),
    }
    out = {}
    for name, build in sources.items():
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        start = time.perf_counter()
        out[name] = (build(compiler), time.perf_counter() - start)
    return out


def walk(compiled, info, tokens: list[int]) -> list[float]:  # noqa: ANN001
    """Seconds of each step's mask fill along ``tokens`` (then the stop token)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in [*tokens, info.stop_token_ids[0]]:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        times.append(time.perf_counter() - start)
        if not matcher.accept_token(token):
            raise SystemExit(f"the walk's token {token} was refused: the grammars disagree on the listing")
    if not matcher.is_terminated():
        raise SystemExit("the walk did not end the listing")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", choices=("tiny", "bpe", "both"), default="both")
    ap.add_argument("--category", default="dress")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import xgrammar as xgr

    from models.categories import CATEGORIES, part_schema

    schema = dict(part_schema(CATEGORIES[args.category], "text"))
    text = listing_text(schema)
    vocabs = {"tiny": tiny_tokenizer, f"bpe {BPE_SIZE}": lambda: trained_bpe(BPE_SIZE)}
    if args.vocab != "both":
        vocabs = {k: v for k, v in vocabs.items() if k.startswith(args.vocab)}
    results = []
    print(f"{'vocabulary':12} {'grammar':14} {'compile s':>9} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
          f"{'last 50 ms':>10} {'listing ms':>10} {'x chain':>8}")
    for vname, make in vocabs.items():
        tokenizer = make()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
        tokens = tokenizer.encode(text, add_special_tokens=False)
        rows = []
        for gname, (compiled, compile_s) in grammars(info, schema).items():
            times = walk(compiled, info, tokens)
            rows.append({"vocabulary": vname, "vocab_size": info.vocab_size, "grammar": gname,
                         "tokens": len(tokens), "compile_s": compile_s,
                         "p50_ms": statistics.median(times) * 1000,
                         "p95_ms": statistics.quantiles(times, n=20)[18] * 1000, "max_ms": max(times) * 1000,
                         "last50_ms": statistics.fmean(times[-51:-1]) * 1000, "listing_ms": sum(times) * 1000})
        chain = next(r for r in rows if r["grammar"] == "chain")["listing_ms"]
        for r in rows:
            r["ratio_to_chain"] = r["listing_ms"] / chain
            print(f"{r['vocabulary']:12} {r['grammar']:14} {r['compile_s']:9.3f} {r['p50_ms']:8.3f} "
                  f"{r['p95_ms']:8.3f} {r['max_ms']:8.2f} {r['last50_ms']:10.3f} {r['listing_ms']:10.1f} "
                  f"{r['ratio_to_chain']:8.2f}")
        print(f"{'':12} ({len(tokens)} tokens of a {len(text)}-character listing)")
        results += rows
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
