"""Reference MeasureImageQuality values from CellProfiler's own code, for tests/test_qc_fidelity.py.

Run ONCE, in a throwaway environment that has CellProfiler's library (never the project's venv;
CellProfiler is not a dependency of napari-cellmae, only its values are committed):

    python3.11 -m venv /tmp/cpvenv2
    /tmp/cpvenv2/bin/pip install "numpy<2" "scipy<1.11" centriole-nightly "pydantic>=2.11" \\
        mahotas scikit-image scikit-learn matplotlib tifffile "imagecodecs<2025" packaging
    /tmp/cpvenv2/bin/pip install --no-deps cellprofiler-library-nightly==5.0.0.dev784
    /tmp/cpvenv2/bin/python scripts/cellprofiler_reference.py --out tests/data/cellprofiler_iq.json

For every real image in ``../shared/data/real/`` (first image of each folder's channels, the
whole image) it loads the file the way CellProfiler's default loader does (the TIFF's
``MaxSampleValue`` when present, else the dtype's range) and runs
``cellprofiler_library.modules._measureimagequality.measure_image_quality`` with blur scale 20,
saturation, intensity and a two-class weighted-variance Otsu threshold (MeasureImageQuality's
defaults). It writes the scale used and every measured value, keyed by file path relative to
the real-data folder. Only numpy, tifffile and CellProfiler's library are used here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
# one image per channel of one field of each source (the tests read the same files)
FILES = (
    "transfluor-plate/AS_09047_050428030001_O01f00d2.TIF",
    "transfluor-plate/AS_09047_050428030001_O13f01d2.TIF",
    "ExampleHuman/AS_09125_050116030001_D03f00d0.tif",
    "ExampleHuman/AS_09125_050116030001_D03f00d1.tif",
    "ExampleHuman/AS_09125_050116030001_D03f00d2.tif",
    "speckles/1-162hrh2ax2.tif",
    "speckles/1-162hrhoe2.tif",
    "bbbc022-cellpainting/plate1_A14_site1_Ch1.tif",
    "bbbc022-cellpainting/plate1_A14_site1_Ch2.tif",
    "bbbc022-cellpainting/plate1_A14_site1_Ch3.tif",
    "bbbc022-cellpainting/plate1_A14_site1_Ch4.tif",
    "bbbc022-cellpainting/plate1_A14_site1_Ch5.tif",
    "bbbc022-raw-imagexpress/IXMtest_A01_s1_w164FBEEF7-F77C-4892-86F5-72D0160D4FB2.tif",
    "bbbc022-raw-imagexpress/IXMtest_E07_s3_w1724EB5AF-9EF4-41F9-98E6-6CF7E4182E51.tif",
    "jump-pilot-phenix/r01c01f01p01-ch2sk1fk1fl1.tiff",
    "jump-pilot-phenix/r01c01f01p01-ch3sk1fk1fl1.tiff",
    "jump-pilot-phenix/r01c01f01p01-ch5sk1fk1fl1.tiff",
)
# CellProfiler feature name (ImageQuality_<feature>_<image>[_<scale>]) -> our metric name
FEATURES = {
    "FocusScore_img": "FocusScore",
    "LocalFocusScore_img_20": "LocalFocusScore_20",
    "Correlation_img_20": "Correlation_20",
    "PowerLogLogSlope_img": "PowerLogLogSlope",
    "PercentMaximal_img": "PercentMaximal",
    "PercentMinimal_img": "PercentMinimal",
    "TotalIntensity_img": "TotalIntensity",
    "MeanIntensity_img": "MeanIntensity",
    "MedianIntensity_img": "MedianIntensity",
    "StdIntensity_img": "StdIntensity",
    "MADIntensity_img": "MADIntensity",
    "MinIntensity_img": "MinIntensity",
    "MaxIntensity_img": "MaxIntensity",
    "ThresholdOtsu_img_2W": "ThresholdOtsu",
}


def load_like_cellprofiler(path: Path) -> tuple[np.ndarray, float]:
    """float64 image in [0, 1] and the divisor: MaxSampleValue if tagged, else the dtype max."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        data = page.asarray()
        tag = page.tags.get("MaxSampleValue")
    if data.ndim != 2:
        raise SystemExit(f"{path}: expected one 2-D plane, got shape {data.shape}")
    scale = float(tag.value) if tag is not None else float(np.iinfo(data.dtype).max)
    return data.astype(np.float64) / scale, scale


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    from cellprofiler_library.modules._measureimagequality import (
        ThresholdConfig,
        measure_image_quality,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=REAL)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    images = {}
    for rel in FILES:
        image, scale = load_like_cellprofiler(args.real / rel)
        m = measure_image_quality(
            image,
            "img",
            check_blur=True,
            blur_scales=[20],
            check_saturation=True,
            check_intensity=True,
            calculate_threshold=True,
            threshold_groups=[ThresholdConfig(algorithm="Otsu")],
        )
        values = {}
        for feature, name in FEATURES.items():
            value = m.get_measurement("Image", f"ImageQuality_{feature}")
            values[name] = float(np.asarray(value).ravel()[0])
        images[rel] = {"scale": scale, "values": values}
        print(rel, scale, values["ThresholdOtsu"], flush=True)
    record = {
        "generator": "scripts/cellprofiler_reference.py",
        "cellprofiler_library": version("cellprofiler-library-nightly"),
        "centriole": version("centriole-nightly"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "settings": "blur scale 20; saturation; intensity; Otsu two-class weighted variance",
        "images": images,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
