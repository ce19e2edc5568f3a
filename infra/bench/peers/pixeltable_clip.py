"""Pixeltable side of bench_embeddings_only.py: run with the peer venv's Python (pixeltable 0.7.21,
transformers), never the project's. Inserts the photos into a table whose embedding index is
Pixeltable's CLIP UDF (``pixeltable.functions.huggingface.clip``, batch size 32, stored in its
pgvector index), and prints one JSON line: photos, seconds, items/s.

The CLIP is ViT-B/32 with random weights (HF ``CLIPModel`` at ViT-B/32's sizes, saved to a local
directory: no hub here), its tokenizer rebuilt from open_clip's BPE vocabulary.

    peers-venv/bin/python pixeltable_clip.py --photos LIST.txt --work DIR [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def random_clip_dir(out: Path) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    if (out / "config.json").exists():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    (out / "vocab.json").write_text(json.dumps(tok.encoder))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(projection_dim=512))  # the defaults are ViT-B/32's text and vision sizes
    model.save_pretrained(out)
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["PIXELTABLE_HOME"] = str(args.work / "pxt-home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    model_dir = random_clip_dir(args.work / "hf-clip-vitb32-random")
    import pixeltable as pxt
    from pixeltable.functions.huggingface import clip

    paths = [line for line in args.photos.read_text().splitlines() if line]
    pxt.drop_table("bench_photos", if_not_exists="ignore")
    t = pxt.create_table("bench_photos", {"img": pxt.Image})
    t.add_embedding_index("img", embedding=clip.using(model_id=model_dir))  # pgvector HNSW in Pixeltable's store
    t.insert([{"img": paths[0]}])  # warm-up: loads the model, outside the timing
    started = time.perf_counter()
    t.insert([{"img": p} for p in paths])
    seconds = time.perf_counter() - started
    rows = t.count()
    sim = t.img.similarity(image=paths[1])
    top = t.order_by(sim, asc=False).limit(1).select(t.img.localpath).collect()
    print(json.dumps({"system": "pixeltable", "photos": len(paths), "seconds": seconds,
                      "items_per_s": len(paths) / seconds, "rows": rows, "index_query_ok": len(top) == 1,
                      "version": pxt.__version__, "threads": args.threads}))


if __name__ == "__main__":
    main()
