"""The GPU worker's batch path without broker or database (not a test).

``run_model_batch`` is what a GPU worker calls for every micro-batch it collects: ground and embed
every photo, describe the attributes, verify them with CLIP, write and check the text. This script
runs it over real photos at several batch sizes and prints, per batch size, products/s, the
milliseconds per product each stage took (the worker's own stage clock) and the accelerator's peak
memory. With ``bench_models.py`` (each model alone on ready inputs) it says how much of the worker's
time is model compute; with ``bench_pipeline.py`` (broker, database, worker processes) how much the
orchestration around it costs.

    .venv/bin/python infra/bench/bench_gpu_worker.py --profile random-full --device cuda --batch-sizes 8,32
    .venv/bin/python infra/bench/bench_gpu_worker.py --profile tiny --device cpu --n 8 --batch-sizes 2,4

Random weights (tiny / random-full) measure compute, not quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DATASET = REPO.parent / "shared" / "datasets" / "clothing-small"


def photo_items(n: int, dataset: Path) -> list:
    from models.batch import ModelItem
    from models.images import ImageLimits, load_image_file

    with open(dataset / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "validation"]
    rows = rows[:: max(1, len(rows) // n)][:n]
    return [ModelItem(job_id=i, image=load_image_file(dataset / r["path"], ImageLimits()).image, category=r["category"],
                      title=f"{r['category']} item", description="Photographed on a hanger.",
                      attributes={"brand": "Acme"}, locale="en") for i, r in enumerate(rows)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=64, help="distinct photos (products) per batch-size cell")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--grammar-overlap", choices=("on", "off", "both"), default="on",
                    help="grammar masks filled during the forward pass; both: each batch size twice, off then on")
    ap.add_argument("--dataset", type=Path, default=DATASET)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from models.batch import run_model_batch
    from models.factory import ModelConfig, build_models

    bundle = build_models(ModelConfig(profile=args.profile, device=args.device, max_new_tokens=args.max_new_tokens,
                                      cache_dir=Path(tempfile.mkdtemp(prefix="bench-gpu-worker-"))))
    items = photo_items(args.n, args.dataset)
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    run_model_batch(bundle, items[:2])  # load every model and compile the grammars out of the timing
    load_s = time.perf_counter() - t0
    print(f"models loaded and warmed in {load_s:.1f} s ({args.profile}, {args.device})", flush=True)
    print(f"{'batch':>5} {'overlap':>7} {'products':>8} {'products/s':>10} {'peak_MiB':>9}  ms per product by stage",
          flush=True)
    cells = []
    modes = ["off", "on"] if args.grammar_overlap == "both" else [args.grammar_overlap]
    for batch, mode in [(int(b), m) for b in args.batch_sizes.split(",") if b for m in modes]:
        bundle.generator.set_grammar_overlap(mode == "on")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stage_ms: dict[str, float] = defaultdict(float)
        errors = 0
        start = time.perf_counter()
        for i in range(0, len(items), batch):
            for result in run_model_batch(bundle, items[i:i + batch]):
                errors += result.error is not None
                for name, ms in result.timings_ms.items():
                    stage_ms[name] += ms
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        per_product = {k: round(v / len(items), 1) for k, v in sorted(stage_ms.items())}
        cell = {"batch": batch, "grammar_overlap": mode == "on", "products": len(items), "errors": errors,
                "seconds": round(seconds, 3),
                "products_per_s": round(len(items) / seconds, 3), "peak_mib": None if peak is None else round(peak),
                "stage_ms_per_product": per_product}
        cells.append(cell)
        stages = " ".join(f"{k}={v}" for k, v in per_product.items())
        print(f"{batch:5d} {mode:>7} {len(items):8d} {cell['products_per_s']:10.2f} {cell['peak_mib'] or '-':>9}"
              f"  {stages}"
              + (f"  ({errors} errors)" if errors else ""), flush=True)
    if args.out:
        meta = {"profile": args.profile, "device": args.device, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if cuda else None, "load_s": round(load_s, 1),
                "max_new_tokens": args.max_new_tokens, "random_weights": args.profile != "pretrained"}
        args.out.write_text(json.dumps({"meta": meta, "cells": cells}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
