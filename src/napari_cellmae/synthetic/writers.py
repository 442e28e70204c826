"""Write synthetic plates and screens as instruments name their files (TIFF, PNG, JPEG 2000)."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .field import PHENOTYPES, STAINS, field_seed, format_phenotype, make_field

_INCELL_WAVELENGTHS = (
    "390 - Blue",
    "438 - Cyan",
    "475 - Green",
    "511 - Yellow",
    "542 - Orange",
    "575 - Red",
    "620 - FarRed",
    "650 - Cy5",
    "700 - NIR",
    "740 - IR",
    "780 - IR2",
)
# scan^R channels carry the names set in the acquisition; these excitation lines sort naturally
_SCANR_CHANNELS = tuple(f"{nm}nm" for nm in (355, 405, 445, 488, 514, 561, 594, 640, 680, 730, 785))
_8BIT_LAYOUTS = ("rxrx", "rxrx3")
WRITABLE_LAYOUTS = (
    "imagexpress",
    "harmony",
    "cellomics",
    "incell",
    "incucyte",
    "rxrx",
    "rxrx3",
    "scanr",
)


def channel_ids(layout: str, n_channels: int) -> list[str]:
    """The raw channel ids ``layout`` writes for ``n_channels`` stains, in stain order."""
    from ..plates.layouts import INCUCYTE_CHANNELS

    n = int(n_channels)
    if layout == "incucyte":
        if n > len(INCUCYTE_CHANNELS):
            raise ValueError(f"IncuCyte has {len(INCUCYTE_CHANNELS)} channels; got {n}")
        return list(INCUCYTE_CHANNELS[:n])
    return {
        "imagexpress": [f"w{i + 1}" for i in range(n)],
        "harmony": [str(i + 1) for i in range(n)],
        "cellomics": [f"d{i}" for i in range(n)],
        "incell": list(_INCELL_WAVELENGTHS[:n]),
        "rxrx": [f"w{i + 1}" for i in range(n)],
        "rxrx3": [str(i + 1) for i in range(n)],
        "scanr": list(_SCANR_CHANNELS[:n]),
    }[layout]


def _guid(*parts: Any) -> str:
    h = f"{zlib.crc32(repr(parts).encode()):08X}{zlib.crc32(repr(parts[::-1]).encode()):08X}"
    h = (h * 2)[:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def instrument_relpath(
    layout: str,
    prefix: str,
    row: str,
    col: int,
    site: int,
    c: int,
    cid: str,
    plane: int | None,
    timepoint: int | None,
    guid: bool,
    plate_format: int = 96,
) -> str:
    """File path (under the plate folder) of one channel image, as the instrument names it
    (``plate_format``: the plate scan^R numbers its wells on, row-major)."""
    from ..plates.layouts import row_to_index

    well = f"{row}{col:02d}"
    if layout == "imagexpress":
        tag = _guid(prefix, well, site, cid) if guid else ""
        z = f"_z{plane}" if plane is not None else ""
        folder = f"TimePoint_{timepoint}/" if timepoint is not None else ""
        return f"{folder}{prefix}_{well}_s{site}_{cid}{tag}{z}.tif"
    if layout == "harmony":
        r = row_to_index(row)
        return (
            f"r{r:02d}c{col:02d}f{site:02d}p{plane or 1:02d}-ch{cid}sk{timepoint or 1}fk1fl1.tiff"
        )
    if layout == "cellomics":
        return f"{prefix}_{well}f{site - 1:02d}{cid}.tif"
    if layout == "incell":
        z = f" z {plane}" if plane is not None else ""
        t = f" time {timepoint} - {(timepoint - 1) * 60000} ms" if timepoint is not None else ""
        return f"{row} - {col:02d}(fld {site} wv {cid}{z}{t}).tif"
    if layout == "incucyte":
        minutes = ((timepoint or 1) - 1) * 240
        d, rem = divmod(minutes, 1440)
        return f"{prefix}_{cid}_{row}{col}_{site}_{d:02d}d{rem // 60:02d}h{rem % 60:02d}m.tif"
    if layout == "rxrx":
        return f"{well}_s{site}_{cid}.png"
    if layout == "scanr":  # data/--W00014--P00001--Z00000--T00000--488nm.tif (Z, T from 0)
        from ..plates.layouts import PLATE_FORMATS

        number = (row_to_index(row) - 1) * PLATE_FORMATS[plate_format][1] + col
        return (
            f"data/--W{number:05d}--P{site:05d}--Z{(plane or 1) - 1:05d}"
            f"--T{(timepoint or 1) - 1:05d}--{cid}.tif"
        )
    return f"{well}_s{site}_{cid}.jp2"  # rxrx3


def _write_image(path: Any, image: np.ndarray, compression: str | None) -> None:
    """One 2-D image; the format follows the extension (TIFF, PNG, lossless JPEG 2000)."""
    import imagecodecs
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    if ext in (".tif", ".tiff"):
        codec = {"deflate": "zlib", "none": None}.get(str(compression).lower(), compression)
        tifffile.imwrite(path, image, compression=codec, photometric="minisblack")
    elif ext == ".png":
        path.write_bytes(imagecodecs.png_encode(image))
    else:
        path.write_bytes(imagecodecs.jpeg2k_encode(image, reversible=True))


def _harmony_index_xml(names: list[str], ids: list[str]) -> str:
    ns = "http://www.perkinelmer.com/PEHH/HarmonyV5"
    entries = "".join(
        f'<Entry ChannelID="{cid}"><ChannelName>{name}</ChannelName></Entry>'
        for cid, name in zip(ids, names)
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<EvaluationInputData xmlns="{ns}">'
        f"<Maps><Map>{entries}</Map></Maps></EvaluationInputData>\n"
    )


def _default_wells(n: int) -> list[str]:
    cols = 12 if n <= 96 else 24
    return [f"{chr(65 + i // cols)}{i % cols + 1:02d}" for i in range(n)]


def _plate_format_for(wells: list[str]) -> int:
    """The smallest of the 96/384/1536-well plates that holds ``wells``."""
    from ..plates.layouts import PLATE_FORMATS, row_to_index, split_well

    parts = [split_well(w) for w in wells]
    for fmt in (96, 384, 1536):
        rows, cols = PLATE_FORMATS[fmt]
        if all(row_to_index(r) <= rows and c <= cols for r, c in parts):
            return fmt
    raise ValueError(f"wells {wells} do not fit a 1536-well plate")


def write_plate(
    folder: Any,
    layout: str = "imagexpress",
    wells: int | list[str] | None = None,
    sites: int = 2,
    n_channels: int = 5,
    size: tuple[int, int] | int = (256, 256),
    seed: int = 0,
    platemap: Any = None,
    plate_name: str = "SYNTH-P1",
    compression: str | None = None,
    batch: int | None = None,
    dtype: Any = None,
    planes: int = 1,
    timepoints: int = 1,
    guid: bool = False,
    thumbnails: bool = False,
) -> Any:
    """Write a synthetic plate as ``layout`` names its files; returns the plate folder.

    Parameters
    ----------
    folder : path
        Parent folder; the plate goes to ``folder / plate_name`` (a ``/`` in ``plate_name`` nests
        folders, e.g. RxRx ``"HUVEC-1/Plate1"``).
    layout : str
        One of ``imagexpress``, ``harmony``, ``cellomics``, ``incell``, ``incucyte``, ``rxrx``,
        ``rxrx3``, ``scanr`` (wells numbered on the smallest of 96/384/1536 plates that holds
        them, no well names in the file names).
    wells : int or list of str, optional
        Well names, or how many wells from ``A01`` row by row (default: the platemap's wells or 4).
    sites, n_channels, size, seed
        Fields per well, stains (1..11), image size, base seed.
    platemap : DataFrame, optional
        ``Metadata_Well`` with ``Metadata_Phenotype`` / ``Metadata_Strength`` (and optionally
        ``Metadata_Plate``) from :func:`make_screen`: the phenotype each well gets.
    compression : str, optional
        TIFF compression: ``None``, ``"lzw"``, ``"deflate"``, ``"zstd"``.
    batch : int, optional
        Plate/batch effect id (gains, illumination).
    dtype : numpy dtype, optional
        Default uint16 (12-bit values); uint8 for the RxRx layouts (8-bit PNG / JPEG 2000).
    planes, timepoints : int
        Z planes (defocused copies) and timepoints, for layouts that name them.
    guid, thumbnails : bool
        ImageXpress: add the MetaXpress GUID to names; write ``_thumb`` files beside the images.
    """
    from pathlib import Path

    from ..plates.layouts import split_well

    if layout not in WRITABLE_LAYOUTS:
        raise ValueError(f"cannot write layout {layout!r}: choose one of {WRITABLE_LAYOUTS}")
    if planes > 1 and layout not in ("imagexpress", "harmony", "incell", "scanr"):
        raise ValueError(f"layout {layout!r} has no z planes in its file names: use planes=1")
    if timepoints > 1 and layout not in ("imagexpress", "harmony", "incell", "incucyte", "scanr"):
        raise ValueError(f"layout {layout!r} has no timepoints in its file names")
    prefix = plate_name.replace("/", "_")
    plate_dir = Path(folder) / plate_name
    ids = channel_ids(layout, n_channels)
    dtype = np.dtype(dtype or (np.uint8 if layout in _8BIT_LAYOUTS else np.uint16))

    pheno: dict[str, tuple[str, float]] = {}
    if platemap is not None:
        pm = platemap
        if "Metadata_Plate" in pm.columns:
            pm = pm[pm["Metadata_Plate"].astype(str) == prefix]
        for row in pm.itertuples(index=False):
            well = "{}{:02d}".format(*split_well(str(row.Metadata_Well)))
            pheno[well] = (
                getattr(row, "Metadata_Phenotype", "") or "",
                float(getattr(row, "Metadata_Strength", 1.0)),
            )
        if wells is None:
            wells = list(pheno)
    if wells is None:
        wells = 4
    if isinstance(wells, int):
        wells = _default_wells(wells)
    plate_format = _plate_format_for(wells)

    plane_ids: list[int | None] = list(range(1, planes + 1)) if planes > 1 else [None]
    time_ids: list[int | None] = list(range(1, timepoints + 1)) if timepoints > 1 else [None]
    if layout == "harmony":  # Harmony names always carry plane and timepoint
        plane_ids = [p or 1 for p in plane_ids]
        time_ids = [t or 1 for t in time_ids]
        plate_dir.mkdir(parents=True, exist_ok=True)
        names = list(STAINS[: len(ids)])
        (plate_dir / "Index.idx.xml").write_text(_harmony_index_xml(names, ids))

    for well in wells:
        row, col = split_well(well)
        name = f"{row}{col:02d}"
        phenotype, strength = pheno.get(name, ("", 0.0))
        for site in range(1, sites + 1):
            for t in time_ids:
                field = make_field(
                    n_channels,
                    size,
                    seed=field_seed(seed, prefix, name, site, t or 1),
                    phenotype=phenotype or None,
                    strength=strength,
                    dtype=dtype,
                    batch=batch,
                )
                for p in plane_ids:
                    img = field
                    if p is not None and planes > 1:
                        blur = 1.2 * abs(p - (planes + 1) / 2)
                        if blur:
                            img = ndi.gaussian_filter(field.astype(np.float32), (0, blur, blur))
                            img = np.round(img).astype(dtype)
                    for c, cid in enumerate(ids):
                        rel = instrument_relpath(
                            layout, prefix, row, col, site, c, cid, p, t, guid, plate_format
                        )
                        _write_image(plate_dir / rel, img[c], compression)
                        if thumbnails and layout == "imagexpress":
                            thumb = plate_dir / rel.replace(f"_{cid}", f"_{cid}_thumb", 1)
                            _write_image(thumb, img[c, ::4, ::4], None)
    return plate_dir


def make_screen(
    folder: Any,
    n_plates: int = 2,
    perturbations: int = 6,
    replicates: int = 2,
    controls: int = 4,
    layout: str = "imagexpress",
    sites: int = 1,
    n_channels: int = 5,
    size: tuple[int, int] | int = (256, 256),
    seed: int = 0,
    compression: str | None = None,
    plate_prefix: str = "SCREEN",
    write: bool = True,
) -> Any:
    """Write a small screen: plates with related perturbations, controls and batch effects.

    Perturbations come in mechanism groups of about three; a group shares a phenotype (one or two
    of :data:`PHENOTYPES` with weights), each member has its own strength and a little private
    variation, so related perturbations resemble each other. Every plate holds each perturbation
    ``replicates`` times plus ``controls`` control wells (phenotype none), at shuffled positions,
    with its own batch effect. Writes ``folder/platemap.csv`` and one plate folder per plate.

    Returns
    -------
    DataFrame
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Perturbation``, ``Metadata_Mechanism``,
        ``Metadata_IsControl``, ``Metadata_Phenotype`` (``"name=weight;…"``),
        ``Metadata_Strength``.
    """
    from pathlib import Path

    import pandas as pd

    from ..store import atomic_path

    rng = np.random.default_rng([int(seed), 1009])
    n_mech = max(1, int(round(perturbations / 3)))
    choices = [p for p in PHENOTYPES if p != "cytotoxic"]
    mechanisms = []
    for _ in range(n_mech):
        picked = rng.choice(choices, size=1 + int(rng.random() < 0.5), replace=False)
        mechanisms.append({str(p): float(rng.uniform(0.7, 1.0)) for p in picked})
    perts = []
    for i in range(perturbations):
        m = i % n_mech
        spec = {k: v * float(rng.uniform(0.85, 1.15)) for k, v in mechanisms[m].items()}
        perts.append((f"PERT-{i + 1:03d}", f"MOA-{m + 1}", spec, float(rng.uniform(0.6, 1.4))))
    n_wells = perturbations * replicates + controls
    if n_wells > 384:
        raise ValueError(f"{n_wells} wells per plate do not fit a 384-well plate: use fewer")
    plate_wells = _default_wells(96 if n_wells <= 96 else 384)

    rows = []
    for p in range(n_plates):
        plate = f"{plate_prefix}-{p + 1}"
        positions = rng.permutation(len(plate_wells))[:n_wells]
        content = [(None, None, {}, 0.0)] * controls + [q for q in perts for _ in range(replicates)]
        for pos, (pert, mech, spec, strength) in zip(positions, content):
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": plate_wells[pos],
                    "Metadata_Perturbation": pert or "DMSO",
                    "Metadata_Mechanism": mech or "control",
                    "Metadata_IsControl": pert is None,
                    "Metadata_Phenotype": format_phenotype(spec),
                    "Metadata_Strength": strength,
                }
            )
    platemap = pd.DataFrame(rows)
    platemap = platemap.sort_values(["Metadata_Plate", "Metadata_Well"]).reset_index(drop=True)
    if write:
        folder = Path(folder)
        for p, (plate, pm) in enumerate(platemap.groupby("Metadata_Plate", sort=True)):
            write_plate(
                folder,
                layout,
                sites=sites,
                n_channels=n_channels,
                size=size,
                seed=seed,
                platemap=pm,
                plate_name=plate,
                compression=compression,
                batch=p,
            )
        with atomic_path(folder / "platemap.csv") as tmp:
            platemap.to_csv(tmp, index=False)
    return platemap
