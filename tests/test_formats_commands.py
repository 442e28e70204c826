"""OME-Zarr HCS plates (NGFF 0.4, 0.5) and Olympus scan^R folders through every command that
reads plates: embed, qc, reconstruct, finetune (in process, as a user types them)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from _ome_zarr_plates import write_zarr_plate
from napari_cellmae.cli import main
from napari_cellmae.synthetic import write_plate

FORMATS = ["ome-zarr-0.4", "ome-zarr-0.5", "scanr"]


@pytest.fixture(scope="module", params=FORMATS)
def plate(request, tmp_path_factory):
    """(plate folder, its format, channel names): 2 wells × 1 field × 3 channels, 256²."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "scanr":
        root = write_plate(folder, "scanr", wells=["A01", "B02"], sites=1, n_channels=3, size=256)
        return root, request.param, ["355nm", "405nm", "445nm"]
    root = folder / "screen.zarr"
    write_zarr_plate(root, request.param[-3:], wells=("A01", "B02"), sites=1, size=256)
    return root, request.param, ["DNA", "ER", "RNA"]


def test_embed(plate, tmp_path, test_model_dir, capsys):
    root, _, names = plate
    out = tmp_path / "emb"
    argv = ["embed", str(root), "--model", str(test_model_dir), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--levels", "field", "well", "--block", "1"]) == 0
    assert "embedded 2 fields" in capsys.readouterr().out
    wells = pd.read_parquet(out / "wells.parquet")
    assert wells["Metadata_Well"].tolist() == ["A01", "B02"]
    assert list(json.loads((out / "channels.json").read_text())["channel_names"].values()) == names


def test_qc_with_per_channel_rows(plate, tmp_path, capsys):
    root, fmt, names = plate
    out = tmp_path / "qc"
    assert main(["qc", str(root), "--out", str(out), "--classic-only"]) == 0
    images = pd.read_parquet(out / "qc_images.parquet")
    assert len(images) == 2 * 3 and (images["QC_Error"] == "").all()
    assert images["channel_name"].tolist()[:3] == names
    if fmt.startswith("ome-zarr"):  # one row per field and channel, the field's zarr image group
        assert images["path"].str.endswith(("/A/1/0", "/B/2/0")).all()
        assert (
            images.groupby("path")["QC_MeanIntensity"].nunique().eq(3).all()
        )  # measured per channel
        # no files to mirror: refused before measuring, with what to use instead
        mirror = tmp_path / "mirror"
        argv = ["qc", str(root), "--out", str(tmp_path / "q2"), "--link-passing", str(mirror)]
        assert main([*argv, "--classic-only"]) == 2
        assert "OME-Zarr plate" in capsys.readouterr().err and not mirror.exists()


def test_reconstruct(plate, tmp_path, test_model_dir, capsys):
    root, _, names = plate
    out = tmp_path / "recon"
    argv = ["reconstruct", str(root), "--well", "B02", "--model", str(test_model_dir)]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    (record,) = out.glob("*_run.json")
    assert json.loads(record.read_text())["input"]["Metadata_Well"] == "B02"
    assert list(json.loads((out / "channels.json").read_text())["channel_names"].values()) == names


def test_finetune_on_an_ome_zarr_plate(tmp_path, capsys):
    # training reads fields through the same scan_plate/read_field as the commands above
    root = tmp_path / "train.zarr"
    write_zarr_plate(root, "0.5", wells=("A01", "B02"), sites=1, size=256)
    out = tmp_path / "tuned"
    argv = ["finetune", str(root), "--from-scratch", "cellmae_vit_test_patch16_256"]
    argv += ["--out", str(out), "--epochs", "1", "--batch-size", "2", "--crops-per-field", "4"]
    argv += ["--val-crops", "1", "--precision", "fp32", "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["channel_names"] == ["DNA", "ER", "RNA"]  # from the plate's omero labels
    assert config["training"]["metrics"]["steps"] == 2
