"""Evaluate near-duplicate detection on the real clothing photos (an evaluation, not a test).

Positives: a sampled photo (stored) against a transformed copy of it (query): resize, low-quality
JPEG re-encode, crop up to 10%, a small price sticker, a brightness change. Negatives: distinct
photos, namely the hardest pairs in the dataset (closest perceptual hashes, typically the same bed
or floor) plus random pairs; each hard pair is also evaluated with every transformation applied
to its query side, so each transformation row has its own negatives. Pairs that are one
photograph stored twice in the dataset (identical pixels under two categories) are genuine
duplicates, so they are excluded from the negatives and listed in the output. A pair is predicted
duplicate when it passes candidate generation (min of phash/dhash distance <=
CANDIDATE_MAX_HAMMING) and the verifier confirms it. Hash-only baselines are printed alongside.

    .venv/bin/python infra/bench/eval_near_duplicates.py --n 300 --hard-negatives 1000 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from models.dedup import CANDIDATE_MAX_HAMMING, LocalFeatures, NearDuplicateVerifier  # noqa: E402
from models.hashing import ImageHashes, hamming, perceptual_hashes  # noqa: E402
from models.images import decode_image, load_image_file  # noqa: E402

DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "clothing-small"
SAME_PHOTO_MAX_MEAN_DIFF = 2.0  # grey levels; JPEG re-encoding of one photo stays well below
STRICT_HASH_THRESHOLD = 8  # a common "same image" cut-off for 64-bit phash, for the baseline row

Transform = Callable[[Image.Image, random.Random], Image.Image]


def _reencode(img: Image.Image, quality: int = 90) -> Image.Image:
    """Round-trip through JPEG bytes and the production decoder, as a re-upload would."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue()).image


def resize(img: Image.Image, rng: random.Random) -> Image.Image:
    scale = rng.uniform(0.4, 0.8)
    size = (round(img.width * scale), round(img.height * scale))
    return _reencode(img.resize(size, Image.Resampling.LANCZOS))


def jpeg_low(img: Image.Image, rng: random.Random) -> Image.Image:
    return _reencode(img, quality=rng.randint(20, 30))


def crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """Remove 4-10% of each dimension, split at random between the two opposite edges."""
    fx, fy = rng.uniform(0.04, 0.10), rng.uniform(0.04, 0.10)
    left = round(img.width * fx * rng.random())
    top = round(img.height * fy * rng.random())
    right = img.width - (round(img.width * fx) - left)
    bottom = img.height - (round(img.height * fy) - top)
    return _reencode(img.crop((left, top, right, bottom)))


def overlay(img: Image.Image, rng: random.Random) -> Image.Image:
    """A price sticker in a random corner, about a quarter of the width."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, img.height // 18))
    text = rng.choice(["$19.99", "€24,90", "SALE -30%", "NEW", "£9.50"])
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
    pad = max(4, img.height // 80)
    w, h = tx1 - tx0 + 2 * pad, ty1 - ty0 + 2 * pad
    margin = img.width // 25
    x = margin if rng.random() < 0.5 else img.width - w - margin
    y = margin if rng.random() < 0.5 else img.height - h - margin
    fill = rng.choice([(220, 30, 30), (255, 255, 255), (20, 20, 20), (250, 200, 0)])
    ink = (0, 0, 0) if sum(fill) > 400 else (255, 255, 255)
    draw.rectangle((x, y, x + w, y + h), fill=fill)
    draw.text((x + pad - tx0, y + pad - ty0), text, font=font, fill=ink)
    return _reencode(out)


def brightness(img: Image.Image, rng: random.Random) -> Image.Image:
    factor = rng.uniform(0.65, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 1.4)
    return _reencode(ImageEnhance.Brightness(img).enhance(factor))


TRANSFORMS: dict[str, Transform] = {
    "resize": resize,
    "jpeg_q20-30": jpeg_low,
    "crop<=10%": crop,
    "text_overlay": overlay,
    "brightness": brightness,
}


@dataclass
class PairResult:
    transform: str  # a TRANSFORMS key, or "none" for untransformed negatives
    kind: str  # positive | hard_negative | random_negative
    query_photo: str  # manifest path of the photo the query was made from
    stored_photo: str
    hash_distance: int
    candidate: bool
    inliers: int
    confirmed: bool
    agreement: float
    query_kp: int
    stored_kp: int


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, label: bool, predicted: bool) -> None:
        if label and predicted:
            self.tp += 1
        elif label:
            self.fn += 1
        elif predicted:
            self.fp += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def candidate_distance(a: ImageHashes, b: ImageHashes) -> int:
    """Distance the database search effectively applies: the nearer of the two hash kinds."""
    return min(hamming(a.phash, b.phash), hamming(a.dhash, b.dhash))


def _as_uint64(bits: list[str]) -> np.ndarray:
    return np.array([int(b, 2) for b in bits], dtype=np.uint64)


def hardest_pairs(hashes: list[ImageHashes], count: int) -> list[tuple[int, int]]:
    """The ``count`` distinct pairs with the smallest candidate distance (ties: phash+dhash)."""
    p = _as_uint64([h.phash for h in hashes])
    d = _as_uint64([h.dhash for h in hashes])
    n = len(hashes)
    dp = np.bitwise_count(p[:, None] ^ p[None, :]).astype(np.int32)
    dd = np.bitwise_count(d[:, None] ^ d[None, :]).astype(np.int32)
    score = np.minimum(dp, dd) * 256 + dp + dd
    iu, ju = np.triu_indices(n, k=1)
    flat = score[iu, ju]
    best = np.argpartition(flat, count)[:count]
    best = best[np.argsort(flat[best], kind="stable")]
    return [(int(iu[k]), int(ju[k])) for k in best]


def same_photograph(a: Image.Image, b: Image.Image) -> bool:
    """True when the dataset holds one photograph twice (re-encoded, e.g. under two categories).

    Such a pair is a genuine duplicate, so it cannot serve as a negative. Judged on pixels alone
    (mean absolute grey difference at equal size), independently of the method under test.
    """
    if a.size != b.size:
        return False
    diff = np.abs(np.asarray(a.convert("L"), np.int16) - np.asarray(b.convert("L"), np.int16))
    return float(diff.mean()) < SAME_PHOTO_MAX_MEAN_DIFF


def evaluate_pair(
    verifier: NearDuplicateVerifier,
    query_img: Image.Image,
    query_hashes: ImageHashes,
    stored_hashes: ImageHashes,
    stored_features: LocalFeatures,
    timings: list[tuple[float, float]],
) -> tuple[int, bool, int, bool, float, int]:
    dist = candidate_distance(query_hashes, stored_hashes)
    if dist > CANDIDATE_MAX_HAMMING:
        return dist, False, 0, False, 0.0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    q = verifier.features(query_img)
    match = verifier.match_features(q, stored_features, image_id=0, hamming=dist)
    timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    return dist, True, match.inliers, match.confirmed, match.agreement, q.count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--n", type=int, default=300, help="source photos for positives")
    ap.add_argument("--hard-negatives", type=int, default=1000)
    ap.add_argument("--random-negatives", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (1 = per-worker cost)")
    ap.add_argument("--dump", type=Path, help="write per-pair results as CSV for threshold tuning")
    args = ap.parse_args(argv)
    cv2.setNumThreads(args.threads)
    rng = random.Random(args.seed)

    with open(args.dataset / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    t0 = time.perf_counter()
    hashes = [perceptual_hashes(load_image_file(args.dataset / r["path"]).image) for r in rows]
    print(f"decoded+hashed {len(rows)} photos in {time.perf_counter() - t0:.1f}s")

    @functools.lru_cache(maxsize=256)  # decoded photos are ~0.6 MB each: load on demand
    def image(i: int) -> Image.Image:
        return load_image_file(args.dataset / rows[i]["path"]).image

    verifier = NearDuplicateVerifier()
    feature_cache: dict[int, LocalFeatures] = {}
    feat_times: list[float] = []

    def stored(i: int) -> LocalFeatures:
        if i not in feature_cache:
            start = time.process_time()
            feature_cache[i] = verifier.features(image(i))
            feat_times.append(time.process_time() - start)
        return feature_cache[i]

    sources = rng.sample(range(len(rows)), args.n)
    ranked = hardest_pairs(hashes, args.hard_negatives + 50)
    hard = [(a, b) for a, b in ranked if not same_photograph(image(a), image(b))][: args.hard_negatives]
    excluded = [(rows[a]["path"], rows[b]["path"]) for a, b in ranked[: len(hard)] if (a, b) not in hard]
    print(f"excluded {len(excluded)} hardest pairs that are one photograph stored twice: {excluded}")
    random_pairs: list[tuple[int, int]] = []
    while len(random_pairs) < args.random_negatives:
        a, b = rng.sample(range(len(rows)), 2)
        if not same_photograph(image(a), image(b)):
            random_pairs.append((a, b))

    results: list[PairResult] = []
    verify_times: list[tuple[float, float]] = []

    def run(kind: str, transform: str, a: int, b: int, query_img: Image.Image) -> None:
        qh = perceptual_hashes(query_img)
        sf = stored(b)
        dist, cand, inl, conf, agree, qkp = evaluate_pair(
            verifier, query_img, qh, hashes[b], sf, verify_times
        )
        paths = (rows[a]["path"], rows[b]["path"])
        results.append(PairResult(transform, kind, *paths, dist, cand, inl, conf, agree, qkp, sf.count))

    t0 = time.perf_counter()
    for name, fn in TRANSFORMS.items():
        for src in sources:
            run("positive", name, src, src, fn(image(src), rng))
        for a, b in hard:
            run("hard_negative", name, a, b, fn(image(a), rng))
    for a, b in hard:
        run("hard_negative", "none", a, b, image(a))
    for a, b in random_pairs:
        run("random_negative", "none", a, b, image(a))
    print(f"evaluated {len(results)} pairs in {time.perf_counter() - t0:.1f}s")

    if args.dump:
        with open(args.dump, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(PairResult.__dataclass_fields__)
            w.writerows([list(vars(r).values()) for r in results])

    report(results, verify_times, feat_times, args)
    return 0


def _best_hash_threshold(results: list[PairResult]) -> tuple[int, Counts] | None:
    """Largest hash-only threshold whose overall precision is still >= 0.99, if any."""
    best = None
    for t in range(0, 33):
        c = Counts()
        for r in results:
            c.add(r.kind == "positive", r.hash_distance <= t)
        if c.tp and c.precision >= 0.99:
            best = (t, c)
    return best


def report(
    results: list[PairResult],
    verify_times: list[tuple[float, float]],
    feat_times: list[float],
    args: argparse.Namespace,
) -> None:
    base_t = _best_hash_threshold(results)
    strict, loose = f"hash<={STRICT_HASH_THRESHOLD} P/R", f"hash<={CANDIDATE_MAX_HAMMING} P/R"
    header = (
        f"{'transform':<13} {'pos':>5} {'neg':>5} | {'precision':>9} {'recall':>7} {'FP':>4} {'FN':>4} | "
        f"{strict:>13} {loose:>13}"
    )
    print()
    print(
        f"near-duplicate evaluation: {args.n} source photos, {args.hard_negatives} hardest + "
        f"{args.random_negatives} random negative pairs, seed {args.seed}, "
        f"candidates: min(phash,dhash) <= {CANDIDATE_MAX_HAMMING}"
    )
    print(header)
    print("-" * len(header))
    for name in [*TRANSFORMS, "none", "overall"]:
        sel = [r for r in results if name == "overall" or r.transform == name]
        pipe, strict_c, loose_c = Counts(), Counts(), Counts()
        for r in sel:
            label = r.kind == "positive"
            pipe.add(label, r.candidate and r.confirmed)
            strict_c.add(label, r.hash_distance <= STRICT_HASH_THRESHOLD)
            loose_c.add(label, r.candidate)
        pos = sum(r.kind == "positive" for r in sel)
        print(
            f"{name:<13} {pos:>5} {len(sel) - pos:>5} | {_fmt(pipe.precision):>9} {_fmt(pipe.recall):>7} "
            f"{pipe.fp:>4} {pipe.fn:>4} | {_pr(strict_c):>13} {_pr(loose_c):>13}"
        )
    wall = np.array([w for w, _ in verify_times]) * 1000
    cpu = np.array([c for _, c in verify_times]) * 1000
    print()
    print(
        f"verified pairs: {len(verify_times)}; per verified pair (query features + matching + RANSAC + "
        f"photometric check): {cpu.mean():.1f} ms CPU, {wall.mean():.1f} ms wall "
        f"(p95 {np.percentile(wall, 95):.1f}); "
        f"stored-image features: {1000 * np.mean(feat_times):.1f} ms CPU each (cacheable)"
    )
    print(
        "hash-only baseline, largest threshold keeping overall precision >= 0.99: "
        + ("none" if base_t is None else f"<= {base_t[0]}, P/R {_pr(base_t[1])}")
    )
    false_pos = [r for r in results if r.kind != "positive" and r.candidate and r.confirmed]
    for r in false_pos[:10]:
        print(f"  false positive: {r}")


def _pr(c: Counts) -> str:
    return f"{_fmt(c.precision)}/{_fmt(c.recall)}"


def _fmt(x: float) -> str:
    return "  n/a" if x != x else f"{x:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
