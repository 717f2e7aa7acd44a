"""Decision Layer Fusion (DLF, docs/original.md, quirk 36): two one-class SVMs that fuse per-modality scores.

``detect_fuser`` is fitted on the training samples' image-score vectors ``(N, k)``, ``seg_fuser`` on their
per-pixel score matrices ``(N·H·W, k)`` (k = 2 or 3 modalities). Test scores are ``score_samples``, the
*unshifted* linear score ``x · coef_`` (COMPAT: used directly as "higher = more anomalous").

Precision: the SVMs are fitted in float64 by default. scikit-learn < 1.3 (the reference's era) converted the
reference's float32 input to float64; newer versions train in float32 when given float32, which changes the SGD
trajectory. The float64 pixel matrix costs 8·N·H·W·k bytes (≈ 294 MB for 244 samples × 50176 pixels × 3),
plus about 16·N·H·W bytes of labels and weights scikit-learn allocates; ``dtype=np.float32`` halves the first.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import DTypeLike
from sklearn.linear_model import SGDOneClassSVM

ArrayLike = np.ndarray | torch.Tensor


def _as_matrix(values: ArrayLike, dtype: DTypeLike | None = None) -> np.ndarray:
    """A 2-D C-contiguous NumPy view or copy (a copy only when the dtype or layout requires it)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    matrix = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    if matrix.ndim != 2:
        raise ValueError(f"expected a (rows, modalities) matrix, got shape {matrix.shape}")
    return np.ascontiguousarray(matrix)


class DecisionLayerFusion:
    """The reference's ``detect_fuser`` / ``seg_fuser`` pair: ``SGDOneClassSVM(nu, max_iter, random_state)``."""

    def __init__(self, nu: float = 0.5, max_iter: int = 1000, random_state: int = 42,
                 dtype: type = np.float64) -> None:
        self.dtype = dtype
        self.detect_fuser = SGDOneClassSVM(nu=nu, max_iter=max_iter, random_state=random_state)
        self.seg_fuser = SGDOneClassSVM(nu=nu, max_iter=max_iter, random_state=random_state)
        self._n_modalities: int | None = None

    @property
    def fitted(self) -> bool:
        return self._n_modalities is not None

    def fit(self, image_vectors: ArrayLike, pixel_matrix: ArrayLike) -> DecisionLayerFusion:
        """Fit ``detect_fuser`` on ``(N, k)`` image vectors and ``seg_fuser`` on the ``(N·H·W, k)`` pixel matrix."""
        images = _as_matrix(image_vectors, self.dtype)
        pixels = _as_matrix(pixel_matrix, self.dtype)
        if images.shape[1] != pixels.shape[1]:
            raise ValueError(f"image vectors have {images.shape[1]} modalities, pixels {pixels.shape[1]}")
        self._n_modalities = None
        self.detect_fuser.fit(images)
        self.seg_fuser.fit(pixels)
        self._n_modalities = images.shape[1]
        return self

    def _check_ready(self, matrix: np.ndarray) -> None:
        if not self.fitted:
            raise RuntimeError("DecisionLayerFusion must be fitted before scoring")
        if matrix.shape[1] != self._n_modalities:
            raise ValueError(f"fitted on {self._n_modalities} modalities, got {matrix.shape[1]}")

    def score_image(self, vectors: ArrayLike) -> np.ndarray:
        """Fused image scores ``(n,)`` = ``detect_fuser.score_samples`` of ``(n, k)`` vectors."""
        matrix = _as_matrix(vectors)
        self._check_ready(matrix)
        return self.detect_fuser.score_samples(matrix)

    def score_pixels(self, matrix: ArrayLike) -> np.ndarray:
        """Fused pixel scores ``(rows,)`` = ``seg_fuser.score_samples`` of a ``(rows, k)`` matrix."""
        pixels = _as_matrix(matrix)
        self._check_ready(pixels)
        return self.seg_fuser.score_samples(pixels)

    @property
    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Learned ``coef_`` of both SVMs (the DLF is only oriented correctly if they are positive)."""
        if not self.fitted:
            raise RuntimeError("DecisionLayerFusion is not fitted")
        return self.detect_fuser.coef_.ravel().copy(), self.seg_fuser.coef_.ravel().copy()

    # -- saving and loading (Detector.to_state / from_state) ------------------------------------------------
    _FUSERS = ("detect_fuser", "seg_fuser")

    def export_state(self) -> dict:
        """The fitted arrays of both SVMs (``coef_``, ``offset_``, ...) and their parameters, as tensors and
        primitives: no pickled scikit-learn object."""
        if not self.fitted:
            raise RuntimeError("DecisionLayerFusion is not fitted")
        fusers = {}
        for name in self._FUSERS:
            svm = getattr(self, name)
            fusers[name] = {"params": svm.get_params(), "coef": torch.from_numpy(svm.coef_.copy()),
                            "offset": torch.from_numpy(np.asarray(svm.offset_).copy()), "t": float(svm.t_),
                            "n_iter": int(svm.n_iter_)}
        return {"dtype": np.dtype(self.dtype).name, "n_modalities": self._n_modalities, "fusers": fusers}

    @classmethod
    def from_state(cls, state: dict) -> DecisionLayerFusion:
        """Rebuild the fitted pair from ``export_state``: ``score_samples`` then runs scikit-learn's own code on
        the same arrays, so scores are bit-identical to the original's."""
        params = state["fusers"]["detect_fuser"]["params"]
        fusion = cls(nu=params["nu"], max_iter=params["max_iter"], random_state=params["random_state"],
                     dtype=np.dtype(state["dtype"]).type)
        for name in cls._FUSERS:
            saved = state["fusers"][name]
            svm = SGDOneClassSVM(**saved["params"])
            svm.coef_ = saved["coef"].numpy().copy()
            svm.offset_ = saved["offset"].numpy().copy()
            svm.t_, svm.n_iter_ = saved["t"], saved["n_iter"]
            svm.n_features_in_ = svm.coef_.shape[-1]
            if svm.n_features_in_ != state["n_modalities"]:
                raise ValueError(f"saved {name} has {svm.n_features_in_} weights for {state['n_modalities']} "
                                 f"modalities")
            setattr(fusion, name, svm)
        fusion._n_modalities = state["n_modalities"]
        return fusion
