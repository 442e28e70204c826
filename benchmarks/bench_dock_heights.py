"""Height of the CellMAE docks: the five single-capability widgets of the Plugins menu docked in
one viewer, each widget's size-hint height and their sum (what a user scrolls through).

    xvfb-run -a -s "-screen 0 1920x1200x24" python benchmarks/bench_dock_heights.py
"""

from __future__ import annotations

import napari
from qtpy.QtWidgets import QApplication

WIDGETS = ("Load plate", "Reconstruct masked view", "Embed", "Artefact QC", "Fine-tune")


def main() -> None:
    viewer = napari.Viewer(show=True)
    total = 0
    for name in WIDGETS:
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-cellmae", name)
        QApplication.processEvents()
        height = widget.sizeHint().height()
        total += height
        print(f"{name:<24} {height:>5} px")
    print(f"{'all five':<24} {total:>5} px")
    viewer.close()


if __name__ == "__main__":
    main()
