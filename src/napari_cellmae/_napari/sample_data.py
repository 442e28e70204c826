"""Sample data: one real Cell Painting field shipped in the package (BBBC022, CC0), a synthetic
Cell Painting field, and a synthetic mini plate written once (deterministically) into the user's
cache folder and opened like any plate folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MINI_PLATE_VERSION = "v2"
REAL_SAMPLE = Path(__file__).parent / "samples" / "bbbc022-u2os-A14-s1.ome.tif"
REAL_SAMPLE_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
REAL_SAMPLE_PIXEL_UM = 0.656
REAL_SAMPLE_SOURCE = (
    "BBBC022 Cell Painting (Gustafsdottir et al. 2013, PLOS ONE 8(12):e80999), U2OS cells, plate "
    "20585, well A14, site 1, 20x ImageXpress Micro, illumination-corrected; Broad Bioimage "
    "Benchmark Collection, CC0. Channels: Hoechst 33342 (DNA), ConA (ER), SYTO14 (RNA), "
    "WGA + phalloidin (AGP), MitoTracker Deep Red (Mito)."
)


def real_field() -> list[tuple[Any, dict[str, Any], str]]:
    """The real BBBC022 Cell Painting field shipped in the package: 5 stains, 520×696, 16-bit,
    0.656 µm pixels; its source and licence in each layer's metadata."""
    import tifffile

    from .._qt.layers import field_layer_data

    field = tifffile.imread(REAL_SAMPLE)
    metadata = {
        "source": REAL_SAMPLE_SOURCE,
        "licence": "CC0",
        "pixel_size_um": REAL_SAMPLE_PIXEL_UM,
        "Metadata_Plate": "BBBC022-20585",
        "Metadata_Well": "A14",
        "Metadata_Site": 1,
    }
    layers = field_layer_data(field, list(REAL_SAMPLE_CHANNELS), metadata=metadata)
    for _, kwargs, _ in layers:
        kwargs["scale"] = (REAL_SAMPLE_PIXEL_UM, REAL_SAMPLE_PIXEL_UM)
        kwargs["units"] = "µm"
    return layers


def synthetic_field() -> list[tuple[Any, dict[str, Any], str]]:
    """One 512×512 five-stain field (DNA, ER, RNA, AGP, Mito), 12-bit values in uint16."""
    from .._qt.layers import field_layer_data
    from ..synthetic import STAINS, make_field

    field = make_field(n_channels=5, size=(512, 512), seed=0)
    return field_layer_data(field, list(STAINS[:5]), metadata={"source": "synthetic, seed 0"})


def mini_plate_folder() -> Path:
    """The mini plate's folder (written on first use): an Opera Phenix (Harmony) export of 8 wells
    × 2 sites × 5 stains, 256×256, four control wells and four perturbed ones; its ``Index.idx.xml``
    names the stains."""
    from ..registry import cellmae_home
    from ..synthetic import make_screen

    root = cellmae_home() / "sample_data" / f"mini-plate-{MINI_PLATE_VERSION}"
    if (root / "platemap.csv").is_file():
        return root / "MINI-1"
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mini-plate-", dir=root.parent))
    try:
        make_screen(
            tmp,
            n_plates=1,
            perturbations=4,
            replicates=1,
            controls=4,
            sites=2,
            size=(256, 256),
            seed=0,
            plate_prefix="MINI",
            layout="harmony",
        )
        # the whole folder appears at once; if another process wrote it meanwhile, keep theirs
        with contextlib.suppress(OSError):
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "MINI-1"


def mini_plate() -> list[tuple[Any, dict[str, Any], str]]:
    """Plate map + first field of the mini plate (through the plate reader)."""
    from .reader import read_plate_folder

    return read_plate_folder(str(mini_plate_folder()))
