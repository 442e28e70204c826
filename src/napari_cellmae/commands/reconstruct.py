"""Hide patches of one field and let the model predict them; write what it sees.

FIELD_OR_PLATE is a plate folder (pick the field with --well/--site; default: the first complete
field), one image file of a plate (its whole field, every channel), or a multi-channel TIFF
(OME-TIFF channel names are used). Large fields are tiled into overlapping 256×256 crops that
blend into each other (no seams); one random mask covers the whole field (--seed makes it
reproducible).

Writes into --out, named after the field: <field>_masked.ome.tif, <field>_reconstruction.ome.tif
(the prediction of every patch), <field>_composite.ome.tif (visible patches from the input, hidden
ones predicted), <field>_error.ome.tif (per-patch MSE in standardised units),
<field>_mask.ome.tif (1 = hidden), <field>_preview.png (input | masked | reconstruction |
prediction | error per channel), <field>_summary.csv
(+ .parquet: per channel, mean error of the hidden patches vs a mean-fill baseline), and
<field>_run.json (model and checksum, mask ratio, seed, hidden channels, channel names).

examples:
  cellmae reconstruct /data/plate1 --well B03 --site 1 --out recon/
  cellmae reconstruct /data/plate1 --well B03 --hide-channel DNA --mask-ratio 0 --out recon/
  cellmae reconstruct field.ome.tif --model /models/OpenPhenom --device cuda --out recon/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._options import add_force, add_inference, add_layout

HELP = "reconstruct a masked view of one field (OME-TIFF stacks, PNG preview, summary)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="FIELD_OR_PLATE",
        help="plate folder, one image file of a plate, or a multi-channel TIFF",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: new, empty, or one an earlier `cellmae reconstruct` made (more "
        "fields are added); never the input's folder",
    )
    add_force(parser)
    where = parser.add_argument_group("which field (plate folders)")
    where.add_argument("--well", help="well, e.g. B03 (default: the first complete field)")
    where.add_argument("--site", type=int, default=None, help="site, 1-based (default: 1)")
    where.add_argument("--plate", help="plate name, when the folder holds several plates")
    add_layout(where)
    masking = parser.add_argument_group("masking")
    masking.add_argument(
        "--mask-ratio",
        type=float,
        default=0.75,
        help="fraction of the (non-hidden) channels' patches hidden at random in each 256×256 "
        "crop, 0 <= r < 1 (default: 0.75)",
    )
    masking.add_argument("--seed", type=int, default=0, help="random seed of the mask (default: 0)")
    masking.add_argument(
        "--hide-channel",
        action="append",
        default=[],
        metavar="NAME_OR_INDEX",
        help="hide a whole channel (name or 0-based index; repeat the option for more): the "
        "model predicts that stain from the others",
    )
    add_inference(parser)


def _safe(text: str) -> str:
    from ..embed_store import safe_name  # the one name -> file name mapping (no collisions)

    return safe_name(text)


def tiff_channel_names(path: Path, count: int) -> list[str]:
    """Channel names from an OME-TIFF's metadata, else ``ch0`` … ``ch{count-1}``."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
        if xml:
            root = ET.fromstring(xml)
            names = [
                el.get("Name", "") for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Channel"
            ]
            if len(names) == count and all(names) and len(set(names)) == count:
                return names
    except (OSError, ValueError, tifffile.TiffFileError, ET.ParseError):
        pass
    return [f"ch{i}" for i in range(count)]


def load_input(args: argparse.Namespace) -> dict[str, Any]:
    """The field named on the command line: ``image`` (C, H, W), ``channel_names``,
    ``channels`` (ids, or None), ``input`` (for the run record) and ``stem`` (output names)."""
    from ..plates import list_fields, read_field, scan_plate
    from ..plates.read import read_image

    path = Path(args.source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a plate folder or an image file.")
    if path.is_dir():
        index = scan_plate(path, args.layout)
        well, site = args.well, args.site or 1
        if well is None:
            fields = list_fields(index)
            complete = fields[fields["complete"]] if "complete" in fields else fields
            first = (complete if len(complete) else fields).iloc[0]
            well, site = str(first["Metadata_Well"]), int(first["Metadata_Site"])
            args.plate = args.plate or str(first["Metadata_Plate"])
            print(f"no --well given: using {args.plate} {well} site {site}", file=sys.stderr)
        image = read_field(index, well, site, plate=args.plate)
        plate = args.plate or str(index[index["Metadata_Well"] == well]["Metadata_Plate"].iloc[0])
        return _plate_field(index, image, plate, well, site)
    if args.well or args.site or args.plate:
        raise ValueError(
            f"--well/--site/--plate pick a field of a plate folder; {path} is one file already: "
            "leave them out, or pass the plate folder."
        )
    try:  # one image of a plate: its whole field
        index = scan_plate(path.parent, args.layout)
        rows = index[index["path"] == str(path.resolve())]
    except ValueError:
        rows = None
    if rows is not None and len(rows):
        first = rows.iloc[0]
        well, site = str(first["Metadata_Well"]), int(first["Metadata_Site"])
        plate = str(first["Metadata_Plate"])
        image = read_field(index, well, site, plate=plate)
        return _plate_field(index, image, plate, well, site)
    image = read_image(path)  # a multi-channel (or single-channel) image file
    return {
        "image": image,
        "channel_names": tiff_channel_names(path, image.shape[0])
        if path.suffix.lower() in (".tif", ".tiff")
        else [f"ch{i}" for i in range(image.shape[0])],
        "channels": None,
        "input": {"path": str(path.resolve())},
        "stem": _safe(path.name.split(".")[0]),
        "folder": str(path),  # not a plate: only the file itself is an input
    }


def _plate_field(index: Any, image: Any, plate: str, well: str, site: int) -> dict[str, Any]:
    ids = list(index.attrs["channels"])
    names = [index.attrs["channel_names"].get(c, c) for c in ids]
    return {
        "image": image,
        "channel_names": names,
        "channels": ids,
        "input": {
            "plate_folder": str(index.attrs["root"]),
            "layout": index.attrs["layout"],
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_Site": site,
        },
        "stem": _safe(f"{plate}_{well}_s{site}"),
        "folder": str(index.attrs["root"]),
    }


def run(args: argparse.Namespace) -> int:
    from .. import load_model
    from ..plates.channels import save_channel_map
    from ..progress import run as drive
    from ..reconstruct import check_model_channels, reconstruct_field, save_reconstruction

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}.")
    from ..outputs import check_output_dir

    field = load_input(args)
    what = "plate folder" if "plate_folder" in field["input"] else "input image"
    guard = {"inputs": [field["folder"]], "force": args.force, "what": what}
    check_output_dir(args.out, "reconstruct", **guard)  # before the model runs
    image, names = field["image"], field["channel_names"]
    device = None if args.device == "auto" else args.device
    model = load_model(args.model, device=device, precision=args.precision)
    check_model_channels(model, image.shape[0])
    print(
        f"{field['stem']}: {image.shape[0]} channels ({', '.join(names)}), "
        f"{image.shape[1]}×{image.shape[2]} {image.dtype}; model {model.name} on {model.device} "
        f"({model.precision})",
        file=sys.stderr,
    )
    from ._progress import progress_bar

    bar, show = progress_bar("reconstruct", "tile", postfix=0)
    with bar:
        result = drive(
            reconstruct_field(
                model,
                image,
                mask_ratio=args.mask_ratio,
                seed=args.seed,
                hidden_channels=args.hide_channel,
                batch_size=args.batch_size,
                channel_names=names,
            ),
            progress=show,
        )
    out = Path(args.out)
    paths = save_reconstruction(
        result, out, stem=field["stem"], extra={"input": field["input"]}, **guard
    )
    if field["channels"] is not None:
        save_channel_map(out, dict(zip(field["channels"], names)), field["channels"])
    table = result.summary[
        ["channel", "hidden_patches", "masked_error", "mean_fill_error", "ratio"]
    ]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {len(paths)} outputs to {out} ({paths['preview'].name}, …)")
    return 0
