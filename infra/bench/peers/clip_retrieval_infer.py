"""clip-retrieval side of bench_embeddings_only.py: run with the peer venv's Python
(clip-retrieval 2.45.0), never the project's. Runs its batch inference (``clip_inference``,
files input, images only, batch size as given) on a folder of the photos with open_clip ViT-B-32
loaded from a random-init checkpoint file (no hub here). A warm-up run on the first 8 photos loads
the model (clip-retrieval's loader caches it in the process); the run over every photo is timed.
Prints one JSON line.

    peers-cr-venv/bin/python clip_retrieval_infer.py --folder DIR --checkpoint FILE.pt --work DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepro-workers", type=int, default=1)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from clip_retrieval.clip_inference.main import main as clip_inference

    def run(folder: Path, out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        clip_inference(input_dataset=str(folder), output_folder=str(out), input_format="files",
                       batch_size=args.batch_size, num_prepro_workers=args.prepro_workers, enable_text=False,
                       enable_image=True, enable_metadata=False, clip_model=f"open_clip:ViT-B-32/{args.checkpoint}",
                       use_jit=False, enable_wandb=False)
        return time.perf_counter() - started

    warm = args.work / "warm-up"
    shutil.rmtree(warm, ignore_errors=True)
    warm.mkdir(parents=True)
    for link in sorted(args.folder.iterdir())[:8]:
        (warm / link.name).symlink_to(link.resolve())
    first = run(warm, args.work / "cr-out-1")
    seconds = run(args.folder, args.work / "cr-out-2")
    vectors = np.concatenate([np.load(p) for p in sorted((args.work / "cr-out-2" / "img_emb").glob("*.npy"))])
    photos = sum(1 for _ in args.folder.iterdir())
    print(json.dumps({"system": "clip-retrieval", "photos": photos, "seconds": seconds, "warm_up_s": first,
                      "items_per_s": photos / seconds, "vectors": int(vectors.shape[0]), "dims": int(vectors.shape[1]),
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
