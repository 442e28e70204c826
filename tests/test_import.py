import subprocess
import sys

import napari_cellmae

HEAVY = ("torch", "qtpy", "napari", "PyQt6", "PySide6", "dask", "pandas", "magicgui")


def test_import_is_light():
    # a fresh interpreter: this test process has imported half the world already
    code = f"import sys, napari_cellmae; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import napari_cellmae pulled in: {out.stdout.strip()}"


def test_public_names_resolve_lazily():
    assert set(napari_cellmae.__all__) >= {"load_model", "scan_plate", "read_field", "__version__"}
    assert "load_model" in dir(napari_cellmae)
    try:
        napari_cellmae.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown names must raise AttributeError")


def test_version_matches_metadata():
    from importlib.metadata import version

    assert napari_cellmae.__version__ == version("napari-cellmae")
