"""The real `napari -w napari-cellmae` command, in a subprocess, under the test X server."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

# Runs inside napari at start-up (napari's own `startup_script` setting): once the event loop is
# up, report the dock widgets and close the viewer so the command exits by itself.
STARTUP = textwrap.dedent(
    """
    import napari
    from qtpy.QtCore import QTimer

    def _report():
        viewer = napari.current_viewer()
        names = list(viewer.window.dock_widgets)
        print("DOCKED:" + "|".join(names), flush=True)
        viewer.close()

    QTimer.singleShot(3000, _report)
    """
)


def test_napari_w_opens_main_panel(tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X server (pytest-xvfb provides one)")
    script = tmp_path / "startup.py"
    script.write_text(STARTUP)
    config = tmp_path / "settings.yaml"
    config.write_text(f"application:\n  startup_script: {script}\n")
    napari = Path(sys.executable).with_name("napari")
    env = {**os.environ, "NAPARI_CONFIG": str(config)}
    proc = subprocess.run(
        [str(napari), "-w", "napari-cellmae"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    docked = [line for line in proc.stdout.splitlines() if line.startswith("DOCKED:")]
    assert docked, f"napari did not report (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "CellMAE (CellMAE)" in docked[0] or "CellMAE" in docked[0], docked[0]
    assert proc.returncode == 0, proc.stderr
