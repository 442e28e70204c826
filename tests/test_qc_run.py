"""Plate QC runs: corrupt files recorded, inputs untouched, mirror modes, the ``cellmae qc`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellmae.cli import main
from napari_cellmae.progress import run
from napari_cellmae.qc import QCHead, run_qc
from napari_cellmae.qc.artefacts import apply_artefact
from napari_cellmae.store import file_sha256
from napari_cellmae.synthetic import write_plate

BLURRED = "SYNTH-P1_A02_s1_w2"  # prefix of the file spoilt below
CORRUPT = "SYNTH-P1_A03_s2_w1"


@pytest.fixture
def plate(tmp_path) -> Path:
    """8 fields × 2 channels (256², 12-bit), A02 site 1 channel 2 defocused, A03 site 2 channel 1
    truncated (a corrupt file)."""
    import tifffile

    root = tmp_path / "plate"
    write_plate(root, "imagexpress", wells=4, sites=2, n_channels=2, size=256, seed=5)
    blurred = next(root.rglob(f"{BLURRED}*.tif"))
    tifffile.imwrite(blurred, apply_artefact(tifffile.imread(blurred), "defocus", 5, seed=0))
    corrupt = next(root.rglob(f"{CORRUPT}*.tif"))
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path below ``root`` with its checksum (files) and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = (file_sha256(p) if p.is_file() else "dir", p.stat().st_mtime_ns)
    return out


def test_plate_run_records_corrupt_files_and_goes_on(plate, tmp_path):
    out = tmp_path / "out"
    result = run(run_qc(plate, out, None, None))  # classic metrics only
    fields, images = result["fields"], pd.read_parquet(out / "qc_images.parquet")
    assert len(fields) == 8 and result["method"] == "classic"
    bad = fields[fields["QC_Class"] == "unreadable"]
    assert len(bad) == 1 and bad.iloc[0]["Metadata_Well"] == "A03"
    assert CORRUPT in bad.iloc[0]["QC_Reason"] and not bad.iloc[0]["QC_Pass"]
    rows = images[(images["Metadata_Well"] == "A03") & (images["Metadata_Site"] == 2)]
    broken = rows[rows["Metadata_Channel"] == "w1"].iloc[0]
    assert CORRUPT in broken["QC_Error"] and np.isnan(broken["QC_FocusScore"])
    sound = rows[rows["Metadata_Channel"] == "w2"].iloc[0]  # the field's other file is measured
    assert np.isfinite(sound["QC_FocusScore"]) and "field unreadable" in sound["QC_Error"]
    blurred = fields[(fields["Metadata_Well"] == "A02") & (fields["Metadata_Site"] == 1)].iloc[0]
    assert blurred["QC_Flag"] and blurred["QC_Class"] == "blur" and blurred["QC_Channel"] == "w2"
    assert "blur in w2" in blurred["QC_Reason"]
    summary = pd.read_csv(out / "qc_summary.csv")
    assert summary.loc[0, "n_unreadable"] == 1 and summary.loc[0, "n_fields"] == 8
    passing = pd.read_csv(out / "passing_fields.csv")
    assert len(passing) == summary.loc[0, "n_passing"] == fields["QC_Pass"].sum() >= 2
    for name in ("qc_fields", "qc_images", "qc_summary", "passing_images"):
        assert (out / f"{name}.parquet").is_file() and (out / f"{name}.csv").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "classic" and record["n_fields"] == 8
    assert "QC_PowerLogLogSlope_w2" in fields.columns  # per-field, per-channel metrics


def test_head_run_uses_the_encoder_and_writes_probabilities(
    plate, tmp_path, test_model_dir, qc_head_file
):
    from napari_cellmae import load_model

    model = load_model(test_model_dir, device="cpu")
    result = run(run_qc(plate, tmp_path / "out", model, QCHead.load(qc_head_file)))
    assert result["method"] == "head" and result["notice"] == ""
    images = pd.read_parquet(tmp_path / "out" / "qc_images.parquet")
    probs = images[[f"QC_P_{c}" for c in QCHead.load(qc_head_file).classes]].dropna()
    assert len(probs) == 14 and np.allclose(probs.sum(axis=1), 1.0)  # the unreadable field: none
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["model"]["checksum"] == model.checksum and record["head"]["encoder"]


def test_inputs_are_untouched_by_runs_and_mirrors(plate, tmp_path):
    before = snapshot(plate)
    for mode in ("hard", "symlink", "copy"):
        run(run_qc(plate, tmp_path / f"out-{mode}", link_passing=tmp_path / mode, link_mode=mode))
    assert snapshot(plate) == before  # same files, same bytes, same mtimes, nothing added


def test_mirror_modes_hold_exactly_the_passing_files(plate, tmp_path):
    from napari_cellmae.plates import scan_plate

    result = run(run_qc(plate, tmp_path / "out", link_passing=tmp_path / "hard", link_mode="hard"))
    passing = pd.read_parquet(tmp_path / "out" / "passing_images.parquet")
    expected = sorted(Path(p).relative_to(plate).as_posix() for p in passing["path"])
    assert result["mirror"]["files"] == len(expected) > 0
    for mode in ("hard", "symlink", "copy"):
        mirror = tmp_path / mode
        if mode != "hard":
            run(run_qc(plate, tmp_path / "out", link_passing=mirror, link_mode=mode))
        got = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*.tif"))
        assert got == expected, mode
        for rel in got:
            src, dst = plate / rel, mirror / rel
            if mode == "hard":
                assert os.path.samefile(src, dst) and not dst.is_symlink()
            elif mode == "symlink":
                assert dst.is_symlink() and dst.resolve() == src.resolve()
            else:
                assert not os.path.samefile(src, dst) and dst.read_bytes() == src.read_bytes()
    index = scan_plate(tmp_path / "copy")  # downstream tools can run on the mirror
    assert index.attrs["layout"] == "imagexpress" and len(index) == len(expected)

    # a second run refreshes a mirror it made; a foreign non-empty folder is refused
    run(run_qc(plate, tmp_path / "out", link_passing=tmp_path / "copy", link_mode="copy"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        run(run_qc(plate, tmp_path / "out", link_passing=foreign, link_mode="copy"))
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="inside the plate folder"):
        run(run_qc(plate, plate / "qc"))
    with pytest.raises(ValueError, match="inside the plate folder"):
        run(run_qc(plate, tmp_path / "out", link_passing=plate / "passing"))


def test_cli_in_process(plate, tmp_path, test_model_dir, qc_head_file, capsys):
    out, mirror = tmp_path / "out", tmp_path / "mirror"
    argv = ["qc", str(plate), "--out", str(out), "--model", str(test_model_dir)]
    argv += ["--head", str(qc_head_file), "--link-passing", str(mirror), "--link-mode", "symlink"]
    assert main([*argv, "--device", "cpu", "--batch-size", "8", "--threshold", "0.6"]) == 0
    text = capsys.readouterr().out
    assert "judged by: QC head" in text and "fields pass" in text and "mirror:" in text
    passing = pd.read_parquet(out / "passing_images.parquet")
    assert len(list(mirror.rglob("*.tif"))) == len(passing)  # may be 0: another plate's head
    assert (mirror / ".cellmae-mirror.json").is_file()
    assert json.loads((out / "run.json").read_text())["threshold"] == 0.6

    labels = tmp_path / "labels.csv"
    images = pd.read_parquet(out / "qc_images.parquet")
    images = images[images["QC_Error"] == ""]
    labels.write_text(
        "path,class\n"
        + "".join(f"{p},{'ok' if i % 2 else 'blur'}\n" for i, p in enumerate(images["path"][:4]))
    )
    new = tmp_path / "new_head.npz"
    argv = ["qc", "--train-labels", str(labels), "--base-head", str(qc_head_file)]
    assert main([*argv, "--save-head", str(new), "--model", str(test_model_dir)]) == 0
    assert QCHead.load(new).training["new_labels"] == {"blur": 2, "ok": 2}

    assert main(["qc", str(plate), "--out", str(tmp_path / "c"), "--classic-only"]) == 0
    assert "classic metrics" in capsys.readouterr().out
    assert main(["qc", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["qc", str(plate), "--out", str(plate / "qc"), "--classic-only"]) == 2


def test_cli_trains_a_head_from_the_plate_and_reports_mismatch(
    plate, tmp_path, test_model_dir, capsys
):
    head_file = tmp_path / "plate_head.npz"
    argv = ["qc", str(plate), "--model", str(test_model_dir), "--train-from-plate"]
    assert main([*argv, "--n-fields", "2", "--save-head", str(head_file)]) == 0
    head = QCHead.load(head_file)
    assert head.training["n_fields"] <= 2 and head.spec.uses_encoder
    capsys.readouterr()
    import torch

    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model

    torch.manual_seed(3)
    save_model(create_model("cellmae_vit_test_patch16_256"), tmp_path / "other")
    argv = ["qc", str(plate), "--out", str(tmp_path / "o"), "--head", str(head_file)]
    assert main([*argv, "--model", str(tmp_path / "other")]) == 0
    text = capsys.readouterr().out
    assert "only the classic metrics" in text and "judged by: classic" in text


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["qc", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--out", "--head", "--model", "--device", "--batch-size", "--layout", "--threshold",
        "--z-threshold", "--classic-only", "--link-passing", "--link-mode", "--train-from-plate",
        "--n-fields", "--train-labels", "--base-head", "--save-head",
    ):  # fmt: skip
        assert option in text, option


def test_cli_in_a_real_subprocess(plate, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "napari_cellmae.cli", "qc", str(plate), "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--classic-only", "--z-threshold", "3"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "fields pass" in done.stdout and (out / "qc_fields.csv").is_file()
    fields = pd.read_csv(out / "qc_fields.csv")
    assert (fields["QC_Threshold"] == 3).all()
