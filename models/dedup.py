"""Near-duplicate decision: perceptual-hash candidates confirmed by local-feature verification.

Hash distance alone cannot decide. In the clothing photos, different garments shot on the same bed
or floor can be 0-6 bits apart, while an 8% crop or a price sticker on a true copy moves the hash
10-24 bits. So the database proposes candidates generously (nearest ``CANDIDATE_K`` by Hamming on
phash and on dhash, within ``CANDIDATE_MAX_HAMMING``) and each one is confirmed here by an
independent signal: ORB keypoints matched with Lowe's ratio test, then a RANSAC similarity
transform (rotation, uniform scale, translation: what resizing, cropping and re-encoding produce).
Inliers alone still overlap on this data (a textured bedspread behind two different shirts can
give 40-60 inliers), so the fitted transform is then checked photometrically: the stored image is
warped onto the query and compared cell by cell on a 4x4 grid with normalised cross-correlation,
which ignores brightness and contrast changes. A copy agrees almost everywhere except under a
sticker; a different garment on the same background disagrees wherever the garment is. The
decision takes a low order statistic of the cells, so a few disagreeing cells (an overlay) are
tolerated while a garment-sized disagreement is not.

Everything here is a pure function of pixels: no database, no environment.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# Candidate generation runs in Postgres (pgvector Hamming on bit(64)), once per hash kind:
#   SELECT id, phash <~> :q AS d FROM images WHERE tenant_id = :t AND phash <~> :q <= :max
#   ORDER BY phash <~> :q LIMIT :k        -- and the same on dhash; union, keep the smaller d
# On the clothing photos (infra/bench/eval_near_duplicates.py) every transformed copy stayed
# within 19 bits on at least one hash kind (a 10% crop is the worst case; resize/JPEG stay <= 3),
# while unrelated photos sit around 29 bits. 22 leaves a margin; about 12% of random pairs also
# fall within it, which is harmless because precision comes from verification, not from the hash.
CANDIDATE_MAX_HAMMING = 22
# Neighbours fetched per hash kind: photos shot by one merchant on one background crowd the top
# of the list, so k leaves room past them. Cost is bounded at 2 * k verifications of ~8 ms CPU.
CANDIDATE_K = 16

WORK_SIDE = 512  # longest side of the working greyscale image (up- or down-scaled to it)
_THUMB_FACTOR = 4  # the photometric check runs at WORK_SIDE / 4: detail beyond that is JPEG noise
_GRID = 4
_FLAT_STD = 2.0  # grey-level std of a cell with no texture (studio white, a saturated wall)
_FAINT_STD = 8.0  # texture this faint can vanish under a brightness change or JPEG smoothing


@dataclass(frozen=True)
class LocalFeatures:
    """What verification needs of one image; a pure function of its pixels, so cache it by image id.

    ``points`` are ORB keypoint positions in the working image (longest side ``WORK_SIDE``),
    ``thumb`` is the greyscale image at 1/_THUMB_FACTOR of that, for the photometric check.
    """

    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray  # (n, 32) uint8
    thumb: np.ndarray  # (h, w) uint8

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
    """Verification outcome for one candidate; ``agreement`` is the photometric score (-1..1)."""

    image_id: int
    hamming: int
    inliers: int
    confirmed: bool
    agreement: float = 0.0


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
    scaled = (gray.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _ncc(a: np.ndarray, b: np.ndarray) -> float | None:
    """Normalised cross-correlation, or None when a cell carries no evidence either way.

    A flat cell against a faint one (a wall brightened into saturation) is no evidence; a flat
    cell against real texture (a garment where the other image has bare background) disagrees.
    """
    sa, sb = float(a.std()), float(b.std())
    if min(sa, sb) < _FLAT_STD:
        return None if max(sa, sb) < _FAINT_STD else 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def cell_agreement(query: np.ndarray, warped: np.ndarray, valid: np.ndarray) -> list[float]:
    """NCC per grid cell over the pixels both images cover; cells mostly outside are skipped."""
    h, w = query.shape
    scores: list[float] = []
    for i in range(_GRID):
        for j in range(_GRID):
            rows = slice(i * h // _GRID, (i + 1) * h // _GRID)
            cols = slice(j * w // _GRID, (j + 1) * w // _GRID)
            mask = valid[rows, cols]
            if mask.mean() < 0.5:
                continue
            a = query[rows, cols][mask].astype(np.float32)
            score = _ncc(a, warped[rows, cols][mask].astype(np.float32))
            if score is not None:
                scores.append(score)
    return scores


class NearDuplicateVerifier:
    """Confirms hash candidates: ORB matches -> RANSAC similarity -> per-cell photometric agreement.

    Defaults were tuned on the clothing photos with infra/bench/eval_near_duplicates.py:
    ``min_inliers`` RANSAC inliers are needed before the photometric check is even meaningful;
    ``min_agreement`` is the NCC the cell at rank ``tolerated_cells`` (from the worst) must reach,
    so up to ``tolerated_cells`` of the 16 cells may disagree (a price sticker); ``min_cells`` is
    the fewest informative overlapping cells that can support a decision.
    """

    def __init__(
        self,
        *,
        min_inliers: int = 25,
        min_agreement: float = 0.7,
        tolerated_cells: int = 3,
        min_cells: int = 8,
        ratio_test: float = 0.8,
        ransac_threshold_px: float = 4.0,
        max_features: int = 1000,
    ) -> None:
        self.min_inliers = min_inliers
        self.min_agreement = min_agreement
        self.tolerated_cells = tolerated_cells
        self.min_cells = min_cells
        self.ratio_test = ratio_test
        self.ransac_threshold_px = ransac_threshold_px
        self._orb = cv2.ORB_create(nfeatures=max_features)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def features(self, img: Image.Image) -> LocalFeatures:
        """Keypoints, descriptors and thumbnail of one image (cache them for stored images)."""
        gray = _working_gray(img)
        keypoints, descriptors = self._orb.detectAndCompute(_stretch_contrast(gray), None)
        if descriptors is None or not keypoints:
            points = np.empty((0, 2), np.float32)
            descriptors = np.empty((0, 32), np.uint8)
        else:
            points = np.array([kp.pt for kp in keypoints], dtype=np.float32)
        h, w = gray.shape
        thumb = cv2.resize(
            gray, (max(1, w // _THUMB_FACTOR), max(1, h // _THUMB_FACTOR)), interpolation=cv2.INTER_AREA
        )
        return LocalFeatures(points, descriptors, thumb)

    def _fit(self, query: LocalFeatures, other: LocalFeatures) -> tuple[np.ndarray | None, int]:
        """Similarity transform query->other fitted by RANSAC on ratio-test matches, and inliers."""
        if query.count < 2 or other.count < 2:
            return None, 0
        pairs = self._matcher.knnMatch(query.descriptors, other.descriptors, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio_test * p[1].distance]
        if len(good) < 3:
            return None, 0
        src = query.points[[m.queryIdx for m in good]]
        dst = other.points[[m.trainIdx for m in good]]
        transform, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=self.ransac_threshold_px
        )
        if transform is None or mask is None:
            return None, 0
        return transform, int(mask.sum())

    def _agreement(self, query: LocalFeatures, other: LocalFeatures, transform: np.ndarray) -> float:
        # The transform maps query -> other in working pixels; the same linear part with the
        # translation rescaled maps between thumbnails. Pull ``other`` back onto the query grid.
        thumb_map = transform.copy()
        thumb_map[:, 2] /= _THUMB_FACTOR
        h, w = query.thumb.shape
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        warped = cv2.warpAffine(other.thumb, thumb_map, (w, h), flags=flags)
        valid = cv2.warpAffine(
            np.ones_like(other.thumb), thumb_map, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
        ).astype(bool)
        scores = sorted(cell_agreement(query.thumb, warped, valid))
        if len(scores) < self.min_cells:
            return -1.0
        return scores[min(self.tolerated_cells, len(scores) - 1)]

    def match_features(
        self, query: LocalFeatures, other: LocalFeatures, *, image_id: int, hamming: int
    ) -> DuplicateMatch:
        """Decision on precomputed features (the unit of work ``verify`` repeats per candidate)."""
        transform, inliers = self._fit(query, other)
        if transform is None or inliers < self.min_inliers:
            return DuplicateMatch(image_id, hamming, inliers, confirmed=False)
        agreement = self._agreement(query, other, transform)
        return DuplicateMatch(image_id, hamming, inliers, agreement >= self.min_agreement, agreement)

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
