"""Fault suite, the output side (issue 20): every command through the CLI in-process, asserting
the exit status, that the message names the folder and the fix, that the inputs' bytes are
unchanged and that nothing is written outside ``--out``; and that resume still works in a folder
the tool made.

Faults: ``--out`` that is the plate, inside it, a symlink to it or the plate's parent when the
plate folder is named like the plate; ``--out`` a user's own non-empty folder (same file names
as ours); ``--out`` an existing file; a crafted mirror marker pointing outside the mirror; a
killed run's temporary ``.part`` files; the mirror's default mode.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellmae.cli import main
from napari_cellmae.synthetic import write_plate

PLATE = "SYNTH-P1"


def tree(root: Path) -> dict[str, str]:
    """Every path below ``root``: files and links with a checksum of their bytes (or target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def written(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Paths added or changed between two :func:`tree` snapshots."""
    return {k for k, v in after.items() if before.get(k) != v}


@pytest.fixture
def plate(tmp_path) -> Path:
    """``tmp_path/data/SYNTH-P1``: 2 wells × 1 site × 2 channels, 256² (the folder is named like
    the plate, as instruments name them)."""
    return write_plate(tmp_path / "data", "imagexpress", wells=2, sites=1, n_channels=2, size=256)


def _argv(command: str, plate: Path, out: Path, model: Path | None = None) -> list[str]:
    if command == "qc":
        return ["qc", str(plate), "--out", str(out), "--classic-only"]
    extra = ["--model", str(model), "--device", "cpu"] if model else []
    if command == "embed":
        return ["embed", str(plate), "--out", str(out), *extra, "--levels", "well"]
    return ["reconstruct", str(plate), "--out", str(out), *extra]


@pytest.mark.parametrize("command", ["embed", "qc", "reconstruct"])
@pytest.mark.parametrize("where", ["plate", "inside", "symlink", "parent"])
def test_out_on_the_plate_is_refused_and_nothing_is_written(
    command, where, plate, tmp_path, test_model_dir, capsys
):
    data = tmp_path / "data"
    if where == "symlink":
        (tmp_path / "link").symlink_to(plate, target_is_directory=True)
    out = {
        "plate": plate,
        "inside": plate / "results",
        "symlink": tmp_path / "link",
        "parent": data,  # OUT/<plate>/… would be the plate folder itself
    }[where]
    before = tree(tmp_path)
    assert main(_argv(command, plate, out, test_model_dir)) == 2
    err = capsys.readouterr().err
    assert str(out) in err and ("Choose" in err or "--force" in err), err
    assert tree(tmp_path) == before  # inputs unchanged, nothing written anywhere


@pytest.mark.parametrize("command", ["embed", "qc", "reconstruct"])
def test_force_never_writes_into_the_plate(command, plate, test_model_dir, capsys):
    argv = _argv(command, plate, plate / "out", test_model_dir)
    before = tree(plate)
    assert main([*argv, "--force"]) == 2
    assert "plate folder" in capsys.readouterr().err
    assert tree(plate) == before
    if command == "embed":  # the plate's parent: OUT/SYNTH-P1/ is the plate, --force or not
        assert main([*_argv("embed", plate, plate.parent, test_model_dir), "--force"]) == 2
        assert f"{PLATE!r}" in capsys.readouterr().err and tree(plate) == before


def _users_folder(folder: Path) -> dict[str, str]:
    folder.mkdir()
    for name in ("config.json", "channels.json", "errors.csv", "qc_fields.csv", "run.json"):
        (folder / name).write_text(f"the user's own {name}\n")
    return tree(folder)


@pytest.mark.parametrize("command", ["embed", "qc", "reconstruct"])
def test_a_users_own_folder_is_refused_untouched(command, plate, tmp_path, test_model_dir, capsys):
    mine = tmp_path / "mine"
    theirs = _users_folder(mine)
    plate_before = tree(plate)
    assert main(_argv(command, plate, mine, test_model_dir)) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "not empty" in err and "--force" in err and "new" in err
    assert tree(mine) == theirs and tree(plate) == plate_before


def test_force_writes_into_a_users_folder_and_then_resumes(plate, tmp_path, capsys):
    mine = tmp_path / "mine"
    _users_folder(mine)
    (mine / "notes.txt").write_text("kept\n")
    argv = _argv("qc", plate, mine, None)
    assert main([*argv, "--force"]) == 0
    assert (mine / "notes.txt").read_text() == "kept\n"  # only files of the same names replaced
    assert "SYNTH-P1" in (mine / "qc_fields.csv").read_text()
    assert main(argv) == 0  # now a folder cellmae made: reruns need no --force


def test_a_folder_made_by_the_tool_resumes_and_another_command_is_refused(
    plate, tmp_path, test_model_dir, capsys
):
    emb = tmp_path / "emb"
    plate_before = tree(plate)
    assert main(_argv("embed", plate, emb, test_model_dir)) == 0
    assert json.loads((emb / ".cellmae-output.json").read_text())["command"] == "embed"
    capsys.readouterr()
    assert main(_argv("embed", plate, emb, test_model_dir)) == 0
    assert "2 already done" in capsys.readouterr().out  # resumed: nothing embedded twice
    assert len(pd.read_csv(emb / "wells.csv")) == 2
    before = tree(emb)
    assert main(_argv("qc", plate, emb)) == 2  # qc would replace embed's channels.json
    err = capsys.readouterr().err
    assert str(emb) in err and "cellmae embed" in err
    platemap = tmp_path / "platemap.csv"
    platemap.write_text(
        "Metadata_Well,Metadata_Perturbation,Metadata_IsControl\nA01,DMSO,1\nA02,x,0\n"
    )
    profile = ["profile", str(emb), "--platemap", str(platemap), "--out", str(emb)]
    assert main(profile) == 2  # the report's config.json would replace the embedding's
    assert "cellmae embed" in capsys.readouterr().err
    assert tree(emb) == before and tree(plate) == plate_before


def test_out_naming_an_existing_file_is_refused(plate, tmp_path, test_model_dir, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine\n")
    for command in ("embed", "qc", "reconstruct"):
        assert main(_argv(command, plate, target, test_model_dir)) == 2
        err = capsys.readouterr().err
        assert str(target) in err and "existing file" in err
    assert target.read_text() == "mine\n"


def test_the_gui_is_told_a_fix_it_has_while_the_cli_keeps_force(tmp_path):
    """The GUI has no --force: the same refusal tells it to choose a new or empty folder, or one
    cellmae made for that output; the CLI and Python messages keep --force (force=True)."""
    from napari_cellmae.outputs import OutputFolderError, check_output_dir, prepare_output_dir

    mine = tmp_path / "mine"
    _users_folder(mine)
    prepare_output_dir(tmp_path / "embedded", "embed")
    for folder in (mine, tmp_path / "embedded"):
        with pytest.raises(OutputFolderError) as info:
            check_output_dir(folder, "qc")
        cli, gui = str(info.value), info.value.gui_message
        assert str(folder) in cli and "--force" in cli, cli
        assert str(folder) in gui and "force" not in gui, gui
        assert "new or empty" in gui and "one cellmae made for qc output" in gui, gui


def test_finetune_for_the_gui_reports_the_gui_fix(plate, tmp_path, capsys):
    """The Fine-tune tab runs `cellmae finetune --progress-json`: a refusal comes back as an
    error event with the GUI's words, next to the CLI's error line."""
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    argv = ["finetune", str(plate), "--out", str(mine), "--device", "cpu", "--progress-json"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    event = json.loads(out.strip().splitlines()[-1])
    assert event["event"] == "error" and "--force" in event["message"] and "--force" in err
    assert "--force" not in event["gui_message"] and "new or empty" in event["gui_message"]
    assert (mine / "README.md").read_text() == "my notes\n"


def test_finetune_refuses_a_users_folder_before_training(plate, tmp_path, capsys):
    mine = tmp_path / "models"  # the user's folder, whose README.md the model card would replace
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    theirs = tree(mine)
    argv = ["finetune", str(plate), "--out", str(mine), "--device", "cpu", "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "--force" in err
    assert tree(mine) == theirs and not (tmp_path / "models-checkpoints").exists()


# -- the passing-images mirror --------------------------------------------------------------
@pytest.mark.parametrize(
    "entry", ["../outside_victim.txt", "{abs}", "escape/outside_victim.txt", "sub/../../x"]
)
def test_a_crafted_mirror_marker_deletes_nothing_outside_the_mirror(entry, plate, tmp_path, capsys):
    victim = tmp_path / "outside_victim.txt"
    victim.write_text("precious\n")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "escape").symlink_to(tmp_path, target_is_directory=True)  # a folder link out
    entry = entry.replace("{abs}", str(victim))
    marker = {"plate": str(plate), "mode": "copy", "files": [entry], "complete": True}
    (mirror / ".cellmae-mirror.json").write_text(json.dumps(marker))
    argv = ["qc", str(plate), "--out", str(tmp_path / "qc"), "--classic-only"]
    assert main([*argv, "--link-passing", str(mirror)]) == 2
    err = capsys.readouterr().err
    assert ".cellmae-mirror.json" in err and "not inside the mirror" in err
    assert victim.read_text() == "precious\n"


def test_the_default_mirror_is_independent_of_the_originals(plate, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    originals = tree(plate)
    argv = ["qc", str(plate), "--out", str(tmp_path / "qc"), "--classic-only"]
    assert main([*argv, "--link-passing", str(mirror)]) == 0
    assert "(copy)" in capsys.readouterr().out
    copies = sorted(mirror.rglob("*.tif"))
    assert len(copies) == 4
    for copy in copies:
        source = plate / copy.relative_to(mirror)
        assert not copy.is_symlink() and not os.path.samefile(copy, source)
        with open(copy, "r+b") as f:  # a downstream tool editing a mirrored file in place
            f.write(b"\0" * 16)
    assert tree(plate) == originals  # … leaves the user's originals as they were
    # a refresh removes what the mirror made, but keeps a file edited since (not ours any more)
    assert main([*argv, "--link-passing", str(mirror)]) == 2
    assert "changed since the mirror made them" in capsys.readouterr().err
    assert len(sorted(mirror.rglob("*.tif"))) == 4 and tree(plate) == originals


def test_a_mirror_refresh_replaces_its_own_links(plate, tmp_path):
    argv = ["qc", str(plate), "--out", str(tmp_path / "qc"), "--classic-only"]
    for mode in ("symlink", "symlink", "hard", "copy", "copy"):
        assert main([*argv, "--link-passing", str(tmp_path / "m"), "--link-mode", mode]) == 0
    assert len(list((tmp_path / "m").rglob("*.tif"))) == 4


# -- temporary files of a killed run ---------------------------------------------------------
def test_a_rerun_removes_stale_part_files_but_not_live_ones(plate, tmp_path, test_model_dir):
    from napari_cellmae.outputs import clean_stale_parts
    from napari_cellmae.store import atomic_path

    qc, emb = tmp_path / "qc", tmp_path / "emb"
    assert main(_argv("qc", plate, qc)) == 0
    assert main(_argv("embed", plate, emb, test_model_dir)) == 0
    # what a kill -9 during the final assembly leaves (the same names atomic_path makes)
    stale = [
        qc / ".qc_images.parquet.k1ll3d.parquet.part",
        emb / ".crops.parquet.k1ll3d.parquet.part",
        emb / PLATE / ".channels.json.x.json.part",
    ]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a table")
    user = qc / "my.part"  # not a name the tool makes: never touched
    user.write_text("mine")
    assert main(_argv("qc", plate, qc)) == 0
    assert main(_argv("embed", plate, emb, test_model_dir)) == 0
    assert not any(p.exists() for p in stale) and user.read_text() == "mine"
    # a file still being written (its writer holds the lock) is left alone
    with atomic_path(qc / "big.parquet") as tmp:
        tmp.write_bytes(b"being written")
        assert clean_stale_parts(qc) == [] and tmp.exists()
    assert (qc / "big.parquet").read_bytes() == b"being written"


def test_folders_made_before_the_marker_existed_still_resume(tmp_path):
    from napari_cellmae.outputs import OutputFolderError, check_output_dir
    from napari_cellmae.store import run_record

    old = tmp_path / "emb"  # an embedding folder of an earlier version: a run record, no marker
    old.mkdir()
    (old / "config.json").write_text(json.dumps(run_record(model_checksum="abc", pooling="mean")))
    assert check_output_dir(old, "embed") == old
    with pytest.raises(OutputFolderError, match="made by `cellmae embed`"):
        check_output_dir(old, "profile")
    empty = tmp_path / "empty"  # what a file browser leaves behind does not make a folder used
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")
    assert check_output_dir(empty, "qc") == empty


def test_reconstruct_of_a_single_tiff_writes_beside_it_only_into_a_new_folder(
    tmp_path, test_model_dir, capsys
):
    import tifffile

    images = tmp_path / "images"
    images.mkdir()
    field = images / "field.tif"
    pixels = np.random.default_rng(0).integers(0, 4000, (3, 256, 256), np.uint16)
    tifffile.imwrite(field, pixels, photometric="minisblack")
    model = ["--model", str(test_model_dir), "--device", "cpu"]
    before = tree(images)
    assert main(["reconstruct", str(field), "--out", str(images), *model]) == 2
    assert "not empty" in capsys.readouterr().err and tree(images) == before
    assert main(["reconstruct", str(field), "--out", str(images / "recon"), *model]) == 0
    assert (images / "recon" / "field_run.json").is_file()
    assert written(before, tree(images)) <= {p for p in tree(images) if p.startswith("recon")}
