"""Synthetic Cell-Painting-like fields, plates and screens, deterministic by seed.

A field is drawn from a few hundred numbers per cell (centre, radius, shape harmonics, nucleus
ellipse, stain levels, cell-cycle state) and rendered vectorised: cells tile the field as a
weighted Voronoi diagram with wobbly outlines, nuclei are textured ellipses (mitotic cells round up
and condense their DNA), and each stain has its own structure — ER network with a bright nuclear
envelope, nucleoli (RNA), cortical actin, stress fibres and membranes (AGP), tubular or fragmented
mitochondria, a perinuclear Golgi, and more for up to 11 channels. An acquisition model adds
illumination falloff, background, shot and read noise and the camera's bit depth. Phenotypes change
the cells with a controllable ``strength``; plate/batch effects change gains and illumination.

Writers put fields on disk in every layout :mod:`napari_cellmae.plates` reads (TIFF, PNG, JPEG 2000)
so tests, sample data, training and benchmarks all use real files.
"""

from .field import (
    MAX_CHANNELS,
    PHENOTYPES,
    STAINS,
    batch_effect,
    field_seed,
    format_phenotype,
    make_field,
    parse_phenotype,
)
from .writers import (
    WRITABLE_LAYOUTS,
    channel_ids,
    instrument_relpath,
    make_screen,
    write_plate,
)

__all__ = [
    "MAX_CHANNELS",
    "PHENOTYPES",
    "STAINS",
    "WRITABLE_LAYOUTS",
    "batch_effect",
    "channel_ids",
    "field_seed",
    "format_phenotype",
    "instrument_relpath",
    "make_field",
    "make_screen",
    "parse_phenotype",
    "write_plate",
]
