"""Our MeasureImageQuality metrics against values CellProfiler's own code produced on the real
images (tests/data/cellprofiler_iq.json, made once by scripts/cellprofiler_reference.py with
cellprofiler-library 5.0.0.dev784 / centriole; CellProfiler itself is not installed here), and
CellProfiler's bit-depth scaling (the TIFF's MaxSampleValue)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_cellmae.plates import read_image
from napari_cellmae.qc import metrics as m

REFERENCE = Path(__file__).parent / "data" / "cellprofiler_iq.json"
# measured worst relative differences over the 17 images (see docs/qc.md): float64 sums agree
# to ~1e-15, PowerLogLogSlope to 2e-8 (our float32 FFT), ThresholdOtsu to 7e-8 (float32 pixels,
# as CellProfiler casts them); the tolerances below leave a margin over those.
TOLERANCE = {"PowerLogLogSlope": 1e-6, "ThresholdOtsu": 1e-6}
DEFAULT_TOLERANCE = 1e-9


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())["images"]


def test_reference_covers_every_real_source_and_metric():
    ref = _reference()
    sources = {rel.split("/")[0] for rel in ref}
    assert sources == {
        "transfluor-plate",
        "ExampleHuman",
        "speckles",
        "bbbc022-cellpainting",
        "bbbc022-raw-imagexpress",
        "jump-pilot-phenix",
    }
    cp_metrics = set(m.metric_names(cues=False)) - {
        "LowerQuartileIntensity",
        "UpperQuartileIntensity",
    }
    for entry in ref.values():  # quartiles and the cues are ours: MeasureImageQuality has none
        assert set(entry["values"]) == cp_metrics


@pytest.mark.parametrize("rel", sorted(json.loads(REFERENCE.read_text())["images"]))
def test_every_metric_matches_cellprofiler_on_real_images(real_data, rel):
    entry = _reference()[rel]
    path = real_data / rel
    top = m.file_max_value(path)
    planes = read_image(path)
    assert (top if top is not None else float(np.iinfo(planes.dtype).max)) == entry["scale"]
    values = m.measure(planes[:1], (20,), max_value=top)
    for name, expected in entry["values"].items():
        tol = TOLERANCE.get(name, DEFAULT_TOLERANCE)
        assert values[name][0] == pytest.approx(expected, rel=tol, abs=1e-12), (rel, name)


def test_otsu_is_cellprofilers_log_otsu_not_a_linear_histogram(real_data):
    """On the JUMP Phenix RNA image the linear 256-bin Otsu (scikit-image, what we had) is 3.8×
    CellProfiler's value; ours is CellProfiler's."""
    from skimage.filters import threshold_otsu as linear_otsu

    rel = "jump-pilot-phenix/r01c01f01p01-ch3sk1fk1fl1.tiff"
    expected = _reference()[rel]["values"]["ThresholdOtsu"]
    x = read_image(real_data / rel)[0] / 65535.0
    assert linear_otsu(x) / expected > 3
    assert m.threshold_otsu(x)[0] == pytest.approx(expected, rel=1e-6)


def _write_12_in_16(path: Path, data: np.ndarray, tag: bool = True) -> None:
    import tifffile

    extratags = [(281, "H", 1, 4095, True)] if tag else []  # 281 = MaxSampleValue
    tifffile.imwrite(path, data, extratags=extratags)


def test_max_sample_value_scales_12_bit_data_in_16_bit_tiffs(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4096, (64, 80)).astype(np.uint16)
    data[:8, :8] = 4095
    tagged, plain = tmp_path / "tagged.tif", tmp_path / "plain.tif"
    _write_12_in_16(tagged, data)
    _write_12_in_16(plain, data, tag=False)
    assert m.file_max_value(tagged) == 4095.0
    assert m.file_max_value(plain) is None  # no tag: the dtype's range applies
    assert m.file_max_value(tmp_path / "x.png") is None
    assert m.file_max_value(tmp_path / "missing.tif") is None
    scaled = m.measure(data, (20,), max_value=m.file_max_value(tagged))
    raw = m.measure(data, (20,), max_value=m.file_max_value(plain))
    assert scaled["MaxIntensity"][0] == 1.0  # 4095 / 4095: the sensor's ceiling
    assert raw["MaxIntensity"][0] == pytest.approx(4095 / 65535)
    assert scaled["MeanIntensity"][0] == pytest.approx(data.mean() / 4095)
    for name in ("MeanIntensity", "FocusScore", "ThresholdOtsu", "LocalFocusScore_20"):
        assert scaled[name][0] == pytest.approx(raw[name][0] * 65535 / 4095, rel=1e-6), name
    for name in ("PowerLogLogSlope", "Correlation_20", "PercentMaximal"):  # scale-free
        assert scaled[name][0] == pytest.approx(raw[name][0], rel=1e-6), name
    per_channel = m.measure(np.stack([data, data]), (20,), max_value=[4095.0, None])
    assert per_channel["MaxIntensity"].tolist() == pytest.approx([1.0, 4095 / 65535])
    with pytest.raises(ValueError, match="max_value"):
        m.measure(np.stack([data, data]), (20,), max_value=[4095.0])
    with pytest.raises(ValueError, match="positive"):
        m.measure(data, (20,), max_value=0)


def test_qc_run_uses_the_files_max_sample_value(tmp_path):
    """The plate QC path reads each file's tag: a 12-bit plate is measured / 4095."""
    from napari_cellmae.progress import run
    from napari_cellmae.qc.run import measure_plate

    plate = tmp_path / "plate"
    plate.mkdir()
    rng = np.random.default_rng(1)
    for well in ("A01", "A02"):
        data = rng.integers(100, 4000, (64, 64)).astype(np.uint16)
        _write_12_in_16(plate / f"p_{well}_s1_w1.tif", data)
    result = run(measure_plate(plate, layout="imagexpress"))
    for row in result.images.itertuples():
        data = read_image(row.path)[0]
        assert row.QC_MeanIntensity == pytest.approx(data.mean() / 4095)
