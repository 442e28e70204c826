"""The baseline statistics: names, values on hand-made fields, flat channels, phenotypes."""

import numpy as np
import pytest

from napari_cellmae.features import CHANNEL_STATS, feature_names, field_features
from napari_cellmae.synthetic import make_field


def test_names_match_values_and_hand_made_statistics():
    rng = np.random.default_rng(0)
    a = rng.integers(100, 200, (64, 64)).astype(np.uint16)
    field = np.stack([a, a * 2, np.full_like(a, 7)])  # C = 3: a copy, a scaled copy, a flat one
    values = field_features(field)
    names = feature_names(3)
    assert len(values) == len(names) == 3 * len(CHANNEL_STATS) + 3 and values.dtype == np.float32
    got = dict(zip(names, values))
    sub = a[::2, ::2].astype(np.float64)
    assert got["feat_c0_mean"] == pytest.approx(sub.mean(), rel=1e-6)
    assert got["feat_c1_mean"] == pytest.approx(2 * sub.mean(), rel=1e-6)
    assert got["feat_c0_p50"] == pytest.approx(np.median(sub))
    assert got["feat_c0_c1_corr"] == pytest.approx(1.0, abs=1e-6)
    # a flat channel: no spread, no texture, no correlation, and nothing undefined
    assert got["feat_c2_std"] == 0 and got["feat_c2_gradient"] == 0
    assert got["feat_c2_coverage"] == 0 and got["feat_c0_c2_corr"] == 0
    assert np.isfinite(values).all()
    with pytest.raises(ValueError, match=r"Expected a field \(C, H, W\)"):
        field_features(a)


def test_statistics_see_a_phenotype():
    control = field_features(make_field(3, 256, seed=1))
    brighter_er = field_features(make_field(3, 256, seed=1, phenotype="er_intensity", strength=1))
    names = feature_names(3)
    er_mean = names.index("feat_c1_mean")  # channel 1 is the ER stain
    assert brighter_er[er_mean] > 1.3 * control[er_mean]
    dna_mean = names.index("feat_c0_mean")
    assert brighter_er[dna_mean] == pytest.approx(control[dna_mean], rel=0.1)
