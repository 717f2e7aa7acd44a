"""The reference's sparse random projection of a memory bank, applied in row chunks.

The projection is computed in float64, as scikit-learn < 1.2 did for the reference's float32 input (newer
versions keep float32). It is applied in row chunks with a matrix fitted on the bank's shape alone, so only the
projected bank (≈300 columns) is ever held.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from scipy import sparse
from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim

log = logging.getLogger(__name__)

PROJECTION_CHUNK_BYTES = 64 * 2**20  # float64 input per projection chunk
LARGEST_EPS = float(np.nextafter(1.0, 0.0))  # the Johnson-Lindenstrauss eps must be below 1


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
        if n_features < johnson_lindenstrauss_min_dim(n_rows, eps=LARGEST_EPS):
            # no eps reduces so few features (BTF's 33 FPFH values): the unprojected bank is the only way
            log.debug("the coreset selection uses the unprojected %d features (%s)", n_features, error)
        else:
            log.warning("could not project vectors (%s); the coreset uses the unprojected bank: a larger "
                        "--coreset_eps (below 1) would project it", error)
        return None
    return projector


def project_rows(rows: torch.Tensor, projector: SparseRandomProjection | None) -> torch.Tensor:
    """Project a chunk in float64; without a projector the chunk is returned as is (the reference's fallback)."""
    if projector is None:
        return rows
    chunk = rows.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(np.ascontiguousarray(projector.transform(chunk)))


def projection_chunks(features: torch.Tensor, projector: SparseRandomProjection | None
                      ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, projected rows)`` over the bank, holding one float64 input chunk at a time."""
    for start, stop in projection_bounds(features):
        yield start, project_rows(features[start:stop], projector)


def projection_bounds(features: torch.Tensor) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the bank's projection chunks (``PROJECTION_CHUNK_BYTES`` of float64 input each)."""
    rows = max(1, PROJECTION_CHUNK_BYTES // (8 * max(1, features.shape[1])))
    for start in range(0, features.shape[0], rows):
        yield start, min(start + rows, features.shape[0])
