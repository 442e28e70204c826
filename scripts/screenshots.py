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


def save_window(viewer, name: str) -> Path:
    _process(500)
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"{name}.png"
    viewer.window._qt_window.grab().save(str(path))
    print(f"wrote {path.relative_to(ROOT)}")
    return path


@shot
def panel() -> None:
    """The main panel docked in napari, as `napari -w napari-cellmae` opens it."""
    viewer = _viewer()
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


def main(names: list[str]) -> int:
    for name in names or list(SHOTS):
        if name not in SHOTS:
            print(f"unknown shot {name!r}; known: {', '.join(SHOTS)}", file=sys.stderr)
            return 2
        SHOTS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
