import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_validates_and_main_panel_first():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-cellmae")
    assert pm.name == "napari-cellmae"
    first = pm.contributions.widgets[0]
    assert first.display_name == "CellMAE"
    command = next(c for c in pm.contributions.commands if c.id == first.command)
    assert command.python_name == "napari_cellmae._qt.main_panel:MainPanel"
    for c in pm.contributions.commands:  # every python_name points at something real
        module, _, attr = c.python_name.partition(":")
        assert attr, c.python_name
        assert (ROOT / "src" / Path(*module.split("."))).with_suffix(".py").exists() or (
            ROOT / "src" / Path(*module.split("."))
        ).is_dir(), c.python_name


def test_top_level_manifest_is_the_packaged_one():
    top = ROOT / "napari.yaml"
    packaged = ROOT / "src" / "napari_cellmae" / "napari.yaml"
    assert yaml.safe_load(top.read_text()) == yaml.safe_load(packaged.read_text())


def test_wheel_ships_manifest(tmp_path):
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_cellmae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_cellmae/napari.yaml" in names
    assert "napari_cellmae/_napari/samples/bbbc022-u2os-A14-s1.ome.tif" in names  # real sample
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "napari-cellmae = napari_cellmae:napari.yaml" in text
