"""Write the real sample field shipped in the package (File → Open Sample → CellMAE).

One BBBC022 Cell Painting field (U2OS, plate 20585, well A14, site 1, five stains, 520×696,
16-bit, illumination-corrected; CC0) from ``../shared/data/real/bbbc022-cellpainting/``, stacked
into one OME-TIFF (axes CYX, channel names, 0.656 µm pixels, Deflate with a horizontal
predictor: 1.8 MB). Run from the project root:

    python scripts/make_real_sample.py

The pixels are the source's, unchanged; the file's description names the source and licence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "real" / "bbbc022-cellpainting"
sys.path.insert(0, str(ROOT / "src"))

from napari_cellmae._napari.sample_data import (  # noqa: E402
    REAL_SAMPLE,
    REAL_SAMPLE_CHANNELS,
    REAL_SAMPLE_PIXEL_UM,
    REAL_SAMPLE_SOURCE,
)


def main() -> int:
    files = [SOURCE / f"plate1_A14_site1_Ch{c}.tif" for c in range(1, 6)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"missing {missing[0]}: put ../shared/data/real beside the project", file=sys.stderr)
        return 2
    field = np.stack([tifffile.imread(f) for f in files])
    REAL_SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        REAL_SAMPLE,
        field,
        ome=True,
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 9},
        predictor=True,
        metadata={
            "axes": "CYX",
            "Channel": {"Name": list(REAL_SAMPLE_CHANNELS)},
            "PhysicalSizeX": REAL_SAMPLE_PIXEL_UM,
            "PhysicalSizeY": REAL_SAMPLE_PIXEL_UM,
            "Description": REAL_SAMPLE_SOURCE,
        },
    )
    print(f"wrote {REAL_SAMPLE} ({REAL_SAMPLE.stat().st_size / 1e6:.2f} MB), {field.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
