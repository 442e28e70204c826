"""Plates -> embedding tables: schema, levels, config, resume, bad files, executor, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellmae.embed import (
    EmbedConfig,
    embed_plates,
    embed_well,
    embedding_columns,
    recorded_reference,
    well_dir,
    write_well,
)
from napari_cellmae.features import feature_names, field_features
from napari_cellmae.progress import Cancelled, run
from napari_cellmae.synthetic import write_plate

# batch 3 with 4 crops per field: batches span fields (and wells)
CONFIG = EmbedConfig(batch_size=3, precision="fp32", device="cpu", prefetch=2)
KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    # 300 px fields: 2×2 crops each, overlapping by 212 px
    return write_plate(
        tmp_path_factory.mktemp("plate"), "imagexpress", wells=3, sites=2, n_channels=3, size=300
    )


@pytest.fixture(scope="module")
def model(test_model_dir):
    from napari_cellmae import load_model

    return load_model(test_model_dir, device="cpu", encoder_only=True, precision="fp32")


@pytest.fixture(scope="module")
def reference(plate, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "ref"
    result = run(embed_plates([plate], out, CONFIG, model=model))
    return out, result


def _sorted(df: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    keys = [k for k in (*KEYS, *extra) if k in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def test_tables_schema_levels_and_config(reference, model, plate):
    from napari_cellmae.plates import read_field, scan_plate

    out, result = reference
    assert (result.n_wells, result.n_fields, result.n_crops, result.n_errors) == (3, 6, 24, 0)
    crops, fields = pd.read_parquet(out / "crops.parquet"), pd.read_parquet(out / "fields.parquet")
    wells, feats = pd.read_parquet(out / "wells.parquet"), pd.read_parquet(out / "features.parquet")
    emb = [f"emb_{i:04d}" for i in range(model.embed_dim)]
    for df in (crops, fields, wells):
        assert embedding_columns(df) == emb
        assert all(df[c].dtype == np.float32 for c in emb)
        meta = [c for c in df.columns if c not in emb]
        assert all(c.startswith("Metadata_") for c in meta)
        assert df.columns[: len(meta)].tolist() == meta  # metadata first
        assert pd.api.types.is_string_dtype(df["Metadata_Well"])
        assert df["Metadata_Col"].dtype == np.int64
    assert crops.columns[:8].tolist() == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Row",
        "Metadata_Col",
        "Metadata_Site",
        "Metadata_Crop",
        "Metadata_CropY",
        "Metadata_CropX",
    ]
    assert (len(crops), len(fields), len(wells)) == (24, 6, 3)
    assert not crops.duplicated([*KEYS, "Metadata_Crop"]).any()
    assert set(crops["Metadata_CropY"]) == {0, 44} and fields["Metadata_NCrops"].eq(4).all()
    assert wells["Metadata_NFields"].eq(2).all()

    # field = mean of its crops, well = mean of its fields
    by_field = crops.groupby(KEYS)[emb].mean().reset_index()
    np.testing.assert_allclose(_sorted(by_field)[emb], _sorted(fields)[emb], atol=1e-6)
    by_well = fields.groupby(["Metadata_Plate", "Metadata_Well"])[emb].mean().reset_index()
    np.testing.assert_allclose(by_well[emb], _sorted(wells)[emb], atol=1e-6)

    # the pipeline gives what the model gives for that field on its own
    index = scan_plate(plate)
    image = read_field(index, "A02", 2)
    vector, crop_vectors, positions = model.embed_field(image, return_crops=True)
    row = fields[(fields["Metadata_Well"] == "A02") & (fields["Metadata_Site"] == 2)]
    np.testing.assert_allclose(row[emb].to_numpy()[0], vector, atol=1e-5)
    these = crops[(crops["Metadata_Well"] == "A02") & (crops["Metadata_Site"] == 2)]
    np.testing.assert_array_equal(these[["Metadata_CropY", "Metadata_CropX"]], positions)
    np.testing.assert_allclose(these[emb], crop_vectors, atol=1e-5)
    # the baseline statistics of the same field
    assert [c for c in feats.columns if c.startswith("feat_")] == feature_names(3)
    frow = feats[(feats["Metadata_Well"] == "A02") & (feats["Metadata_Site"] == 2)]
    np.testing.assert_allclose(frow[feature_names(3)].to_numpy()[0], field_features(image))

    csv = pd.read_csv(out / "wells.csv")
    np.testing.assert_allclose(csv[emb].to_numpy(), wells[emb].to_numpy(), rtol=1e-6)
    assert len(pd.read_parquet(out / "errors.parquet")) == 0 and (out / "errors.csv").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_checksum"] == model.checksum and config["status"] == "complete"
    assert config["pooling"] == "mean" and config["block"] == model.depth == 2
    assert config["channels"] == ["w1", "w2", "w3"] and config["precision"] == "fp32"
    assert config["napari_cellmae_version"] and config["counts"]["crops"] == 24
    assert json.loads((out / "channels.json").read_text())["channels"] == ["w1", "w2", "w3"]


def test_interrupted_run_resumes_without_duplicates(reference, plate, model, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "emb"
    events = []

    def stop_after_third_field() -> bool:
        return bool(events) and events[-1].done >= 3

    with pytest.raises(Cancelled):
        run(embed_plates([plate], out, CONFIG, model=model), events.append, stop_after_third_field)
    wells = out / "SYNTH-P1" / "wells"
    assert sorted(p.name for p in wells.iterdir()) == ["A01"]  # A02 was half done: not written
    assert not (out / "fields.parquet").exists()
    # a killed run leaves a half-written well folder behind: the next run removes it
    (wells / ".A02.x1y2.part").mkdir()
    (wells / ".A02.x1y2.part" / "fields.parquet").write_bytes(b"half")

    events.clear()
    result = run(embed_plates([plate], out, CONFIG, model=model), events.append)
    assert result.n_wells_skipped == 1 and events[-1].total == 4  # only A02 and A03 read
    assert sorted(p.name for p in wells.iterdir()) == ["A01", "A02", "A03"]
    for name, extra in (("crops", ("Metadata_Crop",)), ("fields", ()), ("wells", ())):
        got = _sorted(pd.read_parquet(out / f"{name}.parquet"), extra)
        want = _sorted(pd.read_parquet(ref_out / f"{name}.parquet"), extra)
        assert not got.duplicated([c for c in got.columns if c.startswith("Metadata_")]).any()
        pd.testing.assert_frame_equal(
            got.drop(columns=embedding_columns(got)), want.drop(columns=embedding_columns(want))
        )
        np.testing.assert_allclose(
            got[embedding_columns(got)], want[embedding_columns(want)], atol=1e-5
        )
    again = run(embed_plates([plate], out, CONFIG, model=model))
    assert again.n_wells_skipped == 3 and again.n_fields == 6


def test_other_settings_do_not_resume_into_the_same_folder(reference, plate, model):
    out, _ = reference
    before = (out / "config.json").read_text()
    cls = EmbedConfig(pooling="cls", batch_size=3, precision="fp32")
    with pytest.raises(ValueError, match="pooling 'mean' \\(now 'cls'\\).*another output folder"):
        run(embed_plates([plate], out, cls, model=model))
    assert (out / "config.json").read_text() == before


@pytest.mark.parametrize("normalization", ["crop", "plate"])
def test_corrupt_and_missing_files_are_recorded_and_the_run_goes_on(model, tmp_path, normalization):
    plate = write_plate(tmp_path, "imagexpress", wells=2, sites=2, n_channels=2, size=256)
    bad = plate / "SYNTH-P1_A01_s1_w2.tif"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated by an interrupted copy
    (plate / "SYNTH-P1_A02_s2_w1.tif").unlink()
    config = replace_norm(CONFIG, normalization)
    result = run(embed_plates([plate], tmp_path / "out", config, model=model))
    assert (result.n_fields, result.n_errors, result.n_wells) == (2, 2, 2)
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["Metadata_Well"].tolist() == ["A01", "A02"]
    assert errors["error_type"].tolist() == ["CorruptFileError", "MissingChannelError"]
    assert str(bad) in errors["error"].iloc[0]
    fields = pd.read_parquet(tmp_path / "out" / "fields.parquet")
    assert list(zip(fields["Metadata_Well"], fields["Metadata_Site"])) == [("A01", 2), ("A02", 1)]
    assert bad.stat().st_size == 300  # inputs untouched
    if normalization == "plate":  # the reference comes from the readable fields alone
        from napari_cellmae.plates import read_field, scan_plate

        record = json.loads((tmp_path / "out" / "config.json").read_text())
        index = scan_plate(plate)
        good = [read_field(index, "A01", 2), read_field(index, "A02", 1)]
        np.testing.assert_allclose(
            recorded_reference(record, "SYNTH-P1"), model.plate_reference(good), rtol=1e-6
        )


def test_thread_executor_gives_the_serial_tables(reference, plate, model, tmp_path):
    ref_out, _ = reference
    with ThreadPoolExecutor(2) as pool:
        result = run(embed_plates([plate], tmp_path / "out", CONFIG, model=model, executor=pool))
    assert result.n_fields == 6
    for name in ("crops", "fields", "wells", "features"):
        got = _sorted(pd.read_parquet(tmp_path / "out" / f"{name}.parquet"), ("Metadata_Crop",))
        want = _sorted(pd.read_parquet(ref_out / f"{name}.parquet"), ("Metadata_Crop",))
        assert got.columns.tolist() == want.columns.tolist()
        num = got.select_dtypes("number").columns
        np.testing.assert_allclose(got[num], want[num], atol=1e-5)


def test_a_failing_well_task_is_recorded_and_retried(plate, model, tmp_path, monkeypatch):
    import napari_cellmae.embed as embed_module

    real = embed_module.embed_well

    def flaky(model_, rows, config, references=None):
        if rows["Metadata_Well"].iloc[0] == "A02":
            raise OSError("disk full")
        return real(model_, rows, config, references)

    monkeypatch.setattr(embed_module, "embed_well", flaky)
    with ThreadPoolExecutor(2) as pool:
        result = run(embed_plates([plate], tmp_path, CONFIG, model=model, executor=pool))
    assert (result.n_wells, result.n_errors) == (2, 1)
    errors = pd.read_csv(tmp_path / "errors.csv")
    assert errors[["Metadata_Well", "error_type"]].values.tolist() == [["A02", "OSError"]]
    assert "the whole well failed: disk full" in errors["error"].iloc[0]
    assert not well_dir(tmp_path, "SYNTH-P1", "A02").exists()
    monkeypatch.setattr(embed_module, "embed_well", real)
    with ThreadPoolExecutor(2) as pool:
        again = run(embed_plates([plate], tmp_path, CONFIG, model=model, executor=pool))
    assert (again.n_wells, again.n_errors, again.n_wells_skipped) == (3, 0, 2)


def test_embed_well_unit_and_atomic_well_folder(plate, model, tmp_path):
    from napari_cellmae.plates import scan_plate

    index = scan_plate(plate)
    rows = index[index["Metadata_Well"] == "A03"]
    tables = embed_well(model, rows, EmbedConfig(levels=("field", "well"), features=False))
    assert len(tables.fields) == 2 and len(tables.well) == 1 and tables.crops is None
    assert tables.features is None and len(tables.errors) == 0
    path = well_dir(tmp_path, "SYNTH-P1", "A03")
    assert write_well(tables, path) is True
    assert sorted(p.name for p in path.iterdir()) == ["done.json", "fields.parquet", "well.parquet"]
    assert write_well(tables, path) is False  # already there: kept, nothing duplicated
    assert not list(path.parent.glob(".*"))


def test_channels_pooling_and_levels_options(plate, model, tmp_path):
    config = EmbedConfig(
        channels=("w3", "w1"),
        pooling="channelwise",
        levels=("well",),
        features=False,
        batch_size=8,
        precision="fp32",
    )
    result = run(embed_plates(str(plate), tmp_path, config, model=model))
    assert sorted(result.tables) == ["errors", "wells"]
    wells = pd.read_parquet(tmp_path / "wells.parquet")
    assert len(embedding_columns(wells)) == 2 * model.embed_dim
    assert json.loads((tmp_path / "config.json").read_text())["channels"] == ["w3", "w1"]
    assert not (tmp_path / "crops.parquet").exists()


def test_plate_normalisation_reference_is_saved_used_and_reused(plate, model, tmp_path):
    import napari_cellmae.embed as embed_module
    from napari_cellmae.plates import read_field, scan_plate

    config = EmbedConfig(batch_size=3, precision="fp32", normalization="plate", prefetch=2)
    run(embed_plates([plate], tmp_path / "out", config, model=model))
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    assert record["normalization"] == "plate"
    ref = recorded_reference(record, "SYNTH-P1")  # (3 channels, 2)
    assert ref.shape == (3, 2) and recorded_reference(record, "other plate") is None
    index = scan_plate(plate)
    fields = [read_field(index, well=w, site=s) for w in ("A01", "A02", "A03") for s in (1, 2)]
    np.testing.assert_allclose(ref, model.plate_reference(fields), rtol=1e-6)  # all 6 < 24
    # every field is embedded with its plate's reference
    table = _sorted(pd.read_parquet(tmp_path / "out" / "fields.parquet"))
    got = table[embedding_columns(table)].to_numpy()
    want = np.stack([model.embed_field(f, reference=ref) for f in fields])
    np.testing.assert_allclose(got, want, atol=1e-5)
    crop = _sorted(pd.read_parquet(tmp_path / "out" / "fields.parquet"))
    # a thread executor gives the same tables
    with ThreadPoolExecutor(2) as pool:
        run(embed_plates([plate], tmp_path / "threads", config, model=model, executor=pool))
    threads = _sorted(pd.read_parquet(tmp_path / "threads" / "fields.parquet"))
    np.testing.assert_allclose(threads[embedding_columns(threads)].to_numpy(), got, atol=1e-5)
    # resuming reads the saved reference instead of recomputing it
    import shutil

    shutil.rmtree(well_dir(tmp_path / "out", "SYNTH-P1", "A02"))
    (tmp_path / "out" / "fields.parquet").unlink()

    def no_reads(*args, **kwargs):
        raise AssertionError("the reference was computed again")

    original = embed_module.plate_references
    embed_module.plate_references = no_reads
    try:
        again = run(embed_plates([plate], tmp_path / "out", config, model=model))
    finally:
        embed_module.plate_references = original
    assert (again.n_wells, again.n_wells_skipped) == (3, 2)
    resumed = _sorted(pd.read_parquet(tmp_path / "out" / "fields.parquet"))
    np.testing.assert_allclose(resumed[embedding_columns(resumed)].to_numpy(), got, atol=1e-5)
    # "crop" into the same folder is refused; a "crop" run differs
    with pytest.raises(ValueError, match="normalization 'plate' \\(now 'crop'\\)"):
        run(embed_plates([plate], tmp_path / "out", replace_norm(config, "crop"), model=model))
    run(embed_plates([plate], tmp_path / "crop", replace_norm(config, "crop"), model=model))
    crop = _sorted(pd.read_parquet(tmp_path / "crop" / "fields.parquet"))
    assert json.loads((tmp_path / "crop" / "config.json").read_text())["normalization"] == "crop"
    assert "plate_reference" not in json.loads((tmp_path / "crop" / "config.json").read_text())
    assert np.abs(crop[embedding_columns(crop)].to_numpy() - got).max() > 1e-3


def replace_norm(config: EmbedConfig, normalization: str) -> EmbedConfig:
    from dataclasses import replace

    return replace(config, normalization=normalization)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="pooling 'max' is unknown"):
        EmbedConfig(pooling="max")
    with pytest.raises(ValueError, match="block must be >= 1"):
        EmbedConfig(block=0)
    with pytest.raises(ValueError, match="normalization 'self' is unknown"):
        EmbedConfig(normalization="self")
    with pytest.raises(ValueError, match="subset of"):
        EmbedConfig(levels=("plate",))


def test_cli_in_process_and_resume(plate, test_model_dir, tmp_path, capsys):
    from napari_cellmae.cli import main

    out = tmp_path / "emb"
    argv = [
        "embed",
        str(plate),
        "--model",
        str(test_model_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "5",
        "--levels",
        "field",
        "well",
        "--block",
        "1",
    ]
    assert main([*argv[:5], str(tmp_path / "plate-norm"), "--normalization", "plate"]) == 0
    plate_run = json.loads((tmp_path / "plate-norm" / "config.json").read_text())
    assert plate_run["normalization"] == "plate" and len(plate_run["plate_reference"]) == 1
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "embedded 6 fields (24 crops) in 3 wells; " in printed.out
    assert "failed" not in printed.out  # nothing failed: no "0 field(s) failed (see errors.csv)"
    for table in ("fields", "wells", "errors"):  # each table with its CSV twin
        assert (out / f"{table}.csv").is_file() and (out / f"{table}.parquet").is_file()
    assert "field/s" in printed.err or "6/6" in printed.err  # tqdm bar with rate and ETA
    assert json.loads((out / "config.json").read_text())["block"] == 1
    assert main(argv) == 0
    assert "3 already done" in capsys.readouterr().out
    assert main([*argv[:-2], "--block", "2"]) == 2
    assert "block 1 (now 2)" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "does not exist: check the path" in capsys.readouterr().err


def test_cli_subprocess(plate, test_model_dir, tmp_path):
    out = tmp_path / "emb"
    cmd = [
        sys.executable,
        "-m",
        "napari_cellmae.cli",
        "embed",
        str(plate),
        "--model",
        str(test_model_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--levels",
        "well",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "in 3 wells" in done.stdout
    assert len(pd.read_csv(out / "wells.csv")) == 3
