"""``cellmae qc --train-from-plate`` compares the new head with the head in use before using it."""

from __future__ import annotations

import json

import pytest

from napari_cellmae.cli import main


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """6 fields × 2 channels (256², 12-bit), A02 site 1 channel w2 defocused."""
    import tifffile

    from napari_cellmae.qc.artefacts import apply_artefact
    from napari_cellmae.synthetic import write_plate

    root = tmp_path_factory.mktemp("qc_train_plate")
    write_plate(root, "imagexpress", wells=3, sites=2, n_channels=2, size=256, seed=6)
    spoilt = next(root.rglob("*_A02_s1_w2.tif"))
    tifffile.imwrite(spoilt, apply_artefact(tifffile.imread(spoilt), "defocus", 5, seed=0))
    return root


def test_train_from_plate_keeps_the_better_head_unless_told(
    plate, tmp_path, test_model_dir, qc_head_file, capsys
):
    from napari_cellmae.qc import QCHead
    from napari_cellmae.qc.training import better_head

    current = QCHead.load(qc_head_file)  # reads the test model: the two heads are comparable
    argv = ["qc", str(plate), "--model", str(test_model_dir), "--head", str(qc_head_file)]
    argv += ["--train-from-plate", "--n-fields", "2", "--save-head", str(tmp_path / "new.npz")]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    # 4 fields not learnt from × 2 channels × (clean + 8 artefact recipes)
    assert "held-out accuracy on 72 synthetic artefact images of 4 fields it did not" in text
    assert "current head" in text and "new head" in text
    new = QCHead.load(tmp_path / "new.npz")  # the trained head is saved either way
    run_record = json.loads((tmp_path / "a" / "run.json").read_text())
    used = "QC uses the current head" if "QC uses the current head" in text else "QC uses the new"
    scores = {
        name: float(text.split(f"{name} head ")[1].split(" ")[0]) for name in ("current", "new")
    }
    expected = better_head({k: {"balanced_accuracy": v} for k, v in scores.items()})
    assert used == ("QC uses the current head" if expected == "current" else "QC uses the new")
    assert run_record["method"] == "head" and len(new.training["fields"]) == 2
    assert current.spec.uses_encoder

    assert main([*argv, "--out", str(tmp_path / "b"), "--replace-head"]) == 0
    text = capsys.readouterr().out
    assert "QC uses the new head" in text
