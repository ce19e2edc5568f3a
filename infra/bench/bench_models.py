"""Bare model-stage benchmark: throughput (items/s) and peak memory per stage and batch size.

This is the reference the pipeline benchmark is measured against: each stage is called directly on
real photos from the clothing dataset, with no broker, database or fetch in the way. Profiles:

* ``tiny``        - the test architectures (seconds; checks the harness, says little about production),
* ``random-full`` - production-size architectures with random weights (open_clip ViT-B-32, OWLv2
                    base-patch16 at 960 px, the default VLM's config): same compute as the pretrained
                    models, so throughput and memory are meaningful even though outputs are not.

Memory is the process's peak RSS during the cell on CPU (sampled; ``rss_delta_mb`` is above the
level before the cell, models already loaded) and ``torch.cuda.max_memory_allocated`` on CUDA.

    .venv/bin/python infra/bench/bench_models.py --profiles tiny,random-full --out bench-models.json
    .venv/bin/python infra/bench/bench_models.py --device cuda --full-batch-sizes 1,8,32
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.factory import ModelBundle, ModelConfig, build_models  # noqa: E402

DATASET = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "clothing-small"
STAGES = ("grounding", "clip_image", "clip_text", "verify", "listing")


@dataclass
class Cell:
    profile: str
    stage: str
    batch: int
    device: str
    iterations: int = 0
    seconds: float = 0.0
    items_per_s: float | None = None
    peak_mb: float | None = None
    delta_mb: float | None = None
    note: str = ""


class PeakRss:
    """Samples this process's RSS every 20 ms; cheap enough not to disturb CPU timings."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.base = self.peak = self._proc.memory_info().rss

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def load_photos(n: int) -> list[tuple[Image.Image, str]]:
    with open(DATASET / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "validation"]
    rows = rows[:: max(1, len(rows) // n)][:n]
    return [(Image.open(DATASET / r["path"]).convert("RGB"), r["category"]) for r in rows]


def make_inputs(bundle: ModelBundle, photos: list[tuple[Image.Image, str]]) -> dict[str, Any]:
    from models.categories import resolve_schema
    from models.embeddings import visual_description

    schemas = [resolve_schema(c) for _, c in photos]
    generated = [{"title": f"{s.name} listing", "description": "benchmark input",
                  "attributes": {k: v[0] for k, v in s.visual_attributes.items()}} for s in schemas]
    texts = [visual_description(s.name, g["attributes"]) for s, g in zip(schemas, generated)]
    return {"images": [p for p, _ in photos], "categories": [c for _, c in photos], "schemas": schemas,
            "generated": generated, "texts": texts}


def stage_fn(bundle: ModelBundle, stage: str, inputs: dict[str, Any], batch: int, max_new_tokens: int
             ) -> Callable[[], Any]:
    n = len(inputs["images"])
    pick = lambda key: [inputs[key][i % n] for i in range(batch)]  # noqa: E731
    if stage == "grounding":
        return lambda: bundle.grounder.predict(pick("images"), pick("categories"))
    if stage == "clip_image":
        return lambda: bundle.embedder.embed_images(pick("images"))
    if stage == "clip_text":
        return lambda: bundle.embedder.embed_texts(pick("texts"))
    if stage == "verify":
        return lambda: bundle.verifier.verify(pick("images"), pick("generated"), pick("schemas"), [{}] * batch)
    if stage == "listing":
        from models.listing import ListingRequest

        requests = [ListingRequest(image=im, schema=s, merchant_title="benchmark product")
                    for im, s in zip(pick("images"), pick("schemas"))]
        return lambda: bundle.generator.predict(requests, max_new_tokens=max_new_tokens)
    raise ValueError(stage)


def load_stage(bundle: ModelBundle, stage: str) -> None:
    if stage == "grounding":
        bundle.grounder.load()
    elif stage in {"clip_image", "clip_text", "verify"}:
        bundle.embedder.load()
    else:
        bundle.generator.load()


def measure(fn: Callable[[], Any], warm: Callable[[], Any], device: torch.device, *, min_iters: int,
            max_seconds: float) -> dict[str, float]:
    # Warm-up at batch 1 (one-time costs: kernels, allocator, prompt caches) without paying a full
    # real-size batch on CPU twice.
    warm()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    iterations, start = 0, time.perf_counter()
    with PeakRss() as rss:
        while iterations < min_iters and (iterations == 0 or time.perf_counter() - start < max_seconds):
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            iterations += 1
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        delta = None
    else:
        peak, delta = rss.peak / 2**20, (rss.peak - rss.base) / 2**20
    return {"iterations": iterations, "seconds": elapsed, "peak_mb": peak, "delta_mb": delta}


def write_json(args: argparse.Namespace, cells: list[Cell]) -> None:
    """Rewritten after every cell, so an interrupted real-size CPU run keeps what it measured."""
    if not args.out:
        return
    meta = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "max_new_tokens": args.max_new_tokens, "random_weights": True}
    args.out.write_text(json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=2))


def run(args: argparse.Namespace) -> list[Cell]:
    photos = load_photos(max(32, max(args.batch_sizes + args.full_batch_sizes)))
    cells: list[Cell] = []
    for profile in args.profiles:
        config = ModelConfig(profile=profile, device=args.device, cache_dir=Path(args.cache_dir),
                             detection_threshold=0.2, verify_margin=0.05, max_new_tokens=args.max_new_tokens)
        bundle = build_models(config)
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        inputs = make_inputs(bundle, photos)
        sizes = args.batch_sizes if profile == "tiny" else args.full_batch_sizes
        for stage in args.stages:
            try:
                t0 = time.perf_counter()
                load_stage(bundle, stage)
                load_s = time.perf_counter() - t0
            except ImportError as exc:
                cells.append(Cell(profile, stage, 0, str(device), note=f"skipped: {exc}"))
                print(f"{profile:11s} {stage:10s} skipped ({exc})", flush=True)
                continue
            for batch in sizes:
                fn = stage_fn(bundle, stage, inputs, batch, args.max_new_tokens)
                warm = stage_fn(bundle, stage, inputs, 1, args.max_new_tokens)
                m = measure(fn, warm, device, min_iters=args.min_iters, max_seconds=args.max_seconds)
                cell = Cell(profile, stage, batch, str(device), int(m["iterations"]), round(m["seconds"], 3),
                            round(batch * m["iterations"] / m["seconds"], 2), round(m["peak_mb"], 1),
                            None if m["delta_mb"] is None else round(m["delta_mb"], 1),
                            note=f"load {load_s:.1f}s" + (f", {args.max_new_tokens} new tokens max"
                                                          if stage == "listing" else ""))
                cells.append(cell)
                print(format_row(cell), flush=True)
                write_json(args, cells)
        del bundle
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return cells


def format_row(c: Cell) -> str:
    ips = "-" if c.items_per_s is None else f"{c.items_per_s:9.2f}"
    peak = "-" if c.peak_mb is None else f"{c.peak_mb:8.0f}"
    delta = "-" if c.delta_mb is None else f"{c.delta_mb:7.0f}"
    return f"{c.profile:11s} {c.stage:10s} {c.batch:5d} {c.iterations:5d} {ips:>9s} {peak:>8s} {delta:>7s}  {c.note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv_ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    csv_strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--profiles", type=csv_strs, default=["tiny", "random-full"])
    parser.add_argument("--stages", type=csv_strs, default=list(STAGES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-sizes", type=csv_ints, default=[1, 8, 32], help="tiny profile batch sizes")
    parser.add_argument("--full-batch-sizes", type=csv_ints, default=[1, 8, 32],
                        help="random-full batch sizes (use 1,8 on CPU to bound the run)")
    parser.add_argument("--min-iters", type=int, default=3, help="timed calls per cell, unless --max-seconds passes")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="stop timing a cell after this (>= 1 call)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="listing stage token budget")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--cache-dir", default="/tmp/catalog-enrich-bench-cache")
    parser.add_argument("--out", type=Path, default=None, help="write the cells as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} CPU threads, "
          f"{platform.processor() or platform.machine()}; random weights: throughput only, outputs meaningless")
    print(f"{'profile':11s} {'stage':10s} {'batch':>5s} {'iters':>5s} {'items/s':>9s} {'peak MB':>8s} "
          f"{'+MB':>7s}  note")
    write_json(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
