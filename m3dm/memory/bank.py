"""Memory-bank building blocks shared by every method (spec §8.1, quirks 26–29, 33, 34).

One :class:`MemoryBank` serves every modality (RGB, xyz, fusion): it collects patch features sample by sample,
is normalised with scalar statistics chosen by the caller (the reference mixes the banks' statistics, quirk 26),
subsampled by the greedy coreset of the reference (sparse random projection + float16 k-center, quirk 33) and
scores test patches by nearest-neighbour distance with the reference's re-weighting. The free functions are the
individual steps, usable on their own.

Numerics, chosen to match the reference:

- The projection is computed in float64, as scikit-learn < 1.2 did for the reference's float32 input (newer
  versions keep float32). It is done in row chunks from a matrix fitted on the bank's shape alone, so only the
  projected bank (≈300 columns) is ever held.
- Coreset distances (``fp16=True``): the projected bank, the current row and the running minima are float16, as in
  the reference; conversions to float16 go through float32 exactly like torch's ``.half()`` on a float64 tensor.
  On CUDA the distance is the reference's own expression (``linalg.norm`` of the float16 difference, float32
  accumulation). On the CPU the float16 difference is accumulated in float64 and rounded to float16 (faster there
  than torch's native CPU float16 norm, and platform independent); the two can differ by one float16 ulp in
  about one row in 10^5, which is below the reproducibility of the reference itself.
- Test-time distances use ``torch.cdist`` (float32) on blocks; the compute mode is fixed from the full problem
  size, so blocks use the same formula as the reference's single call.
"""

from __future__ import annotations

import bisect
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy import sparse
from sklearn.random_projection import SparseRandomProjection
from tqdm import tqdm

ArrayLike = np.ndarray | torch.Tensor

PROJECTION_CHUNK_BYTES = 64 * 2**20  # float64 input per projection chunk
CPU_DISTANCE_CHUNK_ROWS = 8192  # rows per coreset distance chunk on the CPU (cache friendly)
NN_BLOCK_ELEMENTS = 2**25  # distances per test-time block (128 MiB of float32)
CDIST_MM_THRESHOLD = 25  # torch.cdist switches to the matrix-product formula above this many rows
BLUR_SIGMA = 4.0  # KNNGaussianBlur always uses radius 4, whatever its argument
BLUR_MODES = ("pil", "float", "none")


def _as_tensor(features: ArrayLike) -> torch.Tensor:
    return torch.from_numpy(np.asarray(features)) if isinstance(features, np.ndarray) else features


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------------------------
# Sparse random projection
# --------------------------------------------------------------------------------------------------------------

def fit_sparse_random_projection(n_rows: int, n_features: int, eps: float,
                                 random_state=None) -> SparseRandomProjection | None:
    """Fit ``SparseRandomProjection(eps, random_state)`` for a ``(n_rows, n_features)`` bank, or None.

    scikit-learn uses only the shape to fit, so an empty sparse matrix of that shape stands in for the bank (the
    random matrix, its float64 dtype and the global-RNG draws are those of ``fit_transform`` on the bank itself).
    None when the Johnson–Lindenstrauss dimension exceeds ``n_features`` (the reference then keeps the bank).
    """
    projector = SparseRandomProjection(eps=eps, random_state=random_state)
    try:
        projector.fit(sparse.csr_matrix((n_rows, n_features), dtype=np.float64))
    except ValueError as error:
        print(f"   Error: could not project vectors ({error}). Please increase `eps`.")
        return None
    return projector


def _project_rows(rows: torch.Tensor, projector: SparseRandomProjection | None) -> torch.Tensor:
    """Project a chunk in float64; without a projector the chunk is returned as is (the reference's fallback)."""
    if projector is None:
        return rows
    chunk = rows.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(np.ascontiguousarray(projector.transform(chunk)))


def _projection_chunks(features: torch.Tensor, projector: SparseRandomProjection | None):
    """Yield ``(start, projected rows)`` over the bank, holding one float64 input chunk at a time."""
    rows = max(1, PROJECTION_CHUNK_BYTES // (8 * max(1, features.shape[1])))
    for start in range(0, features.shape[0], rows):
        yield start, _project_rows(features[start:start + rows], projector)


def sparse_random_projection(features: ArrayLike, eps: float, random_state=None) -> torch.Tensor:
    """Project a bank with ``SparseRandomProjection(eps, random_state, n_components='auto')`` (spec §8.1 step 1).

    ``random_state=None`` draws from NumPy's global generator, as the reference (the caller seeds it). Returns
    float64 projected rows, or the unprojected features when the target dimension would exceed the input one.
    """
    features = _as_tensor(features)
    projector = fit_sparse_random_projection(features.shape[0], features.shape[1], eps, random_state)
    if projector is None:
        return features
    return torch.cat([chunk for _, chunk in _projection_chunks(features, projector)])


# --------------------------------------------------------------------------------------------------------------
# Greedy coreset
# --------------------------------------------------------------------------------------------------------------

def _project_for_coreset(features: torch.Tensor, projector: SparseRandomProjection | None,
                         store_dtype: torch.dtype | None, device: torch.device):
    """Projected bank and the distances of every row to row 0, both in ``store_dtype`` on ``device``.

    The distances to row 0 are taken in the projection's precision before the cast, as in the reference.
    """
    first = _project_rows(features[:1], projector)
    dtype = store_dtype or first.dtype
    reduced = torch.empty((features.shape[0], first.shape[1]), dtype=dtype, device=device)
    min_dist = torch.empty(features.shape[0], dtype=dtype, device=device)
    for start, chunk in _projection_chunks(features, projector):
        stop = start + chunk.shape[0]
        # computed and cast where the projection lives (the CPU), then moved, as the reference
        min_dist[start:stop] = torch.linalg.vector_norm(chunk - first, dim=1).to(dtype).to(device)
        reduced[start:stop] = chunk.to(dtype).to(device)
    return reduced, min_dist


def _lower_min_distances(reduced: torch.Tensor, last: torch.Tensor, min_dist: torch.Tensor,
                         chunk_size: int | None) -> None:
    """``min_dist = minimum(min_dist, ‖reduced − last‖)`` in place (see the module docstring for the numerics)."""
    if reduced.device.type == "cuda" and chunk_size is None:
        torch.minimum(min_dist, torch.linalg.norm(reduced - last, dim=1), out=min_dist)
        return
    step = chunk_size or CPU_DISTANCE_CHUNK_ROWS
    exact_half = reduced.dtype == torch.float16 and reduced.device.type != "cuda"
    for start in range(0, reduced.shape[0], step):
        diff = reduced[start:start + step] - last
        if exact_half:
            dist = torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64).to(torch.float16)
        else:
            dist = torch.linalg.norm(diff, dim=1)
        part = min_dist[start:start + step]
        torch.minimum(part, dist, out=part)


PRUNE_SLACK = 0.01  # relative safety margin of the triangle-inequality test (float16 rounding is ~5e-4)
SCREEN_DIMS = 32  # leading principal directions in the cheap lower bound on distances between centres
SCREEN_MIN_CENTRES = 512  # smaller selections compute every distance between centres
SCREEN_ALLOWANCE = 1e-3  # float32 rounding allowance of that bound, relative to a centre's offset (worst case ~1e-4)
MIN_COPY_SHARE = 0.05  # drop exact copies of earlier rows before the selection when at least this share are copies


def _row_distances(rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Distances of ``rows`` to ``last`` exactly as :func:`_lower_min_distances` computes them on the CPU."""
    if rows.dtype == torch.float16:
        return torch.linalg.vector_norm(rows - last, dim=1, dtype=torch.float64).to(torch.float16)
    return torch.linalg.norm(rows - last, dim=1)


class _CentreScreen:
    """Lower bounds on the distances from the newest centre to the earlier ones, at a tenth of the cost.

    The bound is the distance between the centres' coordinates along the bank's leading principal directions
    (an orthogonal projection never lengthens a vector) less an allowance for float32 rounding, so a centre it
    rules out is truly that far; only the centres it cannot rule out get their exact distance computed.
    """

    def __init__(self, reduced: torch.Tensor, capacity: int) -> None:
        self.active = capacity >= SCREEN_MIN_CENTRES  # fewer centres: every distance is cheaper than the set-up
        if not self.active:
            return
        sample = reduced[::max(1, reduced.shape[0] // 20000)].float()
        self.mean = sample.mean(dim=0)
        dims = min(SCREEN_DIMS, reduced.shape[1])
        self.basis = torch.linalg.svd(sample - self.mean, full_matrices=False).Vh[:dims].T.contiguous()
        self.coords = torch.empty((capacity, self.basis.shape[1]), dtype=torch.float32)
        self.allowance = torch.empty(capacity, dtype=torch.float32)

    def add(self, index: int, centre: torch.Tensor) -> None:
        if not self.active:
            return
        offset = centre - self.mean
        self.coords[index] = offset @ self.basis
        self.allowance[index] = SCREEN_ALLOWANCE * torch.linalg.vector_norm(offset)

    def possibly_within(self, k: int, thresholds: torch.Tensor) -> torch.Tensor:
        """Indices ``i < len(thresholds)`` of the centres that may lie closer than ``thresholds[i]`` to centre k."""
        count = thresholds.shape[0]
        if not self.active:
            return torch.arange(count)
        lower = torch.linalg.vector_norm(self.coords[:count] - self.coords[k], dim=1)
        lower -= self.allowance[:count] + self.allowance[k]
        return (lower < thresholds).nonzero().squeeze(1)


def _greedy_pruned(reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
    """The same selection as the plain loop, skipping rows that provably cannot get closer (CPU).

    Every row remembers the selected centre it is nearest to. By the triangle inequality a row whose centre lies
    at least twice its running minimum away from the new centre cannot get closer to the new one, and a whole
    cluster can be skipped when the new centre is at least twice the cluster's largest running minimum away
    (the distances between centres are bounded from below first by :class:`_CentreScreen`, and computed only
    where the bound cannot decide). The test carries a 1 % margin, far above float16 rounding, so the skipped
    rows are exactly those whose minimum the plain loop would leave unchanged; the rows that are computed use
    the plain loop's arithmetic. Hence the indices are identical, at a cost that falls as clusters shrink.
    """
    count = max(n, 1)
    centres = torch.empty((count, reduced.shape[1]), dtype=torch.float32)
    radius = torch.zeros(count, dtype=torch.float32)
    assign = torch.zeros(reduced.shape[0], dtype=torch.long)
    selected = torch.zeros(count, dtype=torch.long)
    running = min_dist.float()  # the float16 minima, exactly: float32 compares and argmaxes several times faster
    screen = _CentreScreen(reduced, count)
    centres[0] = reduced[0].float()
    screen.add(0, centres[0])
    radius[0] = float("inf")  # the first update (against row 0 again, as the reference) checks every row
    factor = 2.0 * (1.0 + PRUNE_SLACK)
    for step in tqdm(range(1, n), desc="coreset", disable=not progress, leave=False):
        k = step - 1  # the most recently selected centre; its distances are taken now, as in the reference
        last_row = reduced[selected[k]].unsqueeze(0)
        thresholds = factor * radius[:step]
        near = screen.possibly_within(k, thresholds)
        near_dist = torch.linalg.vector_norm(centres[near] - centres[k], dim=1)
        is_open = near_dist < thresholds[near]
        centre_dist = torch.full((step,), float("inf"))
        centre_dist[near[is_open]] = near_dist[is_open]
        centre_dist[k] = 0
        open_clusters = centre_dist < float("inf")
        members = open_clusters[assign].nonzero().squeeze(1)
        candidates = centre_dist[assign[members]] < factor * running[members]
        rows = members[candidates]
        new = _row_distances(reduced[rows], last_row).float()
        closer = new < running[rows]
        moved = rows[closer]
        running[moved] = new[closer]
        assign[moved] = k
        # the largest running minimum of every open cluster (all their rows are in `members`)
        radius[:step][open_clusters] = 0
        radius.scatter_reduce_(0, assign[members], running[members], reduce="amax")
        index = int(torch.argmax(running))
        running[index] = 0
        selected[step] = index
        centres[step] = reduced[index].float()
        screen.add(step, centres[step])
    return selected


def greedy_coreset(features: ArrayLike, n: int, eps: float = 0.9, random_state=None,
                   device: str | torch.device | None = None, fp16: bool = True,
                   chunk_size: int | None = None, progress: bool = True, shards: int = 1) -> torch.Tensor:
    """Indices of the reference's greedy k-center coreset (``get_coreset_idx_randomp``, spec §8.1).

    Projects (see :func:`sparse_random_projection`), starts at row 0 and adds ``n − 1`` rows, each the farthest
    (first on ties) from the rows already chosen. ``fp16=True`` (COMPAT) keeps the projected bank and the running
    minima in float16 as the reference; ``fp16=False`` keeps the projection's precision (float64). ``device``
    (default: CUDA when available, as the reference) holds the projected bank; ``chunk_size`` bounds the rows per
    distance step (CPU default 8192; CUDA default: the whole bank in one step). ``n < 1`` gives ``[0]``, like the
    reference. Returns a CPU LongTensor of ``max(n, 1)`` indices.

    ``shards > 1`` (a faster option, not the reference): the rows are cut into ``shards`` contiguous blocks
    (groups of training samples) and each block gets its own greedy selection of its share of the ``n`` rows,
    started at its first row. Every row is then within its block's covering radius; the cost falls about
    ``shards``-fold. Its effect on the metrics is measured in benchmarks/coreset.py.
    """
    features = _as_tensor(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"greedy_coreset needs a non-empty (rows, dim) bank, got {tuple(features.shape)}")
    device = _resolve_device(device)
    projector = fit_sparse_random_projection(features.shape[0], features.shape[1], eps, random_state)
    reduced, min_dist = _project_for_coreset(features, projector, torch.float16 if fp16 else None, device)
    if shards > 1:
        return _sharded_selection(reduced, n, shards, chunk_size, progress)
    return _greedy_selection(reduced, min_dist, n, chunk_size, progress)


def _sharded_selection(reduced: torch.Tensor, n: int, shards: int, chunk_size: int | None,
                       progress: bool) -> torch.Tensor:
    """``greedy_coreset(shards=…)``: one greedy selection per contiguous block, ``n`` rows in all."""
    shards = max(1, min(shards, reduced.shape[0], max(n, 1)))
    bounds = [round(i * reduced.shape[0] / shards) for i in range(shards + 1)]
    quotas = [round(i * max(n, 1) / shards) for i in range(shards + 1)]
    picked = []
    for block in range(shards):
        start, stop = bounds[block], bounds[block + 1]
        rows = reduced[start:stop]
        min_dist = _row_distances(rows, rows[:1]) if rows.device.type == "cpu" else \
            torch.linalg.norm(rows - rows[:1], dim=1)
        count = quotas[block + 1] - quotas[block]
        picked.append(_greedy_selection(rows, min_dist, count, chunk_size, progress) + start)
    return torch.cat(picked)


def _first_occurrences(reduced: torch.Tensor) -> torch.Tensor | None:
    """Ascending indices of the rows that are not an exact copy of an earlier row (None when fewer than
    ``MIN_COPY_SHARE`` of the rows are copies).

    Copies are common: every empty patch of an xyz bank is the same row (about 80 % of the rows on MVTec 3D-AD).
    Rows are grouped by a random linear key, then each row is compared with the first row of its group, so a
    copy is dropped only when it is equal element for element (a copy the key misses is merely kept).
    """
    rows = reduced.shape[0]
    generator = torch.Generator().manual_seed(0)  # a private generator: the global random streams are untouched
    probe = torch.randn(reduced.shape[1], generator=generator).to(reduced.device)
    keys = torch.cat([chunk.float() @ probe for chunk in reduced.split(CPU_DISTANCE_CHUNK_ROWS)])
    _, group = torch.unique(keys, return_inverse=True)
    order = torch.arange(rows, device=reduced.device)
    first = torch.full((rows,), rows, dtype=torch.long, device=reduced.device)
    first = first.scatter_reduce_(0, group, order, reduce="amin")[group]
    suspects = (first != order).nonzero().squeeze(1)
    if suspects.numel() < MIN_COPY_SHARE * rows:
        return None
    equal = torch.cat([(reduced[part] == reduced[first[part]]).all(dim=1)
                       for part in suspects.split(CPU_DISTANCE_CHUNK_ROWS)])
    if int(equal.sum()) < MIN_COPY_SHARE * rows:
        return None
    keep = torch.ones(rows, dtype=torch.bool, device=reduced.device)
    keep[suspects[equal]] = False
    return keep.nonzero().squeeze(1)


def _greedy_selection(reduced: torch.Tensor, min_dist: torch.Tensor, n: int, chunk_size: int | None,
                      progress: bool) -> torch.Tensor:
    """Greedy k-center from row 0 given every row's distance to row 0 (``min_dist``, may be updated in place).

    Exact copies of earlier rows are left out first: a copy always has its original's running minimum, so it
    can only be the farthest row when its original (earlier, hence first on ties) is too; once the original is
    selected, both minima are 0. The indices are therefore those of the selection over every row.
    """
    kept = _first_occurrences(reduced)
    if kept is not None:
        chosen = _greedy_selection_all_rows(reduced[kept], min_dist[kept], n, chunk_size, progress)
        return kept.cpu()[chosen]
    return _greedy_selection_all_rows(reduced, min_dist, n, chunk_size, progress)


def _greedy_selection_all_rows(reduced: torch.Tensor, min_dist: torch.Tensor, n: int, chunk_size: int | None,
                               progress: bool) -> torch.Tensor:
    if reduced.device.type == "cpu" and reduced.dtype == torch.float16 and chunk_size is None:
        return _greedy_pruned(reduced, min_dist, n, progress)
    selected = torch.zeros(max(n, 1), dtype=torch.long, device=reduced.device)
    last = reduced[:1]
    # The reference's first iteration recomputes the distances to row 0 in float16 and takes the minimum with
    # the rounded precise ones; it can change the selection, so it is kept. Indices stay on the device (no sync).
    for step in tqdm(range(1, n), desc="coreset", disable=not progress, leave=False):
        _lower_min_distances(reduced, last, min_dist, chunk_size)
        index = torch.argmax(min_dist).view(1)
        last = reduced.index_select(0, index)
        min_dist.index_fill_(0, index, 0)
        selected[step] = index[0]
    return selected.cpu()


# --------------------------------------------------------------------------------------------------------------
# Nearest neighbours and the re-weighted image score
# --------------------------------------------------------------------------------------------------------------

def _cdist_mode(n_patches: int, n_bank: int) -> str:
    """The compute mode ``torch.cdist`` picks by default for the full problem (kept for every block)."""
    if n_patches > CDIST_MM_THRESHOLD or n_bank > CDIST_MM_THRESHOLD:
        return "use_mm_for_euclid_dist"
    return "donot_use_mm_for_euclid_dist"


def query_block_rows(n_patches: int, n_bank: int, block_elements: int) -> int:
    """Queries per block: as few blocks as keep each within ``block_elements`` distances, of equal size (so no
    short tail block: the BLAS computes an entry the same way in any block of more than a few rows)."""
    limit = max(1, min(n_patches, block_elements // max(n_bank, 1)))
    blocks = -(-n_patches // limit)
    return max(1, -(-n_patches // blocks))


def nearest_neighbours(patches: torch.Tensor, bank: torch.Tensor, chunk_size: int | None = None,
                       bank_chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of every patch to its nearest bank row, and that row's index (spec §8.1 steps 1–2).

    Same result as ``torch.cdist(patches, bank).min(dim=1)`` (first index on ties) without the full matrix:
    blocks of ``chunk_size`` patches × ``bank_chunk_size`` bank rows (by default whole-bank blocks of at most
    2^25 distances; the bank is split only when a single patch row exceeds that). Blocking over patches keeps the
    values bit-identical on the CPU BLAS tested; blocking over the bank may move them by an ulp.
    """
    n_patches, n_bank = patches.shape[0], bank.shape[0]
    if n_bank == 0:
        raise ValueError("nearest_neighbours: the bank is empty")
    if chunk_size is None:
        chunk_size = query_block_rows(n_patches, n_bank, NN_BLOCK_ELEMENTS)
    if bank_chunk_size is None:
        fits = chunk_size * n_bank <= NN_BLOCK_ELEMENTS
        bank_chunk_size = n_bank if fits else max(1, NN_BLOCK_ELEMENTS // chunk_size)
    mode = _cdist_mode(n_patches, n_bank)
    min_dist = torch.full((n_patches,), math.inf, dtype=patches.dtype, device=patches.device)
    nn_idx = torch.zeros(n_patches, dtype=torch.long, device=patches.device)
    for p0 in range(0, n_patches, chunk_size):
        best, best_idx = min_dist[p0:p0 + chunk_size], nn_idx[p0:p0 + chunk_size]
        for b0 in range(0, n_bank, bank_chunk_size):
            dist = torch.cdist(patches[p0:p0 + chunk_size], bank[b0:b0 + bank_chunk_size], compute_mode=mode)
            value, index = dist.min(dim=1)
            closer = value < best  # strict: an earlier block keeps ties, as a single argmin would
            best[closer] = value[closer]
            best_idx[closer] = index[closer] + b0
    return min_dist, nn_idx


def reweighted_score(patches: torch.Tensor, bank: torch.Tensor, min_dist: torch.Tensor, nn_idx: torch.Tensor,
                     n_reweight: int = 3, eps: float = 0.0, divisor: float = 1.0) -> float:
    """Image score ``w · s*`` of the reference (spec §8.1 steps 3–6), in float32 like the reference.

    ``s*`` is the largest nearest-neighbour distance, ``w = 1 − exp(s*/D) / (Σ_j exp(δ_j/D) + eps)`` with ``δ_j``
    the distances from that patch to the ``n_reweight − 1`` bank rows nearest to its neighbour (the first of the
    ``n_reweight`` found, normally the neighbour itself, is dropped) and ``D = sqrt(dim)``. ``divisor``
    (1000 in DINO+Point_MAE, quirk 29) divides ``s*`` and every ``δ_j`` first, so the result is ``w · s*/divisor``.
    """
    if bank.shape[0] < 2:
        raise ValueError("reweighted_score needs a bank with at least two rows")
    worst = torch.argmax(min_dist)
    s_star = min_dist[worst] / divisor
    m_test = patches[worst].unsqueeze(0)
    m_star = bank[nn_idx[worst]].unsqueeze(0)
    _, knn = torch.topk(torch.cdist(m_star, bank), k=min(n_reweight, bank.shape[0]), largest=False)
    deltas = torch.linalg.norm(m_test - bank[knn[0, 1:]], dim=1) / divisor
    scale = torch.sqrt(torch.tensor(float(patches.shape[1]), dtype=torch.float32, device=patches.device))
    weight = 1 - torch.exp(s_star / scale) / (torch.sum(torch.exp(deltas / scale)) + eps)
    return float(weight * s_star)


# --------------------------------------------------------------------------------------------------------------
# Segmentation maps
# --------------------------------------------------------------------------------------------------------------

def _pil_blur(score_map: torch.Tensor) -> torch.Tensor:
    """KNNGaussianBlur: 8-bit quantisation as ToPILImage, Pillow GaussianBlur(4), back ×max (quirk 34)."""
    peak = score_map.max()
    if not peak > 0:  # the reference divides by zero here (NaN map); distance maps are never negative
        return torch.zeros_like(score_map)
    # ToPILImage of a float tensor: ×255 in float32, then a uint8 cast that truncates
    scaled = (score_map / peak).mul(255).cpu().numpy()
    pixels = np.clip(scaled, 0, 255).astype(np.uint8)
    blurred = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=BLUR_SIGMA))
    return torch.from_numpy(np.asarray(blurred).copy()).to(score_map.device, torch.float32).div(255) * peak


def gaussian_kernel(sigma: float = BLUR_SIGMA, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian on ``[-r, r]``, ``r = int(truncate·sigma + 0.5)`` (scipy.ndimage's support)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _float_blur(score_map: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Float Gaussian blur (σ = 4, edge pixels repeated, like scipy's ``gaussian_filter(mode='nearest')``)."""
    kernel = gaussian_kernel(sigma).to(score_map.device, torch.float32)
    radius = kernel.numel() // 2
    image = score_map.to(torch.float32)[None, None]
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return image[0, 0]


def blur_map(score_map: torch.Tensor, mode: str = "pil") -> torch.Tensor:
    """Blur a ``(H, W)`` or ``(1, H, W)`` map; returns ``(1, H, W)`` float32.

    ``"pil"`` (COMPAT): the reference's 8-bit Pillow blur, output quantised to multiples of ``max/255``; an
    all-zero map gives zeros. ``"float"`` (fix): float Gaussian, σ = 4, support ±16, edges repeated.
    ``"none"``: no blur.
    """
    if mode not in BLUR_MODES:
        raise ValueError(f"blur mode must be one of {BLUR_MODES}, got {mode!r}")
    image = score_map.reshape(score_map.shape[-2:]).to(torch.float32)
    if mode == "pil":
        image = _pil_blur(image)
    elif mode == "float":
        image = _float_blur(image)
    return image.unsqueeze(0)


def segmentation_map(min_dist: torch.Tensor, grid: int, out_size: int = 224, blur: str = "pil") -> torch.Tensor:
    """Patch minima → ``grid × grid`` (row-major) → bilinear (align_corners=False) to ``out_size`` → blur."""
    if min_dist.numel() != grid * grid:
        raise ValueError(f"{min_dist.numel()} patch scores do not fill a {grid}x{grid} grid")
    grid_map = min_dist.to(torch.float32).reshape(1, 1, grid, grid)
    upsampled = F.interpolate(grid_map, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return blur_map(upsampled[0, 0], blur)


# --------------------------------------------------------------------------------------------------------------
# Memory bank
# --------------------------------------------------------------------------------------------------------------

class _RunningMoments:
    """Mean and unbiased variance over every element added, merged per sample in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        block = values.detach().to(torch.float64)
        count, mean = block.numel(), float(block.mean())
        m2 = float((block - mean).square().sum())
        delta, total = mean - self.mean, self.count + count
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def mean_std(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("no values collected")
        variance = self.m2 / (self.count - 1) if self.count > 1 else math.nan
        return float(np.float32(self.mean)), float(np.float32(math.sqrt(variance)))


def _rows_without_zeros(bank: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """Keep rows with no exact-zero entry (the reference's ``rm_zero`` filter), order preserved."""
    if bank.shape[0] == 0:
        return bank
    keep = torch.cat([(bank[i:i + chunk_rows] != 0).all(dim=1) for i in range(0, bank.shape[0], chunk_rows)])
    return bank[keep]


class SampleStore:
    """The raw float32 patches of every added sample, in order: in memory, or appended to an anonymous file.

    On disk (``spool_dir`` given) the rows live in an unlinked temporary file in that folder (gone when the store
    is cleared or the process ends, even after a crash), so a bank of any size costs no host memory until it is
    read back, chunk by chunk. Reads return fresh float32 tensors either way.
    """

    def __init__(self, spool_dir: str | Path | None = None) -> None:
        self.spool_dir = None if spool_dir is None else Path(spool_dir)
        self._tensors: list[torch.Tensor] = []
        self._file = None
        self._starts = [0]  # first row of every sample, then the total
        self._dim = 0

    def __len__(self) -> int:
        return len(self._starts) - 1

    @property
    def rows(self) -> int:
        return self._starts[-1]

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def on_disk(self) -> bool:
        return self.spool_dir is not None

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float32)
        self._dim = rows.shape[1]
        if self.on_disk:
            if self._file is None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
                self._file = tempfile.TemporaryFile(dir=self.spool_dir, prefix="m3dm-bank-")
            self._file.seek(0, os.SEEK_END)
            self._file.write(np.ascontiguousarray(rows.numpy()).tobytes())
        else:
            self._tensors.append(rows.clone())
        self._starts.append(self._starts[-1] + rows.shape[0])

    def sample(self, index: int) -> torch.Tensor:
        return self.read(self._starts[index], self._starts[index + 1])

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the concatenation of every sample."""
        start, stop = max(0, start), min(stop, self.rows)
        out = torch.empty((max(0, stop - start), self._dim), dtype=torch.float32)
        if out.shape[0] == 0:
            return out
        if self.on_disk:
            self._file.flush()
            self._file.seek(start * self._dim * 4)
            if self._file.readinto(memoryview(out.numpy()).cast("B")) != out.numel() * 4:
                raise OSError(f"the memory-bank spool file in {self.spool_dir} was truncated")
            return out
        first = bisect.bisect_right(self._starts, start) - 1
        filled = 0
        for tensor, offset in zip(self._tensors[first:], self._starts[first:]):
            part = tensor[max(0, start - offset):stop - offset]
            out[filled:filled + part.shape[0]] = part
            filled += part.shape[0]
            if filled == out.shape[0]:
                break
        return out

    def take(self, indices: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
        """The rows at ``indices`` (any order, repeats allowed), read in one sequential sweep."""
        indices = indices.to("cpu", torch.long)
        out = torch.empty((indices.numel(), self._dim), dtype=torch.float32)
        order = torch.argsort(indices)
        ordered = indices[order]
        bounds = torch.searchsorted(ordered, torch.arange(0, self.rows + chunk_rows, chunk_rows))
        for chunk, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            if lo < hi:
                start = chunk * chunk_rows
                out[order[lo:hi]] = self.read(start, start + chunk_rows)[ordered[lo:hi] - start]
        return out

    def clear(self) -> None:
        self._tensors.clear()
        self._starts = [0]
        if self._file is not None:
            self._file.close()
            self._file = None


class NormalisedRows:
    """The stored rows as ``(x − mean) / std`` (float32, the reference's ops), read lazily by slice or index.

    Stands in for the concatenated bank wherever a tensor is sliced (the coreset's projection, ``rows[idx]``),
    so the full normalised bank is never held at once.
    """

    def __init__(self, store: SampleStore, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        self.store, self.mean, self.std = store, mean, std
        self.shape = (store.rows, store.dim)
        self.ndim = 2

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("NormalisedRows supports contiguous slices only")
            rows = self.store.read(start, stop)
        else:
            rows = self.store.take(torch.as_tensor(key))
        if self.mean is not None:
            rows.sub_(self.mean).div_(self.std)  # same float32 ops as the reference's (x - mean) / std
        return rows


class MemoryBank:
    """Patch features of one modality: collected per training sample, then normalised and coreset-reduced.

    Usage: ``add`` each sample's ``(P, D)`` patches; read ``stats()`` (of the raw patches) and pass the statistics
    the method calls for to ``finalize``; then ``score`` test patches. The added patches are kept as float32 in
    host memory, or in a temporary file in ``spool_dir`` (:class:`SampleStore`); the finalised bank is float32 on
    ``storage_device``. Either way the full normalised bank is never built: the coreset reads it in chunks.
    """

    def __init__(self, storage_device: str | torch.device = "cpu", spool_dir: str | Path | None = None) -> None:
        self.storage_device = torch.device(storage_device)
        self._store = SampleStore(spool_dir)
        self._sample_rows: list[int] = []
        self._moments = _RunningMoments()
        self._dim: int | None = None
        self._bank: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # normalisation applied by finalize/score (float32 scalars)
        self.std: torch.Tensor | None = None
        self.coreset_idx: torch.Tensor | None = None
        self.screened = True  # exact bfloat16-screened nearest neighbours where the CPU has native bfloat16
        self._screened_bank = None
        self.share_empty_rows = True  # search the row of all-zero patches once (see _nearest)
        self._empty_neighbour: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- collection ---------------------------------------------------------------------------------------------
    def add(self, patches: ArrayLike) -> None:
        """Append one sample's patches ``(P, D)`` (copied, float32)."""
        if self._bank is not None:
            raise RuntimeError("MemoryBank.add after finalize")
        patches = _as_tensor(patches)
        if patches.ndim != 2:
            raise ValueError(f"expected (patches, dim), got {tuple(patches.shape)}")
        if self._dim is not None and patches.shape[1] != self._dim:
            raise ValueError(f"feature dim {patches.shape[1]} differs from the bank's {self._dim}")
        self._dim = patches.shape[1]
        rows = patches.detach().to("cpu", torch.float32)
        self._store.append(rows)
        self._sample_rows.append(rows.shape[0])
        self._moments.add(rows)

    @property
    def n_samples(self) -> int:
        return len(self._sample_rows)

    @property
    def sample_rows(self) -> list[int]:
        return list(self._sample_rows)

    @property
    def rows(self) -> int:
        return self._bank.shape[0] if self._bank is not None else sum(self._sample_rows)

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def finalized(self) -> bool:
        return self._bank is not None

    @property
    def bank(self) -> torch.Tensor:
        if self._bank is None:
            raise RuntimeError("MemoryBank.bank before finalize")
        return self._bank

    def stats(self) -> tuple[float, float]:
        """``(mean, unbiased std)`` over every element added (raw patches), rounded to float32.

        Accumulated per added sample in float64 (no concatenated copy); agrees with ``torch.mean``/``torch.std``
        of the float32 concatenation to float32 rounding (the float64 value is the more accurate one).
        """
        return self._moments.mean_std()

    # -- construction -------------------------------------------------------------------------------------------
    def sample(self, index: int) -> torch.Tensor:
        """The raw (unnormalised) patches of the ``index``-th added sample; after ``finalize`` only while the
        samples are kept (``finalize(keep_samples=True)``, until ``release_samples``)."""
        if not 0 <= index < len(self._store):
            raise RuntimeError(f"sample {index} of the bank is not available (released after finalize, or never "
                               f"added: {self.n_samples} samples)")
        return self._store.sample(index)

    def release_samples(self) -> None:
        """Free the per-sample rows kept for pass 2 (memory or spool file)."""
        self._store.clear()

    def finalize(self, mean: float | None = None, std: float | None = None, n_coreset: int | None = None,
                 f_coreset: float | None = None, eps: float = 0.9, random_state=None,
                 device: str | torch.device | None = None, fp16: bool = True, drop_zero_rows_before: bool = False,
                 drop_zero_rows_after: bool = False, append_zero_row: bool = False, progress: bool = True,
                 chunk_size: int | None = None, keep_samples: bool = False, shards: int = 1) -> torch.Tensor:
        """Build the bank: concatenate, ``(x − mean)/std``, zero filter, coreset, zero filter, zero row.

        ``mean``/``std``: scalars to normalise with (None: no normalisation). Coreset size: ``n_coreset`` rows, or
        ``int(f_coreset · rows)`` of the rows present at that point when ``f_coreset < 1`` (none when ≥ 1).
        ``drop_zero_rows_*`` keep only rows without an exact zero, before/after the coreset; ``append_zero_row``
        adds one all-zero row last. ``keep_samples`` keeps the raw per-sample patches readable with ``sample``.
        ``eps``, ``random_state``, ``device``, ``fp16``, ``chunk_size``, ``shards``: see
        :func:`greedy_coreset` (``random_state=None`` draws from NumPy's global generator). Returns the bank.
        """
        if self._bank is not None:
            raise RuntimeError("MemoryBank.finalize called twice")
        if self.n_samples == 0:
            raise RuntimeError("MemoryBank.finalize on an empty bank")
        if n_coreset is not None and f_coreset is not None:
            raise ValueError("give n_coreset or f_coreset, not both")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None:
            self.mean = torch.tensor(mean, dtype=torch.float32, device=self.storage_device)
            self.std = torch.tensor(std, dtype=torch.float32, device=self.storage_device)
        rows = NormalisedRows(self._store, self.mean, self.std)
        if drop_zero_rows_before:
            rows = _rows_without_zeros(rows[0:rows.shape[0]])
        if f_coreset is not None and f_coreset < 1:
            n_coreset = int(f_coreset * rows.shape[0])
        if n_coreset is not None:
            self.coreset_idx = greedy_coreset(rows, n_coreset, eps=eps, random_state=random_state, device=device,
                                              fp16=fp16, chunk_size=chunk_size, progress=progress, shards=shards)
            bank = rows[self.coreset_idx]
        else:
            bank = rows[0:rows.shape[0]]
        if not keep_samples:
            self._store.clear()
        bank = bank.to(self.storage_device)
        if drop_zero_rows_after:
            bank = _rows_without_zeros(bank)
        if append_zero_row:
            bank = torch.cat((bank, bank.new_zeros(1, bank.shape[1])))
        self._bank = bank
        return bank

    # -- scoring ------------------------------------------------------------------------------------------------
    def normalise(self, patches: ArrayLike) -> torch.Tensor:
        """Patches as float32 on the bank's device, normalised with finalize's statistics when it had any."""
        patches = _as_tensor(patches).to(self.storage_device, torch.float32)
        return patches if self.mean is None else (patches - self.mean) / self.std

    def score(self, patches: ArrayLike, normalise: bool = True, eps: float = 0.0, divisor: float = 1.0,
              n_reweight: int = 3, chunk_size: int | None = None) -> tuple[float, torch.Tensor]:
        """``(image score, per-patch nearest distances (P,))`` of one sample's patches (spec §8.1).

        ``normalise`` applies finalize's ``mean``/``std`` (a no-op for a bank finalised without them); ``eps`` and
        ``divisor`` as in :func:`reweighted_score`. The distances are the undivided ones (for the map).
        """
        raw = _as_tensor(patches)
        x = self.normalise(raw) if normalise else raw.to(self.storage_device, torch.float32)
        empty = (raw == 0).all(dim=1).to(x.device) if self.share_empty_rows and raw.ndim == 2 else None
        min_dist, nn_idx = self._nearest(x, chunk_size, empty)
        return reweighted_score(x, self.bank, min_dist, nn_idx, n_reweight, eps, divisor), min_dist

    def _nearest(self, x: torch.Tensor, chunk_size: int | None, empty: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`nearest_neighbours` of the rows ``x``; ``empty`` flags the rows of all-zero patches.

        Empty patches (no point behind them: about 80 % of an xyz sample) all normalise to one constant row, so
        its nearest neighbour is searched once per bank and reused. The values are the same as searching every
        row: whatever the block, the search computes a row's distances with the same float32 arithmetic (blocks
        of at least ``MIN_GEMM_SIDE`` rows on both sides, see m3dm.memory.screened; on CUDA, where cuBLAS picks its
        kernel by shape, they may differ in the last bit, as the blocking itself already makes them). An explicit
        ``chunk_size`` searches every row.
        """
        from m3dm.memory.screened import MIN_GEMM_SIDE

        n_empty = 0 if empty is None else int(empty.sum())
        n_filled = x.shape[0] - n_empty
        if (chunk_size is not None or n_empty < 2 or n_filled < MIN_GEMM_SIDE
                or self.bank.shape[0] <= max(MIN_GEMM_SIDE, CDIST_MM_THRESHOLD)):
            return self._search(x, chunk_size)
        filled = (~empty).nonzero().squeeze(1)
        min_dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        nn_idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        min_dist[filled], nn_idx[filled] = self._search(x[filled], chunk_size)
        empty_row = x[int(empty.nonzero()[0, 0])]
        min_dist[empty], nn_idx[empty] = self._empty_row_neighbour(empty_row)
        return min_dist, nn_idx

    def _empty_row_neighbour(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest bank row of the constant row of empty patches, searched in a block of ``MIN_GEMM_SIDE`` copies
        (so with the arithmetic of any full block) and remembered per value."""
        from m3dm.memory.screened import MIN_GEMM_SIDE

        key = row.cpu().numpy().tobytes()
        if key not in self._empty_neighbour:
            block = row.unsqueeze(0).expand(MIN_GEMM_SIDE, -1).contiguous()
            dist, idx = self._search(block, None)
            self._empty_neighbour[key] = (dist[0], idx[0])
        return self._empty_neighbour[key]

    def _search(self, x: torch.Tensor, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`nearest_neighbours`, through the exact bfloat16-screened search (m3dm.memory.screened: same values
        and indices, faster where screening prunes) on CPUs with native bfloat16 matrix products."""
        from m3dm.memory.screened import ScreenedBank, bf16_matmul_is_fast

        if self.screened and self._screened_bank is None and bf16_matmul_is_fast(self.bank.device):
            self._screened_bank = ScreenedBank(self.bank)
        if self._screened_bank is not None:
            return self._screened_bank.search(x, chunk_size=chunk_size)
        return nearest_neighbours(x, self.bank, chunk_size=chunk_size)

    # -- saving and loading (m3dm.detection.persistence) ----------------------------------------------------------------------
    def export_state(self) -> dict:
        """The finalised bank, its normalisation scalars and coreset indices, as CPU tensors and primitives."""
        def cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach().cpu()

        return {"bank": cpu(self.bank), "mean": cpu(self.mean), "std": cpu(self.std),
                "coreset_idx": cpu(self.coreset_idx), "sample_rows": self.sample_rows}

    @classmethod
    def from_state(cls, state: dict, storage_device: str | torch.device = "cpu") -> MemoryBank:
        """A finalised bank that scores exactly like the one ``export_state`` was taken from."""
        rows = state["bank"]
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.dtype != torch.float32:
            raise ValueError("a saved memory bank must be a (rows, dim) float32 tensor")
        if (state["mean"] is None) != (state["std"] is None):
            raise ValueError("a saved memory bank must have both mean and std, or neither")
        bank = cls(storage_device)
        bank._bank = rows.to(bank.storage_device)
        bank._dim = rows.shape[1]
        bank._sample_rows = list(state.get("sample_rows", []))
        if state["mean"] is not None:
            bank.mean = state["mean"].to(bank.storage_device, torch.float32)
            bank.std = state["std"].to(bank.storage_device, torch.float32)
        bank.coreset_idx = state.get("coreset_idx")
        return bank
