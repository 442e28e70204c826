"""The input half of the fault suite (issue 20): plates holding every bad input a user's folder can
hold, run through ``scan_plate`` and the ``cellmae`` embed / qc / reconstruct commands in-process.

Each run must exit normally, name every bad file with its reason in the report, keep every good
field exactly once, leave the plate folder byte-for-byte unchanged, and pick up a file the user
fixes on the next run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cellmae.cli import main
from napari_cellmae.plates import (
    FileAccessError,
    NonFiniteError,
    PlaneError,
    iter_fields,
    read_channel,
    read_field,
    scan_plate,
)
from napari_cellmae.store import file_sha256

HUMAN = "AS_09125_050116030001_{well}f00d{c}.tif"  # ExampleHuman: 3 channels, 512² uint8
GOOD = ["D03", "D08"]
# well -> (channel of the bad file, error type, words of the reason)
FAULTS = {
    "D04": (1, "PlaneError", "RGB image (3 samples per pixel)"),
    "D05": (0, "PlaneError", "3 pages (a Z stack"),
    "D06": (2, "NonFiniteError", "2 NaN or infinite pixel values"),
    "D07": (1, "FileAccessError", "dangling link"),
}


def make_faulty_plate(real_data: Path, root: Path) -> Path:
    """Copies of the real ExampleHuman field as wells D03–D08, four of them spoilt (see FAULTS),
    plus a folder link back into the plate (``ln -s . loop``)."""
    plate = root / "plate"
    plate.mkdir()
    for well in [*GOOD, *FAULTS]:
        for c in range(3):
            source = real_data / "ExampleHuman" / HUMAN.format(well="D03", c=c)
            shutil.copyfile(source, plate / HUMAN.format(well=well, c=c))

    def path(well: str) -> Path:
        return plate / HUMAN.format(well=well, c=FAULTS[well][0])

    image = tifffile.imread(path("D04"))
    tifffile.imwrite(path("D04"), np.stack([image] * 3, axis=-1), photometric="rgb")
    image = tifffile.imread(path("D05"))
    tifffile.imwrite(
        path("D05"), np.stack([image, image // 2, image // 3]), photometric="minisblack"
    )
    image = tifffile.imread(path("D06")).astype(np.float32)
    image[5, 5], image[6, 6] = np.nan, np.inf
    tifffile.imwrite(path("D06"), image)
    path("D07").unlink()
    path("D07").symlink_to(root / "gone.tif")
    (plate / "loop").symlink_to(".")
    return plate


def checksums(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (links not followed) with its checksum or link target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else file_sha256(p)
    return out


@pytest.fixture(scope="module")
def faulty(real_data, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    plate = make_faulty_plate(real_data, tmp_path_factory.mktemp("faults"))
    return plate, checksums(plate)


def bad_file(plate: Path, well: str) -> str:
    return str(plate / HUMAN.format(well=well, c=FAULTS[well][0]))


def test_scan_skips_the_link_loop_and_reading_names_each_bad_file(faulty, caplog):
    plate, _ = faulty
    index = scan_plate(plate)  # an ELOOP traceback before
    assert sorted(index["Metadata_Well"].unique()) == sorted([*GOOD, *FAULTS])
    assert len(index) == 18 and not index["path"].str.contains("/loop/").any()
    assert "points back inside the plate folder" in caplog.text
    results = {r.metadata["Metadata_Well"]: r for r in iter_fields(index, prefetch=2)}
    assert all(results[w].ok and results[w].image.shape == (3, 512, 512) for w in GOOD)
    for well, (_, kind, words) in FAULTS.items():
        error = results[well].error
        assert type(error).__name__ == kind
        assert bad_file(plate, well) in str(error) and words in str(error)
    with pytest.raises(PlaneError, match="RGB image"):
        read_field(index, "D04")


def test_embed_records_every_bad_file_keeps_every_good_field_and_retries_fixed_files(
    faulty, test_model_dir, tmp_path, capsys
):
    plate, before = faulty
    work = tmp_path / "plate"  # a copy of its own: this test fixes a file
    shutil.copytree(plate, work, symlinks=True)
    out = tmp_path / "emb"
    argv = ["embed", str(work), "--model", str(test_model_dir), "--out", str(out)]
    argv += ["--device", "cpu", "--levels", "field", "--no-features"]
    assert main(argv) == 0
    assert "2 fields (8 crops) in 2 wells; 4 field(s) failed" in capsys.readouterr().out
    fields = pd.read_parquet(out / "fields.parquet")
    assert fields["Metadata_Well"].tolist() == GOOD  # each good field once
    errors = pd.read_csv(out / "errors.csv").set_index("Metadata_Well")
    assert sorted(errors.index) == sorted(FAULTS)
    for well, (_, kind, words) in FAULTS.items():
        assert errors.loc[well, "error_type"] == kind
        assert bad_file(work, well) in errors.loc[well, "error"]
        assert words in errors.loc[well, "error"]
    assert checksums(work) == before  # inputs untouched, nothing added to the plate folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "plate"]  # nothing outside --out

    # the user replaces the RGB file with a proper one: the rerun embeds that well
    fixed = Path(bad_file(work, "D04"))
    shutil.copyfile(work / HUMAN.format(well="D03", c=1), fixed)
    assert main(argv) == 0
    assert "2 already done, 4 with failed fields retried" in capsys.readouterr().out
    fields = pd.read_parquet(out / "fields.parquet")
    assert sorted(fields["Metadata_Well"]) == sorted(["D03", "D04", "D08"])
    assert not fields.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).any()
    errors = pd.read_csv(out / "errors.csv")
    assert sorted(errors["Metadata_Well"]) == ["D05", "D06", "D07"]
    # the fixed well's embedding is the good field's (same images): nothing stale was kept
    emb = [c for c in fields.columns if c.startswith("emb_")]
    by_well = fields.set_index("Metadata_Well")[emb]
    np.testing.assert_allclose(by_well.loc["D04"], by_well.loc["D03"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("executor", ["serial", "threads"])
def test_qc_names_every_bad_file_and_measures_the_rest(faulty, tmp_path, executor, capsys):
    plate, before = faulty
    out = tmp_path / "qc"
    argv = ["qc", str(plate), "--out", str(out), "--classic-only"]
    if executor != "serial":
        argv += ["--executor", executor, "--workers", "2"]
    assert main(argv) == 0  # NaN/inf and RGB files aborted qc before
    images = pd.read_parquet(out / "qc_images.parquet")
    assert len(images) == 18
    assert not images.duplicated(["Metadata_Well", "Metadata_Channel"]).any()
    for well, (c, _, words) in FAULTS.items():
        row = images[(images["Metadata_Well"] == well) & (images["Metadata_Channel"] == f"d{c}")]
        error = row["QC_Error"].iloc[0]
        assert error.startswith(bad_file(plate, well)) and words in error
    good = images[images["Metadata_Well"].isin(GOOD)]
    assert (good["QC_Error"] == "").all() and good["QC_FocusScore"].notna().all()
    fields = pd.read_csv(out / "qc_fields.csv").set_index("Metadata_Well")
    assert (fields.loc[list(FAULTS), "QC_Class"] == "unreadable").all()
    assert checksums(plate) == before
    assert [p.name for p in tmp_path.iterdir()] == ["qc"]  # nothing written outside --out


def test_qc_wells_with_unreadable_images_are_measured_again(faulty, tmp_path, capsys):
    plate, _ = faulty
    work = tmp_path / "plate"
    shutil.copytree(plate, work, symlinks=True)
    out = tmp_path / "qc"
    argv = ["qc", str(work), "--out", str(out), "--classic-only", "--executor", "threads"]
    assert main(argv) == 0
    dangling = Path(bad_file(work, "D07"))
    dangling.unlink()  # the user restores the missing file
    shutil.copyfile(work / HUMAN.format(well="D03", c=1), dangling)
    assert main(argv) == 0
    fields = pd.read_csv(out / "qc_fields.csv").set_index("Metadata_Well")
    assert fields.loc["D07", "QC_Class"] != "unreadable"
    assert (fields.loc[["D04", "D05", "D06"], "QC_Class"] == "unreadable").all()


def test_reconstruct_names_the_bad_file(faulty, test_model_dir, tmp_path, capsys):
    plate, before = faulty
    argv = ["reconstruct", str(plate), "--model", str(test_model_dir), "--device", "cpu"]
    assert main([*argv, "--well", "D05", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert bad_file(plate, "D05") in err and "3 pages" in err and "Traceback" not in err
    assert main([*argv, "--well", "D03", "--out", str(tmp_path / "good")]) == 0
    assert checksums(plate) == before


# -- plate identity ------------------------------------------------------------------------------
def test_safe_name_never_maps_two_names_to_one_folder():
    from napari_cellmae.embed_store import safe_name

    assert safe_name("BR00116991") == "BR00116991" and safe_name("A01") == "A01"
    names = ["Screen ü", "Screen ä", "Screen [1]", "Screen (1)", "Screen__", "Screen _", "..", "."]
    folders = [safe_name(n) for n in names]
    assert len(set(folders)) == len(names)
    assert all(f.isascii() and "/" not in f and not f.startswith(".") for f in folders)
    assert safe_name("Screen ü") == safe_name("Screen ü")  # stable across runs (resume)


@pytest.fixture(scope="module")
def twin_plates(real_data, tmp_path_factory) -> Path:
    """Two plates whose names differ only in a non-ASCII letter (one folder, Cellomics names),
    each with two good fields (different real images) and one bad file: an RGB file on one, a
    Z stack on the other (single-channel plates: one file per field)."""
    root = tmp_path_factory.mktemp("twins") / "screen"
    root.mkdir()
    real = sorted((real_data / "transfluor-plate").glob("*f00d2.TIF"))
    for i, name in enumerate(["Screen ü", "Screen ä"]):
        for j, well in enumerate(["O01", "O02", "O03"]):
            shutil.copyfile(real[3 * i + j], root / f"{name}_{well}f00d2.TIF")
    image = tifffile.imread(root / "Screen ü_O03f00d2.TIF")
    tifffile.imwrite(root / "Screen ü_O03f00d2.TIF", np.stack([image] * 3, -1), photometric="rgb")
    tifffile.imwrite(
        root / "Screen ä_O03f00d2.TIF", np.stack([image] * 4), photometric="minisblack"
    )
    return root


def test_plates_named_alike_keep_their_own_rows_in_embed_and_qc(
    twin_plates, test_model_dir, tmp_path, capsys
):
    before = checksums(twin_plates)
    out = tmp_path / "emb"
    argv = ["embed", str(twin_plates), "--model", str(test_model_dir), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--levels", "field", "--no-features"]) == 0
    fields = pd.read_parquet(out / "fields.parquet")
    keys = list(zip(fields["Metadata_Plate"], fields["Metadata_Well"]))
    assert sorted(keys) == sorted((p, w) for p in ("Screen ü", "Screen ä") for w in ("O01", "O02"))
    emb = fields[[c for c in fields.columns if c.startswith("emb_")]].to_numpy()
    assert len(np.unique(emb.round(5), axis=0)) == 4  # four different images, four embeddings
    errors = pd.read_csv(out / "errors.csv")
    assert sorted(zip(errors["Metadata_Plate"], errors["error_type"])) == [
        ("Screen ä", "PlaneError"),
        ("Screen ü", "PlaneError"),
    ]
    assert errors["error"].str.contains("O03f00d2.TIF holds").all()

    qc = tmp_path / "qc"
    argv = ["qc", str(twin_plates), "--out", str(qc), "--classic-only"]
    assert main([*argv, "--executor", "threads", "--workers", "2"]) == 0
    images = pd.read_parquet(qc / "qc_images.parquet")
    assert len(images) == 6
    for plate, path in zip(images["Metadata_Plate"], images["path"]):
        assert Path(path).name.startswith(f"{plate}_")  # each plate's own images
    assert checksums(twin_plates) == before


# -- messages instead of tracebacks --------------------------------------------------------------
def test_permission_denied_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "A01_s1_w1.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the OS answer as it would
        monkeypatch.setattr(tifffile, "TiffFile", _deny)
    with pytest.raises(FileAccessError, match="permission denied") as info:
        read_channel(path)
    assert str(path) in str(info.value) and "corrupt" not in str(info.value)


def _deny(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))


def test_channel_axis_files_are_channels_only_in_one_file_per_field_plates(tmp_path):
    data = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    path = tmp_path / "A01.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_channel(path, multichannel=True), data)
    with pytest.raises(PlaneError, match="3 channels"):
        read_channel(path)
    z = tmp_path / "z.ome.tif"
    tifffile.imwrite(z, np.stack([data, data]), ome=True, metadata={"axes": "ZCYX"})
    with pytest.raises(PlaneError, match="2 Z planes"):
        read_channel(z, multichannel=True)
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((4, 4), np.nan, np.float32))
    with pytest.raises(NonFiniteError, match="16 NaN"):
        read_channel(nan)


def test_finetune_resume_refuses_an_unsafe_checkpoint_with_a_message(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "model"
    checkpoints = tmp_path / "model-checkpoints"
    checkpoints.mkdir()
    torch.save({"config": {}, "x": Evil()}, str(checkpoints / "last.pt"))
    assert main(["finetune", "--out", str(out), "--resume", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read safely (UnpicklingError" in err and "Traceback" not in err
    assert str(checkpoints / "last.pt") in err and not marker.exists()
    torch.save({"model": torch.zeros(1)}, str(checkpoints / "last.pt"))  # safe, but not ours
    assert main(["finetune", "--out", str(out), "--resume", "--device", "cpu"]) == 2
    assert "is not a checkpoint written by cellmae finetune" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, words",
    [
        ({"depth": 10**6}, "depth 1000000 (a whole number in 1..256)"),
        ({"patch_size": 0}, "patch_size 0"),
        ({"embed_dim": 0, "num_heads": 0}, "embed_dim 0"),
        ({"depth": "12"}, "depth '12'"),
    ],
)
def test_model_config_with_absurd_sizes_is_refused_at_once(test_model_dir, tmp_path, change, words):
    import json
    import time

    from napari_cellmae import load_model

    folder = tmp_path / "m"
    shutil.copytree(test_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"].update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="does not describe a usable model architecture") as info:
        load_model(folder, device="cpu")
    assert words in str(info.value) and time.monotonic() - t0 < 5


def test_load_model_loads_the_weights_file_it_is_given(test_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from napari_cellmae import load_model

    folder = tmp_path / "m"
    shutil.copytree(test_model_dir, folder)
    other = {
        k: v + 1 if v.is_floating_point() else v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    save_file({k: v.contiguous() for k, v in other.items()}, str(folder / "other.bin"))
    model = load_model(folder / "other.bin", device="cpu", precision="fp32")
    state = model.module.state_dict()
    for key in ("cls_token", "blocks.0.mlp_bias"):
        if key in other:
            torch.testing.assert_close(state[key].float(), other[key].float())
    assert model.checksum != load_model(folder, device="cpu").checksum
    with pytest.raises(FileNotFoundError, match="other2.bin does not exist"):
        load_model(folder / "other2.bin")


@pytest.mark.parametrize("command", ["embed", "qc", "reconstruct"])
def test_out_naming_an_existing_file_is_an_error_not_a_traceback(
    faulty, test_model_dir, tmp_path, command, capsys
):
    plate, before = faulty
    target = tmp_path / "notes.txt"
    target.write_text("the user's own file\n")
    argv = [command, str(plate), "--out", str(target)]
    argv += ["--classic-only"] if command == "qc" else ["--model", str(test_model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "Traceback" not in err
    assert target.read_text() == "the user's own file\n" and checksums(plate) == before


def test_a_refused_stack_is_judged_from_its_header_not_decoded(tmp_path, monkeypatch):
    path = tmp_path / "A01_s1_w1.tif"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint16), photometric="minisblack")

    def decode(*args, **kwargs):
        raise AssertionError("the pixels of a refused file were decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", decode)
    with pytest.raises(PlaneError, match="5 pages"):
        read_channel(path)


def test_an_unreadable_plate_folder_is_reported_as_permission_denied(tmp_path, monkeypatch):
    plate = tmp_path / "plate"
    plate.mkdir()
    tifffile.imwrite(plate / "A01_s1_w1.tif", np.zeros((8, 8), np.uint16))
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == plate.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match="permission denied: this user may not list"):
        scan_plate(plate)
