"""Masked reconstruction of whole fields: tiling and stitching, hidden channels, the summary against
an independent computation, seeds, the files written, and ``cellmae reconstruct``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from _openphenom_ref import SMALL_OPENPHENOM
from napari_cellmae import tiling
from napari_cellmae.cli import main
from napari_cellmae.inference import CellMAEModel
from napari_cellmae.model import CellMAE, create_model, standardize
from napari_cellmae.plates.read import read_image
from napari_cellmae.progress import run
from napari_cellmae.reconstruct import (
    _Blender,
    blend_starts,
    blend_window,
    field_mask,
    reconstruct_field,
    save_reconstruction,
)
from napari_cellmae.synthetic import make_field, write_plate

EXAMPLE_HUMAN_D0 = "ExampleHuman/AS_09125_050116030001_D03f00d0.tif"


@pytest.fixture(scope="module")
def model() -> CellMAEModel:
    torch.manual_seed(0)
    return CellMAEModel(create_model("cellmae_vit_test_patch16_256"), "cpu", "fp32", name="test")


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return make_field(n_channels=3, size=(600, 700), seed=1)  # uint16, 12-bit values


@pytest.fixture(scope="module")
def small_field() -> np.ndarray:
    return make_field(n_channels=3, size=(300, 280), seed=2)  # 2×2 overlapping crops


@pytest.fixture(scope="module")
def result(model, field):
    events = []
    out = run(reconstruct_field(model, field, 0.75, seed=3, batch_size=4), progress=events.append)
    return out, events


@pytest.fixture(scope="module")
def openphenom_layout_dir(tmp_path_factory):
    """A model folder with OpenPhenom's 6-channel cross-attention decoder (tiny widths)."""
    from napari_cellmae.hub import save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "openphenom-layout"
    save_model(CellMAE(SMALL_OPENPHENOM), folder, metadata={"name": "six-channel"})
    return folder


def _crops_and_masks(model, field, ratio=0.75, seed=3, hidden=()):
    """The crops, positions and per-crop masks reconstruct_field uses, rebuilt from the public
    pieces: the field padded to whole patches, overlapping crops on its patch grid, one field
    mask cut per crop."""
    c, h, w = field.shape
    ph, pw = -(-h // 16) * 16, -(-w // 16) * 16
    padded = np.pad(field, [(0, 0), (0, ph - h), (0, pw - w)], mode="reflect")
    ys, xs = blend_starts(ph, 256, 16, 64), blend_starts(pw, 256, 16, 64)
    positions = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    fmask = field_mask(c, (ph // 16, pw // 16), ratio, seed, hidden)
    grid = positions // 16
    masks = np.stack([fmask[:, y : y + 16, x : x + 16] for y, x in grid])
    return tiling.extract_crops(padded, positions), positions, masks, fmask


def test_tiles_blend_and_keep_units_on_a_600x700_field(model, field, result):
    rec, events = result
    assert [e.done for e in events] == [0, 4, 8, 12] and {e.total for e in events} == {12}
    assert rec.masked.shape == rec.reconstruction.shape == rec.error.shape == (3, 600, 700)
    assert rec.mask.shape == (3, 600, 700) and rec.mask.dtype == bool
    assert rec.masked.dtype == np.uint16 and rec.reconstruction.dtype == np.float32
    assert rec.error.dtype == np.float32 and (rec.error >= 0).all()
    np.testing.assert_array_equal(rec.masked, np.where(rec.mask, 0, field))
    assert abs(rec.mask.mean() - 0.75) < 0.02
    assert rec.reconstruction.min() >= 0 and rec.reconstruction.max() <= 65535
    assert abs(np.median(rec.reconstruction) - np.median(field)) < 3 * field.std()
    # the MAE figure: visible pixels are the input's, hidden ones the prediction
    np.testing.assert_array_equal(rec.composite[~rec.mask], field[~rec.mask].astype(np.float32))
    np.testing.assert_array_equal(rec.composite[rec.mask], rec.reconstruction[rec.mask])

    # every pixel: the window-weighted mean of the crops that cover it, each hidden or visible
    # alike in all of them (recomputed here by brute force)
    crops, positions, masks, _ = _crops_and_masks(model, field)
    np.testing.assert_array_equal(rec.positions, positions)
    assert min(np.diff(np.unique(positions[:, 0]))) <= 256 - 64  # neighbours overlap >= 64 px
    ref = model.reconstruct(crops, mask=masks)
    window = blend_window(256, 80)  # the least overlap of this tiling (608 and 704 padded)
    rng = np.random.default_rng(0)
    for y, x in zip(rng.integers(0, 600, 200), rng.integers(0, 700, 200)):
        inside = np.flatnonzero(
            (positions[:, 0] <= y)
            & (y < positions[:, 0] + 256)
            & (positions[:, 1] <= x)
            & (x < positions[:, 1] + 256)
        )
        cy, cx = y - positions[inside, 0], x - positions[inside, 1]
        hid = masks[inside, :, cy // 16, cx // 16]  # (k, C)
        assert (hid == hid[:1]).all() and hid[0].tolist() == rec.mask[:, y, x].tolist()
        wts = window[cy, cx][:, None]
        expected = (wts * ref.reconstruction[inside, :, cy, cx]).sum(0) / wts.sum()
        np.testing.assert_allclose(rec.reconstruction[:, y, x], np.clip(expected, 0, 65535),
                                   rtol=1e-4, atol=1e-2)  # fmt: skip
        err = (wts * ref.error[inside, :, cy // 16, cx // 16]).sum(0) / wts.sum()
        np.testing.assert_allclose(rec.error[:, y, x], err, rtol=1e-4, atol=1e-6)


def test_blending_leaves_no_seams_at_crop_boundaries():
    """Crops whose outputs differ by a constant (per-crop standardisation does that) blend into
    a ramp: no step anywhere, where pasting each pixel from one crop jumps by the whole offset."""
    ys, xs = blend_starts(608, 256, 16, 64), blend_starts(704, 256, 16, 64)
    positions = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    tiles = np.arange(len(positions), dtype=np.float32)[:, None, None, None] * 100
    blend = _Blender(positions, (608, 704), 256, 80, 1)
    out = blend.new()
    blend.add(out, np.broadcast_to(tiles, (len(positions), 1, 256, 256)), 0)
    out = blend.finish(out)[0]
    steps = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    assert steps < 0.05 * np.ptp(tiles)  # smooth: at most a few % of the offsets per pixel
    assert out[0, 0] == pytest.approx(0) and out[-1, -1] == pytest.approx(tiles.max())
    assert blend_starts(256, 256, 16, 64).tolist() == [0]
    assert blend_starts(512, 256, 16, 64).tolist() == [0, 128, 256]
    assert (blend_starts(1088, 256, 16, 64) % 16 == 0).all()


def test_summary_matches_an_independent_computation(model, field, result):
    rec, _ = result
    crops, _, masks, fmask = _crops_and_masks(model, field)
    ref = model.reconstruct(crops, mask=masks)
    x, _, _ = standardize(torch.from_numpy(crops.astype(np.float32)))
    x = x.numpy()
    summary = rec.summary
    assert list(summary["channel"]) == ["ch0", "ch1", "ch2"]
    for c in range(3):
        row = summary.iloc[c]
        assert row["hidden_patches"] == fmask[c, :38, :44].sum()  # patches touching 600×700
        assert row["hidden_fraction"] == pytest.approx(rec.mask[c].mean())
        assert row["masked_error"] == pytest.approx(ref.error[:, c][masks[:, c]].mean(), rel=1e-5)
        # mean-fill baseline, patch by patch
        errs = []
        for k in range(len(crops)):
            grid = masks[k, c].repeat(16, 0).repeat(16, 1)
            fill = x[k, c][~grid].mean()
            for i, j in zip(*np.nonzero(masks[k, c])):
                patch = x[k, c, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16]
                errs.append(((patch - fill) ** 2).mean())
        assert row["mean_fill_error"] == pytest.approx(np.mean(errs), rel=1e-4)
        assert row["ratio"] == pytest.approx(row["masked_error"] / row["mean_fill_error"])


def test_hidden_channel_is_fully_masked(model, small_field):
    rec = run(reconstruct_field(model, small_field, 0.5, seed=0, hidden_channels=["ER"],
                                channel_names=["DNA", "ER", "RNA"]))  # fmt: skip
    assert rec.hidden_channels == (1,)
    assert rec.mask[1].all() and not rec.masked[1].any()
    assert 0.45 < rec.mask[0].mean() < 0.55 and 0.45 < rec.mask[2].mean() < 0.55
    row = rec.summary.set_index("channel").loc["ER"]
    assert row["hidden_channel"] and row["hidden_fraction"] == 1.0
    assert row["hidden_patches"] == 19 * 18  # every patch of the 300×280 field
    assert row["mean_fill_error"] == pytest.approx(1.0, abs=1e-3)  # filled with the crop's mean
    same = run(reconstruct_field(model, small_field, 0.5, seed=0, hidden_channels=[1]))
    np.testing.assert_array_equal(same.mask, rec.mask)
    # a fully hidden channel with ratio 0: only that channel is hidden
    only = run(reconstruct_field(model, small_field, 0.0, hidden_channels=[2]))
    assert only.mask[2].all() and not only.mask[:2].any()


def test_seed_determinism_independent_of_batch_size(model, small_field):
    rec = run(reconstruct_field(model, small_field, 0.75, seed=3, batch_size=4))
    again = run(reconstruct_field(model, small_field, 0.75, seed=3, batch_size=1))
    np.testing.assert_array_equal(again.mask, rec.mask)
    np.testing.assert_allclose(again.reconstruction, rec.reconstruction, rtol=1e-4, atol=1e-2)
    other = run(reconstruct_field(model, small_field, 0.75, seed=4))
    assert (other.mask != rec.mask).mean() > 0.2


def test_small_fields_are_padded_and_cropped_back(model):
    small = np.random.default_rng(0).integers(0, 255, (2, 100, 300), dtype=np.uint8)
    rec = run(reconstruct_field(model, small, 0.75))
    assert rec.reconstruction.shape == (2, 100, 300) and rec.masked.dtype == np.uint8
    assert rec.reconstruction.min() >= 0 and rec.reconstruction.max() <= 255


def test_bad_input_messages(model, field):
    six = CellMAEModel(CellMAE(SMALL_OPENPHENOM), "cpu", "fp32", name="OpenPhenom-like")
    with pytest.raises(ValueError, match="reconstructs exactly 6 channels; the field has 3"):
        next(reconstruct_field(six, field))
    with pytest.raises(ValueError, match="at least one channel"):
        next(reconstruct_field(model, field, hidden_channels=[0, 1, 2]))
    with pytest.raises(ValueError, match=r"'Golgi' is not a channel: use a name \(DNA, ER, RNA\)"):
        next(reconstruct_field(model, field, hidden_channels=["Golgi"],
                               channel_names=["DNA", "ER", "RNA"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        next(reconstruct_field(model, field, mask_ratio=1.0))
    with pytest.raises(ValueError, match="Add a channel axis"):
        next(reconstruct_field(model, field[0]))


def test_save_writes_ome_tiffs_preview_summary_and_record(result, tmp_path):
    rec, _ = result
    paths = save_reconstruction(rec, tmp_path / "out", stem="A01", extra={"input": "x"})
    for kind, dtype in (
        ("masked", np.uint16),
        ("reconstruction", np.float32),
        ("composite", np.float32),
        ("error", np.float32),
        ("mask", np.uint8),
    ):
        with tifffile.TiffFile(paths[kind]) as tif:
            assert tif.is_ome and tif.series[0].axes == "CYX"
            assert tif.series[0].shape == (3, 600, 700) and tif.series[0].dtype == dtype
            assert tif.ome_metadata.count('Name="ch') == 3
        assert paths[kind].name == f"A01_{kind}.ome.tif"
    np.testing.assert_array_equal(read_image(paths["masked"]), rec.masked)
    np.testing.assert_array_equal(read_image(paths["mask"]).astype(bool), rec.mask)
    png = paths["preview"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(paths["run"].read_text())
    assert record["model"]["checksum"] == rec.model["checksum"]
    assert record["model"]["name"] == "test"
    assert record["mask_ratio"] == 0.75 and record["seed"] == 3
    assert record["hidden_channels"] == [] and record["channel_names"] == ["ch0", "ch1", "ch2"]
    assert record["input"] == "x" and record["files"]["preview"] == "A01_preview.png"
    table = pd.read_csv(tmp_path / "out" / "A01_summary.csv")
    np.testing.assert_allclose(table["masked_error"], rec.summary["masked_error"], rtol=1e-6)
    assert not list((tmp_path / "out").glob(".*part"))  # no temporary files left


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_on_a_synthetic_plate(tmp_path, test_model_dir, capsys):
    plate = write_plate(tmp_path, "imagexpress", wells=["A02"], sites=2, n_channels=3, size=300)
    out = tmp_path / "recon"
    code = main(
        ["reconstruct", str(plate), "--well", "A02", "--site", "2", "--mask-ratio", "0.5",
         "--seed", "7", "--hide-channel", "w3", "--model", str(test_model_dir),
         "--device", "cpu", "--batch-size", "2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    stem = "SYNTH-P1_A02_s2"
    record = json.loads((out / f"{stem}_run.json").read_text())
    assert record["input"]["Metadata_Well"] == "A02" and record["input"]["Metadata_Site"] == 2
    assert record["mask_ratio"] == 0.5 and record["seed"] == 7
    assert record["hidden_channels"] == ["w3"] and record["model"]["source"] == str(test_model_dir)
    assert json.loads((out / "channels.json").read_text())["channels"] == ["w1", "w2", "w3"]
    mask = read_image(out / f"{stem}_mask.ome.tif")
    assert mask.shape == (3, 300, 300) and mask[2].all() and 0.45 < mask[:2].mean() < 0.55
    printed = capsys.readouterr().out
    assert "masked_error" in printed and "w3" in printed


def test_cli_on_a_real_field_file_and_on_its_own_output(real_data, tmp_path, test_model_dir):
    out = tmp_path / "real"
    src = real_data / EXAMPLE_HUMAN_D0  # one file of the Cellomics plate -> its whole field
    assert main(["reconstruct", str(src), "--model", str(test_model_dir), "--out", str(out)]) == 0
    stem = "AS_09125_050116030001_D03_s1"
    masked = out / f"{stem}_masked.ome.tif"
    image = read_image(masked)
    assert image.shape == (3, 512, 512) and image.dtype == np.uint8
    summary = pd.read_csv(out / f"{stem}_summary.csv")
    assert list(summary["channel"]) == ["d0", "d1", "d2"]
    assert (summary["hidden_fraction"] > 0.7).all() and (summary["mean_fill_error"] > 0.5).all()
    # a multi-channel OME-TIFF (no plate around it): channel names come from its metadata
    again = tmp_path / "again"
    assert main(["reconstruct", str(masked), "--hide-channel", "d2", "--hide-channel", "0",
                 "--model", str(test_model_dir), "--out", str(again)]) == 0  # fmt: skip
    record = json.loads((again / "AS_09125_050116030001_D03_s1_masked_run.json").read_text())
    assert record["channel_names"] == ["d0", "d1", "d2"]
    assert record["hidden_channels"] == ["d0", "d2"]


def test_cli_errors_are_one_line(tmp_path, test_model_dir, openphenom_layout_dir, capsys):
    plate = write_plate(tmp_path, "imagexpress", wells=1, sites=1, n_channels=3, size=64)
    code = main(["reconstruct", str(plate), "--model", str(openphenom_layout_dir),
                 "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 2  # the "no --well given" note, then the error
    assert "six-channel reconstructs exactly 6 channels" in err and "the field has 3" in err
    assert not (tmp_path / "o").exists()
    tif = next(plate.rglob("*.tif"))
    assert main(["reconstruct", str(tif), "--well", "A01", "--out", str(tmp_path / "o")]) == 2
    assert "leave them out, or pass the plate folder" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_subprocess_on_the_real_field(real_data, tmp_path, test_model_dir):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "napari_cellmae", "reconstruct", str(real_data / "ExampleHuman"),
         "--well", "D03", "--site", "1", "--mask-ratio", "0.75", "--model", str(test_model_dir),
         "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    stem = "AS_09125_050116030001_D03_s1"
    for suffix in ("masked.ome.tif", "reconstruction.ome.tif", "composite.ome.tif",
                   "error.ome.tif", "preview.png"):  # fmt: skip
        assert f"{stem}_{suffix}" in names
    assert "d0" in proc.stdout and "wrote" in proc.stdout


def test_writer_stacks_2d_layers_and_names_channels(tmp_path):
    from napari_cellmae._napari.writer import write_ome_stack

    a, b = np.ones((20, 30), np.uint16), np.zeros((20, 30), np.float32)
    out = str(tmp_path / "x.ome.tif")
    layers = [
        (a, {"name": "reconstruction DNA", "metadata": {"channel": "DNA"}}, "image"),
        (b, {"name": "reconstruction ER", "metadata": {"channel": "ER"}}, "image"),
    ]
    assert write_ome_stack(out, layers) == [out]
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].shape == (2, 20, 30) and tif.series[0].dtype == np.float32
        assert 'Name="DNA"' in tif.ome_metadata and 'Name="ER"' in tif.ome_metadata
    same = [(a, {"name": "masked DNA", "metadata": {"channel": "DNA"}}, "image"), layers[0]]
    write_ome_stack(out, same)  # one channel twice: the layer names keep them apart
    with tifffile.TiffFile(out) as tif:
        assert 'Name="masked DNA"' in tif.ome_metadata
    with pytest.raises(ValueError, match="differ in size"):
        write_ome_stack(out, [layers[0], (np.ones((5, 5)), {"name": "s"}, "image")])
    with pytest.raises(ValueError, match="2-D single-channel layers"):
        write_ome_stack(out, [(np.ones((3, 5, 5)), {"name": "stack"}, "image")])
