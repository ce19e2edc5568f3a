"""Near-duplicate decision: perceptual-hash candidates confirmed by local-feature verification.

Hash distance alone cannot decide. In the clothing photos, different garments shot on the same bed
or floor can be 0-6 bits apart, while an 8% crop or a price sticker on a true copy moves the hash
10-24 bits. So the database proposes candidates generously (nearest ``CANDIDATE_K`` by Hamming on
phash and on dhash, each the nearest of a plain, a trimmed, a mirrored and a centre comparison:
``models.hashing``), within ``CANDIDATE_MAX_HAMMING``, and each one is confirmed here by an
independent signal: ORB keypoints matched with Lowe's ratio test, then a RANSAC similarity
transform (rotation, uniform scale, translation: what resizing, cropping, letterboxing, a small
turn and re-encoding produce), tried on the image and on its mirror (a flipped re-upload has no
ORB matches otherwise). A fit that turns more than ``max_rotation_deg`` is no re-upload.

Inliers alone still overlap on this data (a textured bedspread behind two different shirts can
give 40-60 inliers), so the fitted transform is then checked photometrically, in *both* images'
frames: each image in turn is the grid, the other is warped onto it, and every cell of a 4x4
grid gets the best of three brightness- and contrast-invariant agreements (``cell_agreement``:
whole-cell NCC of grey levels and of gradient magnitude, and a local, polarity-free NCC that also
survives a background re-coloured around an unchanged garment). A copy agrees almost everywhere
except under a sticker; a different garment on the same background disagrees wherever the garment
is. Two order statistics decide: the cell at rank ``tolerated_cells`` from the worst (a sticker, a
re-coloured edge may disagree) and the four *central* cells, each of which must agree on its own:
the garment is what a product photo centres on, so a garment-sized disagreement there is never
outvoted by agreeing background, however much of it there is. A central cell that scores lower
passes only when what disagrees in it is thin: a background changed around the garment changes
the garment's outline (its edge contrast flips, vanishes or gains a halo), a strip a few windows
wide, while a different garment disagrees over an area (``_solid_disagreement``).

The decision is symmetric by construction: the pair is put in a canonical order (a digest of each
image's thumbnail) before matching, so RANSAC's sampling cannot depend on which image is the
query, and the photometric check already measures both frames.

Everything here is a pure function of pixels: no database, no environment.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# Candidate generation runs in Postgres (pgvector Hamming on bit(64)), in
# db/repositories/images.py: near_candidates. On the clothing photos
# (infra/bench/eval_near_duplicates.py) every transformed copy stayed within 19 bits on at least
# one hash kind (a 10% crop is the worst case; resize/JPEG stay <= 3; letterboxing and mirroring
# are far on the plain hashes and within 4 on the trimmed and mirrored ones; a re-coloured
# background is far on those for about one copy in ten, nearer on the centre ones), while unrelated
# photos sit around 29 bits. 22 leaves a margin; about 12% of random pairs also fall within it,
# which is harmless because precision comes from verification, not from the hash.
CANDIDATE_MAX_HAMMING = 22
# Neighbours fetched per hash kind: photos shot by one merchant on one background crowd the top
# of the list, so k leaves room past them. Cost is bounded at 2 * k verifications. Every copy the
# evaluation found ranked within the 12 nearest on both splits (its --dump records the rank); k = 8
# would halve the verifications of a large catalogue and lose about one copy in 450 on train (README).
CANDIDATE_K = 16

WORK_SIDE = 512  # longest side of the working greyscale image (up- or down-scaled to it)
_THUMB_FACTOR = 4  # the photometric check runs at WORK_SIDE / 4: detail beyond that is JPEG noise
_GRID = 4
_CENTRAL = 0.25  # cells whose centre is within this of the image centre (the middle 2x2 of 4x4)
_BLUR_SIGMA = 1.0  # thumbnail pixels: resampling two thumbnails never aligns finer than this
_LOCAL_WINDOW = 5  # thumbnail pixels: small enough that a window rarely spans more than two regions
_LOCAL_TEXTURE = 3.0  # grey-level std below which a window carries no local evidence
_MIN_LOCAL_PIXELS = 10  # textured windows a cell needs before their local agreement counts
_FLAT_STD = 2.0  # grey-level std of a cell with no texture (studio white, a saturated wall)
_FAINT_STD = 8.0  # texture this faint can vanish under a brightness change or JPEG smoothing
_DISAGREE = 0.5  # local |NCC| below which a textured window disagrees
_SOLID_SIDE = 13  # thumbnail pixels (a tenth of the side): the neighbourhood telling an area from a contour


@dataclass(frozen=True)
class LocalFeatures:
    """What verification needs of one image; a pure function of its pixels, so cache it by image id.

    ``points`` are ORB keypoint positions in the working image (longest side ``WORK_SIDE``, shape
    ``work_shape``), ``thumb`` is the greyscale image at about 1/_THUMB_FACTOR of that, for the
    photometric check; ``mirrored`` the same of the image flipped left-right; ``key`` orders a
    pair canonically.
    """

    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray  # (n, 32) uint8
    thumb: np.ndarray  # (h, w) uint8
    work_shape: tuple[int, int] = (0, 0)
    key: bytes = b""
    mirrored: LocalFeatures | None = None

    @property
    def count(self) -> int:
        return int(self.points.shape[0])


@dataclass
class DuplicateCandidate:
    """A stored image proposed by hash search. Pass cached ``features`` to skip extraction."""

    image_id: int
    image: Image.Image | None
    hamming: int
    features: LocalFeatures | None = None


@dataclass(frozen=True)
class DuplicateMatch:
    """Verification outcome for one candidate. ``agreement`` is the photometric score (-1..1) at
    rank ``tolerated_cells``, ``central`` the worst central cell's, both the lower of the two
    frames; ``mirrored``: confirmed on the mirror image."""

    image_id: int
    hamming: int
    inliers: int
    confirmed: bool
    agreement: float = 0.0
    central: float = 0.0
    mirrored: bool = False


def _working_gray(img: Image.Image) -> np.ndarray:
    gray = img.convert("L")
    scale = WORK_SIDE / max(gray.size)
    # Upscaling small copies too puts both images on one scale, which roughly doubles the
    # keypoints ORB finds on a thumbnail-sized re-upload.
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    if size != gray.size:
        resample = Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.LANCZOS
        gray = gray.resize(size, resample)
    return np.asarray(gray, dtype=np.uint8)


def _stretch_contrast(gray: np.ndarray) -> np.ndarray:
    """Map the 1st..99th percentile to 0..255 so ORB's fixed corner threshold finds comparable
    keypoints in a darkened or washed-out copy of a low-contrast photo."""
    lo, hi = np.percentile(gray, (1, 99))
    if hi - lo < 1:
        return gray
    # The mapping of each of the 256 levels, applied as a lookup: the same arithmetic per value as
    # mapping every pixel (so the same bytes), at half the cost of the whole stretch.
    levels = (np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return cv2.LUT(gray, np.clip(levels, 0, 255).astype(np.uint8))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = float(a.std()), float(b.std())
    if sa < 1e-6 or sb < 1e-6:
        return 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def _gradient_magnitude(img: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy)


@dataclass(frozen=True)
class CellScore:
    score: float
    central: bool
    solid: float | None = None  # share of the cell's textured windows in solid disagreement (None: too few)


def _local_agreement(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: |NCC| of the two images over a ``_LOCAL_WINDOW`` square (there a region whose
    brightness changed on its own, or a step edge whose contrast flipped, still correlates), 0
    where one side is flat; and the window's texture (the larger of the two grey-level stds)."""
    v = valid.astype(np.float32)
    window = (_LOCAL_WINDOW, _LOCAL_WINDOW)
    n = cv2.boxFilter(v, -1, window, normalize=False) + 1e-6

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x * v, -1, window, normalize=False) / n

    ma, mb = mean(a), mean(b)
    sa = np.sqrt(np.maximum(mean(a * a) - ma * ma, 0.0))
    sb = np.sqrt(np.maximum(mean(b * b) - mb * mb, 0.0))
    r = np.minimum(np.abs(mean(a * b) - ma * mb) / np.maximum(sa * sb, 1e-3), 1.0)
    return np.where(np.minimum(sa, sb) < 1.0, 0.0, r), np.maximum(sa, sb)


def _solid_disagreement(local: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """Textured windows that disagree (local |NCC| below ``_DISAGREE``) where most of the textured
    windows around them (a ``_SOLID_SIDE`` square) disagree too: an area, not a contour.

    A background changed around an unchanged garment disagrees along the garment's outline (the
    edge's contrast flips, vanishes against a backdrop of the garment's brightness, or gains a
    halo) and, where the new backdrop flattened the old one's texture, in thin lines; both are a
    few windows wide, so their neighbourhoods are mostly agreement. A different garment disagrees
    over its whole area."""
    ev = evidence.astype(np.float32)
    bad = (evidence & (local < _DISAGREE)).astype(np.float32)
    side = (_SOLID_SIDE, _SOLID_SIDE)
    around = np.maximum(cv2.boxFilter(ev, -1, side, normalize=False), 1e-6)
    share = cv2.boxFilter(bad, -1, side, normalize=False) / around
    return (bad > 0) & (share > 0.5)


def cell_agreement(query: np.ndarray, warped: np.ndarray, valid: np.ndarray) -> list[CellScore]:
    """Per grid cell over the pixels both images cover (cells mostly outside are skipped), the
    highest of three agreements on the lightly blurred images: NCC of the grey levels, NCC of
    their gradient magnitude, and the texture-weighted mean of the local (5x5) |NCC| map; and the
    share of the cell's textured windows in solid disagreement (``_solid_disagreement``).

    The first two see a copy under a brightness or contrast change; the local one also sees a
    cell where garment and background changed differently (a re-coloured backdrop brightens or
    darkens the background alone, and may flip the contrast at the garment's edge), which no
    single linear map of the whole cell explains. A different garment disagrees in all three, and
    over an area.

    A flat cell against a faint one (a wall brightened into saturation) is no evidence and is
    skipped; a flat cell against real texture (a garment where the other image has bare
    background) disagrees (0.0)."""
    h, w = query.shape
    a = cv2.GaussianBlur(query.astype(np.float32), (0, 0), _BLUR_SIGMA)
    b = cv2.GaussianBlur(warped.astype(np.float32), (0, 0), _BLUR_SIGMA)
    ga, gb = _gradient_magnitude(a), _gradient_magnitude(b)
    local, texture = _local_agreement(a, b, valid)
    evidence = (texture >= _LOCAL_TEXTURE) & valid
    solid = _solid_disagreement(local, evidence)
    scores: list[CellScore] = []
    for i in range(_GRID):
        for j in range(_GRID):
            rows = slice(i * h // _GRID, (i + 1) * h // _GRID)
            cols = slice(j * w // _GRID, (j + 1) * w // _GRID)
            mask = valid[rows, cols]
            if mask.size == 0 or mask.mean() < 0.5:
                continue
            central = abs((i + 0.5) / _GRID - 0.5) <= _CENTRAL and abs((j + 0.5) / _GRID - 0.5) <= _CENTRAL
            raw_a, raw_b = query[rows, cols][mask], warped[rows, cols][mask]
            sa, sb = float(raw_a.std()), float(raw_b.std())
            if min(sa, sb) < _FLAT_STD:
                if max(sa, sb) >= _FAINT_STD:
                    scores.append(CellScore(0.0, central))
                continue
            score = max(_ncc(a[rows, cols][mask], b[rows, cols][mask]),
                        _ncc(ga[rows, cols][mask], gb[rows, cols][mask]))
            textured = texture[rows, cols][mask]
            weight = np.where(textured >= _LOCAL_TEXTURE, textured, 0.0)
            share = None
            if np.count_nonzero(weight) >= _MIN_LOCAL_PIXELS:
                score = max(score, float((local[rows, cols][mask] * weight).sum() / weight.sum()))
                share = float(solid[rows, cols][mask].sum() / np.count_nonzero(weight))
            scores.append(CellScore(score, central, share))
    return scores


def _thumb_map(transform: np.ndarray, src: LocalFeatures, dst: LocalFeatures) -> np.ndarray:
    """The working-pixel similarity src -> dst as a map between their thumbnails, with each
    thumbnail's exact scale and pixel centres (a floor in the thumbnail size would otherwise
    misalign the far edge by a pixel)."""
    def to_thumb(f: LocalFeatures) -> np.ndarray:
        (th, tw), (wh, ww) = f.thumb.shape, f.work_shape
        sx, sy = tw / ww, th / wh
        return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])

    full = np.vstack([transform, [0.0, 0.0, 1.0]])
    return (to_thumb(dst) @ full @ np.linalg.inv(to_thumb(src)))[:2]


def _warp_onto(grid: np.ndarray, other: np.ndarray,
               grid_to_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``other`` resampled on ``grid``'s pixels, and where it covers them (eroded: the edge pixel
    mixes with the border)."""
    h, w = grid.shape
    inverse = cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(other, grid_to_other, (w, h), flags=cv2.INTER_LINEAR | inverse)
    covered = cv2.warpAffine(np.ones_like(other), grid_to_other, (w, h), flags=cv2.INTER_NEAREST | inverse)
    return warped, cv2.erode(covered, np.ones((3, 3), np.uint8)).astype(bool)


def nearest_two(query: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Hamming distances, indices) of each query descriptor's two nearest ``train`` descriptors,
    nearest first, as ``[n, 2]`` arrays. What a brute-force matcher's ``knnMatch(k=2)`` computes (it
    calls ``batchDistance`` itself), without a DMatch object per match and a Python loop over them:
    1.05 -> 0.63 ms per candidate, full fit and probe. Which of two equally near descriptors comes
    first cannot change a decision: a tie for the nearest fails the ratio test. ``train`` needs at
    least two rows."""
    return cv2.batchDistance(query, train, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2, update=0,
                             crosscheck=False)


class NearDuplicateVerifier:
    """Confirms hash candidates: ORB matches -> RANSAC similarity (image or mirror) -> per-cell
    photometric agreement in both frames.

    Defaults were tuned on the train split of the clothing photos with
    infra/bench/eval_near_duplicates.py: ``min_inliers`` RANSAC inliers are needed before the
    photometric check is even meaningful; ``min_agreement`` is the score the cell at rank
    ``tolerated_cells`` (from the worst) must reach, so up to ``tolerated_cells`` of the 16 cells
    may disagree (a price sticker, a re-coloured background at the garment's edge);
    ``min_cells`` is the fewest informative overlapping cells that can support a decision. Every
    informative central cell must reach ``min_central_agreement``, or else reach
    ``min_excused_central`` with at most ``max_central_solid`` of its textured windows in solid
    disagreement: what pulls a central cell of a background-changed copy down is the garment's
    outline (thin), what pulls a different garment's down is its area.

    Before the full match of an orientation, a *probe* matches every ``probe_stride``-th query
    keypoint and fits RANSAC on those matches; fewer than ``probe_min_inliers`` inliers there ends
    that orientation. A copy with ``min_inliers`` inliers keeps about 1/stride of them in the probe,
    while unrelated photos keep little more than RANSAC's minimal pair, so most candidates that are no
    copy cost two 1/stride matchings instead of two full ones. On the validation split every decision
    was the same with and without it (``eval_near_duplicates.py --probe-stride 0``), at 3.6 instead of
    9.5 ms CPU per verified pair.

    ``max_features`` ORB keypoints per image: matching costs the product of the two images' counts, and
    the photometric check, not the inlier count, is what tells a copy from a different garment on the
    same background (negatives reach 300-600 inliers). 500 keypoints with ``min_inliers`` 16 gave the
    same precision and recall as 1,000 with 25 on the validation split (and symmetric decisions), and
    within one pair of it on the train split, at a third of the matching cost (README, "Near
    duplicates"). Persisted features hold this many keypoints (``models.dedup_io.FEATURES_FORMAT``).
    """

    def __init__(
        self,
        *,
        min_inliers: int = 16,
        min_agreement: float = 0.6,
        min_central_agreement: float = 0.8,
        min_excused_central: float = 0.6,
        max_central_solid: float = 0.12,
        tolerated_cells: int = 3,
        min_cells: int = 8,
        max_rotation_deg: float = 10.0,
        ratio_test: float = 0.8,
        ransac_threshold_px: float = 4.0,
        max_features: int = 500,
        probe_stride: int = 4,
        probe_min_inliers: int = 3,
    ) -> None:
        self.min_inliers = min_inliers
        self.min_agreement = min_agreement
        self.min_central_agreement = min_central_agreement
        self.min_excused_central = min_excused_central
        self.max_central_solid = max_central_solid
        self.tolerated_cells = tolerated_cells
        self.min_cells = min_cells
        self.max_rotation_deg = max_rotation_deg
        self.ratio_test = ratio_test
        self.ransac_threshold_px = ransac_threshold_px
        self.probe_stride = probe_stride
        self.probe_min_inliers = probe_min_inliers
        self._orb = cv2.ORB_create(nfeatures=max_features)
        self._nearest = nearest_two

    def _one_orientation(self, gray: np.ndarray, stretched: np.ndarray) -> LocalFeatures:
        """Features of one orientation: ORB on ``stretched`` (``_stretch_contrast`` of ``gray``), the
        thumbnail of ``gray`` itself."""
        keypoints, descriptors = self._orb.detectAndCompute(stretched, None)
        if descriptors is None or not keypoints:
            points = np.empty((0, 2), np.float32)
            descriptors = np.empty((0, 32), np.uint8)
        else:
            points = cv2.KeyPoint_convert(keypoints)  # (n, 2) float32, as the keypoints hold them
        h, w = gray.shape
        thumb = cv2.resize(
            gray, (max(1, w // _THUMB_FACTOR), max(1, h // _THUMB_FACTOR)), interpolation=cv2.INTER_AREA
        )
        key = hashlib.blake2b(thumb.tobytes(), digest_size=16).digest()
        return LocalFeatures(points, descriptors, thumb, (h, w), key)

    def features(self, img: Image.Image) -> LocalFeatures:
        """Keypoints, descriptors and thumbnail of one image and of its mirror (cache them)."""
        gray = _working_gray(img)
        stretched = _stretch_contrast(gray)  # the mirror's percentiles are the same pixels': stretch once
        mirrored = self._one_orientation(np.ascontiguousarray(gray[:, ::-1]), np.ascontiguousarray(stretched[:, ::-1]))
        plain = self._one_orientation(gray, stretched)
        return LocalFeatures(plain.points, plain.descriptors, plain.thumb, plain.work_shape, plain.key,
                             mirrored)

    def _fit(self, query: LocalFeatures, other: LocalFeatures, stride: int = 1) -> tuple[np.ndarray | None, int]:
        """Similarity transform query->other fitted by RANSAC on ratio-test matches, and inliers;
        None for a fit that is no re-upload (degenerate, turned too far). ``stride`` > 1 matches only
        every stride-th keypoint of the query (the probe): each keypoint's ratio test depends on it and
        on all of ``other`` alone, so the probe's matches are exactly the full matches of those keypoints."""
        if query.count < 2 or other.count < 2:
            return None, 0
        descriptors, points = query.descriptors[::stride], query.points[::stride]
        dist, nearest = self._nearest(descriptors, other.descriptors)
        good = dist[:, 0] < self.ratio_test * dist[:, 1]
        if int(good.sum()) < 3:
            return None, 0
        src = points[good]
        dst = other.points[nearest[good, 0]]
        transform, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=self.ransac_threshold_px
        )
        if transform is None or mask is None:
            return None, 0
        inliers = int(mask.sum())
        scale = math.sqrt(abs(float(np.linalg.det(transform[:, :2]))))
        turn = abs(math.degrees(math.atan2(transform[1, 0], transform[0, 0])))
        if not 0.2 <= scale <= 5.0 or turn > self.max_rotation_deg:
            return None, inliers
        return transform, inliers

    def _probe_rejects(self, view: LocalFeatures, other: LocalFeatures) -> bool:
        """Whether a fit on every ``probe_stride``-th query keypoint already shows no geometry: fewer than
        ``probe_min_inliers`` agreeing matches. A pair with ``min_inliers`` inliers in all keeps about
        1/stride of them in the probe, while unrelated photos keep only RANSAC's own minimal pair, so most
        candidates that are no copy cost one 1/stride matching per orientation instead of a full one."""
        stride = self.probe_stride
        if stride <= 1 or view.count < stride * self.min_inliers:
            return False
        return self._fit(view, other, stride)[1] < self.probe_min_inliers

    def _central_ok(self, cell: CellScore) -> bool:
        if cell.score >= self.min_central_agreement:
            return True
        return (cell.score >= self.min_excused_central and cell.solid is not None
                and cell.solid <= self.max_central_solid)

    def _agreement(self, first: LocalFeatures, second: LocalFeatures,
                   transform: np.ndarray) -> tuple[float, float, bool]:
        """(rank-``tolerated_cells`` score, worst central cell's score) of the lower of the two
        frames, and whether every central cell of both passes (``_central_ok``); (-1, -1, False)
        when a frame has too few informative cells."""
        forward = _thumb_map(transform, first, second)
        backward = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
        overall, central, central_ok = 1.0, 1.0, True
        frames = ((first.thumb, second.thumb, forward), (second.thumb, first.thumb, backward))
        for grid, other, grid_to_other in frames:
            warped, valid = _warp_onto(grid, other, grid_to_other)
            cells = cell_agreement(grid, warped, valid)
            if len(cells) < self.min_cells:
                return -1.0, -1.0, False
            ranked = sorted(c.score for c in cells)
            overall = min(overall, ranked[min(self.tolerated_cells, len(ranked) - 1)])
            middle = [c for c in cells if c.central]
            central = min([central, *(c.score for c in middle)])
            central_ok = central_ok and all(self._central_ok(c) for c in middle)
        return overall, central, central_ok

    def match_features(
        self, query: LocalFeatures, other: LocalFeatures, *, image_id: int, hamming: int
    ) -> DuplicateMatch:
        """Decision on precomputed features (the unit of work ``verify`` repeats per candidate);
        the same whichever of the two is the query."""
        first, second = (query, other) if query.key <= other.key else (other, query)
        refused = DuplicateMatch(image_id, hamming, 0, confirmed=False)
        for mirrored, view in ((False, first), (True, first.mirrored)):
            if view is None:
                continue
            if self._probe_rejects(view, second):
                continue
            transform, inliers = self._fit(view, second)
            if transform is None or inliers < self.min_inliers:
                if inliers > refused.inliers:
                    refused = DuplicateMatch(image_id, hamming, inliers, confirmed=False)
                continue
            agreement, central, central_ok = self._agreement(view, second, transform)
            confirmed = agreement >= self.min_agreement and central_ok
            match = DuplicateMatch(image_id, hamming, inliers, confirmed, agreement, central,
                                   mirrored and confirmed)
            if confirmed:
                return match
            if (inliers, agreement) > (refused.inliers, refused.agreement):
                refused = match
        return refused

    def verify(self, query: Image.Image, candidates: list[DuplicateCandidate]) -> list[DuplicateMatch]:
        """One match per candidate, in input order; query features are extracted once."""
        if not candidates:
            return []
        q = self.features(query)
        out: list[DuplicateMatch] = []
        for cand in candidates:
            other = cand.features
            if other is None:
                if cand.image is None:
                    raise ValueError("candidate needs an image or precomputed features")
                other = self.features(cand.image)
            out.append(self.match_features(q, other, image_id=cand.image_id, hamming=cand.hamming))
        return out

    def best_match(
        self, query: Image.Image, candidates: list[DuplicateCandidate]
    ) -> DuplicateMatch | None:
        """The confirmed candidate with most inliers (ties: smaller hash distance), or ``None``."""
        confirmed = [m for m in self.verify(query, candidates) if m.confirmed]
        if not confirmed:
            return None
        return max(confirmed, key=lambda m: (m.inliers, -m.hamming))
