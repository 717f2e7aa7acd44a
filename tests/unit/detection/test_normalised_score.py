"""The normalised image score: 0 at the lowest good score, 0.5 at the threshold, monotone, clipped to [0, 1]."""

from __future__ import annotations

import numpy as np

from m3dm.detection.thresholds import Thresholds

GOOD = [2.0, 2.5, 3.0, 3.2, 4.0]


def thresholds(image=None) -> Thresholds:
    made = Thresholds.from_good_parts(GOOD, np.zeros((len(GOOD), 2, 2)), far=0.2, source="test")
    return made if image is None else made.with_overrides(image=image)


def test_threshold_reads_half_and_the_good_minimum_zero():
    t = thresholds()
    assert t.image == 3.2  # the 4th smallest of 5 at far 0.2
    assert t.normalised(2.0) == 0.0 and t.normalised(t.image) == 0.5
    assert np.isclose(t.normalised(2.6), 0.25) and np.isclose(t.normalised(3.8), 0.75)
    assert t.normalised(1.0) == 0.0 and t.normalised(4.4) == 1.0 and t.normalised(100.0) == 1.0


def test_it_is_monotone_and_above_half_exactly_when_the_part_fails():
    for t in (thresholds(), thresholds(image=1.5), thresholds(image=3.2000000000000006)):
        scores = np.sort(np.concatenate([np.linspace(0.0, 8.0, 401), [t.image, np.nextafter(t.image, np.inf)]]))
        values = [t.normalised(float(s)) for s in scores]
        assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values)
        assert all((v > 0.5) == t.fails(float(s)) for s, v in zip(scores, values))
