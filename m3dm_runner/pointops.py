"""What an exported model leaves to the runner, in NumPy: valid points, farthest point sampling, DropPath draws.

Each function reproduces its PyTorch counterpart bit for bit (float32 arithmetic in the same order):
``m3dm.features.alignment.valid_points``, ``m3dm.features.pointops.pad_clouds`` / ``farthest_point_sample`` and
the draws of ``PointTransformer.drop_path_scales`` from a ``torch.Generator`` (MT19937, whose state an exported
model carries).
"""

from __future__ import annotations

import numpy as np

FPS_INITIAL_DISTANCE = 1e10
FPS_MIN_SQUARED_NORM = 1e-3
DRAWS_PER_SAMPLE = (12, 2)  # (transformer blocks, branches) of the point backbone's DropPath
_MT_STATE_WORDS = 624
_FLOAT24 = np.float32(1.0 / (1 << 24))


def valid_points(organized: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(3, S, S)`` organized cloud -> valid points ``(N, 3)`` float32 in row-major order and their flat pixel
    indices; a pixel is valid when its three coordinates are non-zero."""
    flat = np.ascontiguousarray(organized.reshape(3, -1).T, dtype=np.float32)
    pixels = np.flatnonzero((flat != 0).all(axis=1))
    return flat[pixels], pixels.astype(np.int64)


def pad_clouds(clouds: list[np.ndarray], pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Clouds of different sizes as one ``(B, N, 3)`` batch padded with copies of each cloud's point 0 (FPS
    never picks them while a real point is farther), and their pixels ``(B, N)``, -1 on padding."""
    longest = max(len(c) for c in clouds)
    points = np.stack([np.concatenate([c, np.repeat(c[:1], longest - len(c), axis=0)]) for c in clouds])
    index = np.stack([np.concatenate([p, np.full(longest - len(p), -1, np.int64)]) for p in pixels])
    return points, index


def farthest_point_sample(points: np.ndarray, n_samples: int) -> np.ndarray:
    """``(B, N, 3)`` float32 -> ``(B, n_samples)`` int64, the semantics of pointnet2_ops' kernel: start at index
    0, keep each point's running minimum squared distance (points within 1e-3 of the origin never chosen), take
    the first argmax. One vectorised step over the batch per centre."""
    x, y, z = (np.ascontiguousarray(points[..., axis]) for axis in range(3))
    selectable = (x * x + y * y + z * z).astype(np.float64) > FPS_MIN_SQUARED_NORM
    running = np.where(selectable, np.float32(FPS_INITIAL_DISTANCE), np.float32(-1.0)).astype(np.float32)
    batch = np.arange(points.shape[0])
    chosen = np.zeros((points.shape[0], n_samples), dtype=np.int64)
    current = np.zeros(points.shape[0], dtype=np.int64)
    dist, part = np.empty_like(x), np.empty_like(x)
    for j in range(1, n_samples):
        np.square(np.subtract(x, x[batch, current][:, None], out=dist), out=dist)
        dist += np.square(np.subtract(y, y[batch, current][:, None], out=part), out=part)
        dist += np.square(np.subtract(z, z[batch, current][:, None], out=part), out=part)
        np.minimum(running, dist, out=running)
        current = running.argmax(axis=1)
        chosen[:, j] = current
    return chosen


class DropPathDraws:
    """The uniforms ``torch.rand(24, generator=g)`` draws for each sample, from the state of ``g`` an exported
    model carries (``key``: MT19937's 624 words, ``pos``: the next word): the same stream ``m3dm.predict``
    continues after loading the model."""

    def __init__(self, key: list[int], pos: int) -> None:
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937",
                            "state": {"key": np.asarray(key, dtype=np.uint32), "pos": int(pos)}}

    @classmethod
    def from_torch_state(cls, state: np.ndarray) -> DropPathDraws:
        """From ``torch.Generator.get_state()`` bytes (CPU generator: seed, left, seeded, next, 624 words)."""
        state = np.asarray(state, dtype=np.uint8)
        left = int(state[8:12].view(np.int32)[0])
        next_word = int(state[16:24].view(np.uint64)[0])
        key = state[24:24 + 8 * _MT_STATE_WORDS].view(np.uint64).astype(np.uint32)
        return cls(key.tolist(), _MT_STATE_WORDS if left == 1 else next_word)

    def state(self) -> tuple[list[int], int]:
        inner = self._bits.state["state"]
        return [int(v) for v in inner["key"]], int(inner["pos"])

    def draw(self, batch: int) -> np.ndarray:
        """``(batch, 12, 2)`` float32 uniforms in [0, 1): 24-bit mantissas, as PyTorch's CPU ``rand``."""
        words = self._bits.random_raw(batch * DRAWS_PER_SAMPLE[0] * DRAWS_PER_SAMPLE[1]).astype(np.uint32)
        return ((words & ((1 << 24) - 1)).astype(np.float32) * _FLOAT24).reshape(batch, *DRAWS_PER_SAMPLE)
