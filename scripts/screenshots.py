"""Regenerate the documentation screenshots from the real widgets.

Run under an X server (Xvfb), from the project root:

    xvfb-run -a python scripts/screenshots.py            # every screenshot
    xvfb-run -a python scripts/screenshots.py panel      # only some

Each shot is a function below that builds a real napari viewer, drives the real widgets and saves a
PNG under docs/images/.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
SHOTS: dict[str, Callable[[], None]] = {}


def shot(func: Callable[[], None]) -> Callable[[], None]:
    SHOTS[func.__name__] = func
    return func


def _viewer():
    import napari

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    return viewer


def _process(ms: int = 300) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + ms / 1000
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def wait_for(runner, timeout_s: float = 600) -> None:
    """Process events until the panel's task runner is idle."""
    import time

    end = time.monotonic() + timeout_s
    while runner.busy and time.monotonic() < end:
        _process(50)


def shot_model(shot_name: str, fallback_dir: Path | None = None) -> str:
    """The model a shot uses: ``CELLMAE_SHOT_MODEL``, else the bundled default when installed.

    Without either: with ``fallback_dir``, the tiny architecture with random weights (seed 0, the
    same every time) saved there; otherwise "" (the caller says what is missing).
    """
    import os

    from napari_cellmae.registry import DEFAULT_MODEL, bundled_models

    source = os.environ.get("CELLMAE_SHOT_MODEL") or (
        DEFAULT_MODEL if DEFAULT_MODEL in bundled_models() else ""
    )
    if source or fallback_dir is None:
        return source
    import torch

    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model

    torch.manual_seed(0)
    print(f"{shot_name}: no trained model installed: random-weight cellmae_vit_tiny_patch16_256")
    module = create_model("cellmae_vit_tiny_patch16_256")
    return str(save_model(module, fallback_dir / "random-tiny"))


def save_window(viewer, name: str) -> Path:
    _process(500)
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"{name}.png"
    viewer.window._qt_window.grab().save(str(path))
    print(f"wrote {path.relative_to(ROOT)}")
    return path


@shot
def panel() -> None:
    """The main panel docked in napari, as `napari -w napari-cellmae` opens it, beside the real
    sample field (File → Open Sample → CellMAE → BBBC022 Cell Painting)."""
    viewer = _viewer()
    viewer.open_sample("napari-cellmae", "bbbc022-field")
    viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    save_window(viewer, "panel")
    viewer.close()


@shot
def loading() -> None:
    """The Load tab: the real 72-field transfluor plate as a plate map with a clicked field open
    (loading.png), and the real ExampleHuman field with named channels (loading-example-human.png).
    """
    import os
    import tempfile

    real = ROOT.parent / "shared" / "data" / "real"
    os.environ["CELLMAE_HOME"] = tempfile.mkdtemp()  # channel names stay out of the user's cache
    viewer = _viewer()
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    tab = panel.tabs["Load"]
    tab.scan(str(real / "transfluor-plate"))
    wait_for(panel.runner)
    tab.well_combo.setCurrentIndex(tab.well_combo.findData("O12"))
    tab.site_combo.setCurrentIndex(1)
    layer = viewer.layers["plate map"]
    index = int(
        (
            (layer.features["Metadata_Well"] == "O12") & (layer.features["Metadata_Site"] == 2)
        ).idxmax()
    )
    layer.selected_data = {index}  # as a click on the point does
    wait_for(panel.runner)
    viewer.layers.selection.active = layer  # shows the clicked point highlighted
    viewer.reset_view()
    save_window(viewer, "loading")
    viewer.close()

    viewer = _viewer()
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    tab = panel.tabs["Load"]
    tab.scan(str(real / "ExampleHuman"))
    wait_for(panel.runner)
    tab.set_channel_names({"d0": "DNA (Hoechst)", "d1": "PH3 (mitosis)", "d2": "Cell body"})
    tab.open_button.click()
    wait_for(panel.runner)
    viewer.layers.remove("plate map")
    viewer.layers.remove("plate wells")
    viewer.reset_view()
    save_window(viewer, "loading-example-human")
    viewer.close()


@shot
def reconstruct() -> None:
    """The Reconstruct tab on the real ExampleHuman field: mask ratio 0.75 (reconstruct.png), only
    the DNA channel hidden, predicted from the other two (reconstruct-hidden-channel.png), and the
    preview montage `cellmae reconstruct` writes for the first run (reconstruct-preview.png).

    Uses the bundled model; ``CELLMAE_SHOT_MODEL=/path/to/model-folder`` picks another one. Without
    either it writes nothing and says to rerun once the bundled model is trained: a random-weight
    model's reconstruction would misrepresent what the tab shows.
    """
    import os
    import tempfile

    from napari_cellmae.reconstruct import write_preview
    from napari_cellmae.registry import DEFAULT_MODEL

    source = shot_model("reconstruct")
    if not source:
        print(
            f"reconstruct: the bundled model {DEFAULT_MODEL!r} is not installed yet; rerun "
            "`xvfb-run -a python scripts/screenshots.py reconstruct` once it is (or set "
            "CELLMAE_SHOT_MODEL to a trained model folder). Nothing written.",
            file=sys.stderr,
        )
        return
    real = ROOT.parent / "shared" / "data" / "real"
    os.environ["CELLMAE_HOME"] = tempfile.mkdtemp()  # channel names stay out of the user's cache
    viewer = _viewer()
    viewer.window._qt_window.resize(1900, 950)  # four views side by side need the width
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    panel.model_picker.set_source(source)
    load = panel.tabs["Load"]
    load.scan(str(real / "ExampleHuman"))
    wait_for(panel.runner)
    load.set_channel_names({"d0": "DNA", "d1": "PH3", "d2": "Cell body"})
    load.open_button.click()
    wait_for(panel.runner)
    viewer.layers.remove("plate map")
    viewer.layers.remove("plate wells")
    tab = panel.tabs["Reconstruct"]
    panel.tab_widget.setCurrentWidget(tab)
    tab.mask_ratio.setValue(0.75)
    tab.seed.setValue(0)
    tab.run_button.click()
    wait_for(panel.runner)
    viewer.reset_view()
    save_window(viewer, "reconstruct")
    write_preview(IMAGES / "reconstruct-preview.png", tab.result, dpi=80)
    print("wrote docs/images/reconstruct-preview.png")

    tab.set_hidden(["DNA"])
    tab.mask_ratio.setValue(0.0)  # only DNA hidden: predict the missing stain from the others
    tab.run_button.click()
    wait_for(panel.runner)
    for layer in viewer.layers:  # show only DNA: input | masked (blank) | predicted
        layer.visible = layer.name in ("DNA", "masked DNA", "reconstruction DNA")
    viewer.reset_view()
    save_window(viewer, "reconstruct-hidden-channel")
    viewer.close()


@shot
def embedding() -> None:
    """The Embed tab on a synthetic one-plate screen (48 wells, 5 stains): the plate embedded, a
    field opened by clicking its point in the docked scatter plot, the plate map coloured by
    similarity to it, and the profiling report (model vs baseline) in the tab (embedding.png).

    Uses the bundled model when installed (or ``CELLMAE_SHOT_MODEL``), else the bundled
    architecture with random weights (the tab works the same; the caption says which).
    """
    import os
    import tempfile

    import pandas as pd

    from napari_cellmae.synthetic import make_screen

    tmp = Path(tempfile.mkdtemp())
    os.environ["CELLMAE_HOME"] = str(tmp / "home")
    source = shot_model("embedding", tmp)
    make_screen(
        tmp / "screen",
        n_plates=1,
        perturbations=12,
        replicates=3,
        controls=12,
        n_channels=5,
        size=512,
        seed=0,
    )
    viewer = _viewer()
    viewer.window._qt_window.resize(1800, 1000)
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    panel.model_picker.set_source(source)
    load, tab = panel.tabs["Load"], panel.tabs["Embed"]
    load.scan(str(tmp / "screen" / "SCREEN-1"))
    wait_for(panel.runner)
    load.set_channel_names({"w1": "DNA", "w2": "ER", "w3": "RNA", "w4": "AGP", "w5": "Mito"})
    panel.tab_widget.setCurrentWidget(tab)
    tab.out_edit.setText(str(tmp / "emb"))
    tab.embed_plate_button.click()
    wait_for(panel.runner)
    tab.platemap_edit.setText(str(tmp / "screen" / "platemap.csv"))
    pm = pd.read_csv(tmp / "screen" / "platemap.csv")  # same mechanism = known relationship
    pm = pm[~pm["Metadata_IsControl"]].drop_duplicates("Metadata_Perturbation")
    pairs = pm.merge(pm, on="Metadata_Mechanism").query(
        "Metadata_Perturbation_x < Metadata_Perturbation_y"
    )
    pairs[["Metadata_Perturbation_x", "Metadata_Perturbation_y"]].to_csv(
        tmp / "pairs.csv", index=False
    )
    tab.pairs_edit.setText(str(tmp / "pairs.csv"))
    tab.profile_button.click()
    wait_for(panel.runner)
    _process(300)
    tab.open_row(int(tab.table["embedding_pc1"].idxmax()))  # as a click on its point does
    wait_for(panel.runner)
    viewer.layers.selection.active = viewer.layers["plate map"]
    viewer.reset_view()
    save_window(viewer, "embedding")
    viewer.close()


@shot
def qc() -> None:
    """The QC tab on the real transfluor plate (72 fields) with synthetic artefacts put into 10
    fields (a copy in a temporary folder): the flagged-field table with classes and reasons, the
    plate map coloured by QC score, and a flagged field opened from the table (qc.png).

    Uses the bundled model when installed (or ``CELLMAE_SHOT_MODEL``), else the random-weight
    ``cellmae_vit_tiny_patch16_256`` (seed 0) that the shipped default head was trained on.
    """
    import os
    import tempfile

    from napari_cellmae.qc.artefacts import spoil_copy

    real = ROOT.parent / "shared" / "data" / "real" / "transfluor-plate"
    tmp = Path(tempfile.mkdtemp())
    os.environ["CELLMAE_HOME"] = str(tmp / "home")
    source = shot_model("qc", tmp)
    spoil = {  # well/site -> artefact
        "O03f01": "defocus", "O05f00": "saturation", "O08f02": "debris", "O10f01": "noise",
        "O13f00": "empty", "O15f02": "background", "O17f01": "gaussian_blur",
        "O19f00": "vignetting", "O21f02": "debris", "O23f01": "defocus",
    }  # fmt: skip
    plate = spoil_copy(real.glob("*.TIF"), tmp / "transfluor-with-artefacts", spoil)

    viewer = _viewer()
    viewer.window._qt_window.resize(1700, 1000)
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    panel.model_picker.set_source(source)
    panel.tabs["Load"].scan(str(plate))
    wait_for(panel.runner)
    tab = panel.tabs["QC"]
    panel.tab_widget.setCurrentWidget(tab)
    tab.run()
    wait_for(panel.runner)
    print(f"qc: {tab.counts.text()}")
    tab.table.selectRow(0)  # the highest score: opens that field
    wait_for(panel.runner)
    viewer.layers.selection.active = viewer.layers["plate map"]
    viewer.reset_view()
    save_window(viewer, "qc")
    viewer.close()


@shot
def finetune() -> None:
    """The Fine-tune tab after a short run on a synthetic one-plate screen (16 wells, 5 stains,
    512×512): live loss plot, summary, the report with probe accuracy per block (finetune.png);
    the report's plots are copied to finetune-examples.png and finetune-probes.png.

    Starts from the bundled model when installed (or ``CELLMAE_SHOT_MODEL``), else from random
    weights of ``cellmae_vit_tiny_patch16_256``; the run is capped at 3 minutes
    (``CELLMAE_SHOT_MINUTES``).
    """
    import os
    import shutil
    import tempfile

    from napari_cellmae.synthetic import make_screen

    tmp = Path(tempfile.mkdtemp())
    os.environ["CELLMAE_HOME"] = str(tmp / "home")
    make_screen(tmp / "screen", n_plates=1, perturbations=6, replicates=2, controls=4,
                n_channels=5, size=512, seed=0)  # fmt: skip
    source = shot_model("finetune")
    viewer = _viewer()
    viewer.window._qt_window.resize(1500, 1250)
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    load = panel.tabs["Load"]
    load.scan(str(tmp / "screen" / "SCREEN-1"))
    wait_for(panel.runner)
    tab = panel.tabs["Fine-tune"]
    panel.tab_widget.setCurrentWidget(tab)
    if source:
        panel.model_picker.set_source(source)
    else:
        tab.scratch.setChecked(True)
        tab.preset.setCurrentText("cellmae_vit_tiny_patch16_256")
        tab.lr.setText("1e-3")
        print("finetune: no trained model installed: from random weights of the tiny preset")
    tab.epochs.setValue(4)
    tab.minutes.setValue(float(os.environ.get("CELLMAE_SHOT_MINUTES", "3")))
    tab.patience.setValue(0)
    tab.platemap.setText(str(tmp / "screen" / "platemap.csv"))
    tab._read_columns()
    tab.label_column.setCurrentText("Metadata_Mechanism")
    tab.out.setText(str(tmp / "models" / "my-screen-model"))
    tab.start()
    wait_for(tab.runner, timeout_s=1800)
    print(f"finetune: {tab.summary.text()}")
    report = tmp / "models" / "my-screen-model" / "report"
    for name in ("examples", "probes"):
        if (report / f"{name}.png").is_file():
            shutil.copy(report / f"{name}.png", IMAGES / f"finetune-{name}.png")
    if (report / "report.md").is_file():
        print((report / "report.md").read_text())
    save_window(viewer, "finetune")
    viewer.close()


def main(names: list[str]) -> int:
    for name in names or list(SHOTS):
        if name not in SHOTS:
            print(f"unknown shot {name!r}; known: {', '.join(SHOTS)}", file=sys.stderr)
            return 2
        SHOTS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
