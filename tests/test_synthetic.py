"""Synthetic fields look like cells (by measurement), phenotypes move the right stain, and writers
produce plates the scanner reads back."""

import time

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from napari_cellmae.plates import iter_fields, read_field, scan_plate
from napari_cellmae.synthetic import (
    MAX_CHANNELS,
    PHENOTYPES,
    STAINS,
    format_phenotype,
    make_field,
    make_screen,
    parse_phenotype,
    write_plate,
)

SIZE = (192, 192)


def _nuclei(field: np.ndarray) -> tuple[np.ndarray, int]:
    dna = field[0].astype(float)
    mask = dna > np.percentile(dna, 50) + 0.5 * (dna.max() - np.percentile(dna, 50)) * 0.2
    mask = ndi.binary_opening(mask, iterations=1)
    labels, n = ndi.label(mask)
    return labels, n


def test_deterministic_and_seed_dependent():
    a = make_field(5, SIZE, seed=4)
    np.testing.assert_array_equal(a, make_field(5, SIZE, seed=4))
    assert not np.array_equal(a, make_field(5, SIZE, seed=5))


@pytest.mark.parametrize("n_channels", [1, 3, 5, 6, 11])
def test_channel_counts_and_dtypes(n_channels):
    field = make_field(n_channels, (64, 80), seed=0)
    assert field.shape == (n_channels, 64, 80) and field.dtype == np.uint16
    assert field.max() <= 4095  # 12-bit camera in a 16-bit container
    assert (field.reshape(n_channels, -1).std(axis=1) > 5).all()  # every stain has content
    assert make_field(n_channels, 32, dtype=np.uint8).dtype == np.uint8
    f32 = make_field(n_channels, 32, dtype=np.float32)
    assert f32.dtype == np.float32 and f32.min() >= 0 and f32.max() <= 1


def test_field_has_cells_nuclei_and_realistic_background():
    field = make_field(5, (512, 512), seed=1)
    _, n_nuclei = _nuclei(field)
    assert 40 <= n_nuclei <= 200  # ~100 cells in a 20x field of 512²
    background = np.percentile(field, 5, axis=(1, 2))
    assert (background > 80).all() and (background < 250).all()  # camera offset + background
    # stains differ in structure: DNA and Mito are not the same image
    assert np.corrcoef(field[0].ravel(), field[4].ravel())[0, 1] < 0.5


def test_fast_enough_for_tests_and_training():
    make_field(5, (64, 64), seed=0)  # warm-up
    t0 = time.perf_counter()
    make_field(5, (512, 512), seed=0)
    assert time.perf_counter() - t0 < 1.0


def test_illumination_falls_off_towards_the_corners():
    field = make_field(1, (256, 256), seed=2, density=3.0).astype(float)[0]
    centre = field[96:160, 96:160].mean()
    corners = np.mean([field[:48, :48].mean(), field[-48:, -48:].mean()])
    assert centre > corners


def _mean_in_cells(field, c):
    img = field[c].astype(float)
    return img[img > np.percentile(img, 60)].mean()


def test_phenotypes_change_their_stain():
    assert {"nucleus_size", "mito_fragmentation", "er_intensity", "cell_size", "actin_stress"} <= (
        set(PHENOTYPES)
    )
    seeds = range(3)
    control = [make_field(5, SIZE, seed=s) for s in seeds]

    def mean_nucleus_area(fields):
        areas = []
        for f in fields:
            labels, _ = _nuclei(f)
            areas += list(np.bincount(labels.ravel())[1:])
        return np.median(areas)

    bigger = [make_field(5, SIZE, seed=s, phenotype="nucleus_size") for s in seeds]
    assert mean_nucleus_area(bigger) > 1.4 * mean_nucleus_area(control)
    er = [make_field(5, SIZE, seed=s, phenotype="er_intensity", strength=1.0) for s in seeds]
    assert np.mean([_mean_in_cells(f, 1) for f in er]) > 1.5 * np.mean(
        [_mean_in_cells(f, 1) for f in control]
    )
    weak = [make_field(5, SIZE, seed=s, phenotype="er_intensity", strength=0.3) for s in seeds]
    assert np.mean([_mean_in_cells(f, 1) for f in weak]) < np.mean(
        [_mean_in_cells(f, 1) for f in er]
    )

    def mito_pieces_per_area(fields):  # tubules are few large objects, fragments many small
        ratios = []
        for f in fields:
            mito = f[4].astype(float)
            low, high = np.percentile(mito, (20, 99.5))
            mask = mito > low + 0.3 * (high - low)
            ratios.append(ndi.label(mask)[1] / mask.sum())
        return np.mean(ratios)

    half = [
        make_field(5, SIZE, seed=s, phenotype="mito_fragmentation", strength=0.5) for s in seeds
    ]
    full = [make_field(5, SIZE, seed=s, phenotype="mito_fragmentation") for s in seeds]
    pieces = [mito_pieces_per_area(f) for f in (control, half, full)]
    assert pieces[0] < pieces[1] < pieces[2] and pieces[2] > 2 * pieces[0]
    fewer = [make_field(5, SIZE, seed=s, phenotype="cytotoxic") for s in seeds]
    assert sum(_nuclei(f)[1] for f in fewer) < 0.7 * sum(_nuclei(f)[1] for f in control)


def test_zero_strength_is_a_control_and_phenotype_specs():
    np.testing.assert_array_equal(
        make_field(3, 64, seed=1, phenotype="nucleus_size", strength=0.0), make_field(3, 64, seed=1)
    )
    spec = parse_phenotype("nucleus_size=1;er_intensity=0.5")
    assert spec == {"nucleus_size": 1.0, "er_intensity": 0.5}
    assert parse_phenotype(format_phenotype(spec)) == spec
    assert parse_phenotype(float("nan")) == {} and parse_phenotype("") == {}
    with pytest.raises(ValueError, match="unknown phenotype"):
        make_field(3, 64, phenotype="glowing")
    with pytest.raises(ValueError, match="1..11"):
        make_field(MAX_CHANNELS + 1, 64)
    assert len(STAINS) == MAX_CHANNELS == 11


def test_batch_effects_shift_intensities_per_plate():
    base = make_field(5, SIZE, seed=3).astype(float)
    b1 = make_field(5, SIZE, seed=3, batch=1).astype(float)
    b2 = make_field(5, SIZE, seed=3, batch=2).astype(float)
    np.testing.assert_array_equal(b1, make_field(5, SIZE, seed=3, batch=1))
    ratio1 = b1.mean(axis=(1, 2)) / base.mean(axis=(1, 2))
    ratio2 = b2.mean(axis=(1, 2)) / base.mean(axis=(1, 2))
    assert np.abs(ratio1 - ratio2).max() > 0.05  # plates differ channel by channel


def test_compressed_plate_and_platemap_phenotypes(tmp_path):
    platemap = pd.DataFrame(
        {
            "Metadata_Well": ["A01", "A02"],
            "Metadata_Phenotype": ["", "nucleus_size=1"],
            "Metadata_Strength": [0.0, 1.5],
        }
    )
    write_plate(tmp_path, "imagexpress", sites=3, size=128, platemap=platemap, compression="zstd")
    index = scan_plate(tmp_path)
    assert index["Metadata_Well"].unique().tolist() == ["A01", "A02"]
    import tifffile

    with tifffile.TiffFile(index["path"].iloc[0]) as tif:
        assert tif.pages[0].compression.name == "ZSTD"
    areas = {}
    for meta, image, error in iter_fields(index):
        assert error is None
        labels, _ = _nuclei(image)
        areas.setdefault(meta["Metadata_Well"], []).extend(np.bincount(labels.ravel())[1:])
    assert np.median(areas["A02"]) > 1.4 * np.median(areas["A01"])


def test_make_screen_writes_plates_and_related_perturbations(tmp_path):
    platemap = make_screen(
        tmp_path, n_plates=2, perturbations=6, replicates=2, controls=3, size=32, layout="cellomics"
    )
    assert list(platemap.columns) == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Perturbation",
        "Metadata_Mechanism",
        "Metadata_IsControl",
        "Metadata_Phenotype",
        "Metadata_Strength",
    ]
    assert len(platemap) == 2 * (6 * 2 + 3)
    per_plate = platemap.groupby("Metadata_Plate")
    assert (per_plate["Metadata_IsControl"].sum() == 3).all()
    assert not platemap.duplicated(["Metadata_Plate", "Metadata_Well"]).any()
    treated = platemap[~platemap["Metadata_IsControl"]]
    groups = treated.groupby("Metadata_Mechanism")["Metadata_Phenotype"].agg(
        lambda s: {frozenset(parse_phenotype(p)) for p in s}
    )
    assert all(len(names) == 1 for names in groups)  # a mechanism shares its phenotypes
    assert treated["Metadata_Mechanism"].nunique() == 2
    on_disk = pd.read_csv(tmp_path / "platemap.csv")
    assert len(on_disk) == len(platemap)
    index = scan_plate(tmp_path)
    assert sorted(index["Metadata_Plate"].unique()) == ["SCREEN-1", "SCREEN-2"]
    assert index.attrs["n_fields"] == len(platemap)
    well = platemap["Metadata_Well"].iloc[0]
    assert read_field(index, well, plate="SCREEN-1").shape == (5, 32, 32)
    again = make_screen(
        tmp_path / "x", n_plates=2, perturbations=6, replicates=2, controls=3, write=False
    )
    pd.testing.assert_frame_equal(again, platemap)
