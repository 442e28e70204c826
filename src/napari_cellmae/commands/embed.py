"""Embed every field of one or more plate folders: per-crop, per-field and per-well tables.

Each field is tiled into 256×256 crops (ceil(side/256) evenly spaced crops per axis); a field's
vector is the mean of its crops', a well's the mean of its fields'. Reading runs ahead in
background threads while the model computes; memory does not grow with the plate.

Writes into --out: crops.parquet, fields.parquet, wells.parquet, features.parquet (classic
per-channel intensity/texture statistics, the baseline of `cellmae profile`), errors.parquet
(fields that could not be read, with the reason), each with a .csv twin, config.json (model
name and checksum, channels, pooling, block, normalisation and each plate's reference, version)
and channels.json. Feature columns are emb_0000…; metadata columns Metadata_Plate, Metadata_Well,
Metadata_Site … as in pycytominer. --platemap CSV joins the platemap's Metadata_* columns
(perturbation, control flag, mechanism …) into the crop, field, well and feature tables, so they go
into pycytominer (aggregate / normalize / feature_select with features = the emb_* columns) and
`cellmae profile` without a platemap of their own.

Resumable: each well is written on its own as soon as it is done (OUT/<plate>/wells/<well>/);
running the same command again skips finished wells, so an interrupted run (Ctrl-C, a killed job)
continues where it stopped. A different model, pooling or normalisation for an existing --out is
refused.

Whole screens: --executor threads|processes|dask hands one task per well to several workers
(--local-workers N: one per GPU here; --scheduler ADDRESS: a running Dask cluster; --slurm-jobs N:
SLURM jobs through dask-jobqueue); --shard K/N embeds one shard of the wells (a job array without
Dask; the shard that finishes last assembles the tables, or --assemble does). Same tables as a
serial run. See docs/scale-out.md.

examples:
  cellmae embed /data/plate1 --out emb/
  cellmae embed /data/screen/P1 /data/screen/P2 --model /models/OpenPhenom --device cuda --out emb/
  cellmae embed /data/plate1 --channels DNA ER RNA AGP Mito --pooling channelwise --out emb/
  cellmae embed /data/screen/P1 /data/screen/P2 --platemap platemap.csv --out emb/
  cellmae embed /data/screen/P* --out emb/ --executor dask --local-workers 4 --device cuda
  cellmae embed /data/screen/P* --out emb/ --slurm-jobs 8 --slurm-gpus 1 --slurm-queue gpu
  cellmae embed /data/screen/P* --out emb/ --shard ${SLURM_ARRAY_TASK_ID}/8
"""

from __future__ import annotations

import argparse

from ._options import add_force, add_inference, add_layout

HELP = "embed plates: per-crop, per-field and per-well parquet tables (resumable)"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --precision, --batch-size, --block, --pooling, --normalization."""
    model = add_inference(parser)
    model.add_argument(
        "--block",
        type=int,
        default=None,
        metavar="K",
        help="1-based encoder block whose tokens are pooled (default: the model's best block, "
        "else the last)",
    )
    model.add_argument(
        "--pooling",
        default=None,
        choices=("mean", "channelwise", "cls"),
        help="mean over all patch tokens (OpenPhenom's official embedding), channelwise "
        "(one mean per channel, C×D values) or the CLS token (default: the model's, mean)",
    )
    model.add_argument(
        "--normalization",
        default=None,
        choices=("crop", "plate"),
        help="input normalisation: crop = each 256×256 crop and channel standardised by itself "
        "(OpenPhenom's; blind to brightness), plate = every crop of a plate by the median crop "
        "statistics of up to 24 of its fields (brighter stains stay brighter; saved in "
        "config.json) (default: the model's; the bundled model's is plate)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plates", nargs="+", metavar="PLATE_DIR", help="plate folder(s)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: new, empty, or one an earlier `cellmae embed` made (resumed); never "
        "inside a plate folder",
    )
    add_force(parser)
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    add_layout(data)
    data.add_argument(
        "--channels",
        nargs="+",
        default=None,
        metavar="CHANNEL",
        help="channel ids or names to embed, in this order (default: every channel)",
    )
    data.add_argument(
        "--levels",
        nargs="+",
        default=["crop", "field", "well"],
        choices=("crop", "field", "well"),
        help="tables to write (default: crop field well)",
    )
    data.add_argument(
        "--no-features",
        action="store_true",
        help="skip the baseline intensity/texture statistics (features.parquet)",
    )
    data.add_argument(
        "--prefetch",
        type=int,
        default=4,
        metavar="N",
        help="fields read ahead in background threads (default: 4)",
    )
    data.add_argument(
        "--platemap",
        default=None,
        metavar="CSV",
        help="platemap CSV/TSV (Metadata_Plate optional, Metadata_Well, Metadata_Perturbation, "
        "Metadata_IsControl, any other Metadata_* column; loose names like well, treatment, "
        "is_control work): joined into the tables",
    )
    data.add_argument(
        "--control",
        nargs="+",
        default=None,
        metavar="NAME",
        help="with --platemap: perturbation name(s) of the negative controls, when the platemap "
        "has no control column",
    )
    from ._scale_out import add_arguments as add_scale_out_arguments

    add_scale_out_arguments(parser, "well")


def run(args: argparse.Namespace) -> int:
    from ..embed import EmbedConfig, embed_plates
    from ..executors import open_executor
    from ..progress import run as drive
    from ._progress import progress_bar
    from ._scale_out import executor_config, pending_message, say, shard

    config = EmbedConfig(
        model=args.model,
        pooling=args.pooling,
        block=args.block,
        normalization=args.normalization,
        batch_size=args.batch_size,
        device=None if args.device == "auto" else args.device,
        precision=args.precision,
        channels=tuple(args.channels) if args.channels else None,
        layout=args.layout,
        levels=tuple(dict.fromkeys(args.levels)),
        features=not args.no_features,
        prefetch=args.prefetch,
        platemap=args.platemap,
        controls=tuple(args.control) if args.control else None,
    )
    if args.control and not args.platemap:
        raise ValueError("--control names the controls of a --platemap: give the platemap too")
    scale, part = executor_config(args), shard(args)
    bar, show = progress_bar("embed", "field")
    with bar, open_executor(scale, config.device, log=say) as executor:
        run_ = embed_plates(
            args.plates,
            args.out,
            config,
            executor=executor,
            max_in_flight=scale.max_in_flight,
            shard=part,
            assemble_only=args.assemble,
            force=args.force,
        )
        result = drive(run_, progress=show)
    if result.n_wells_pending:
        print(
            f"shard {part}: {result.n_wells} wells embedded so far in {result.out_dir}; "
            + pending_message(result.n_wells_pending, "well")
        )
        return 0
    skipped = f", {result.n_wells_skipped} already done" if result.n_wells_skipped else ""
    if result.n_wells_retried:  # wells with failed fields are read again: a fixed file counts
        skipped += f", {result.n_wells_retried} with failed fields retried"
    failed = f"; {result.n_errors} field(s) failed (see errors.csv)" if result.n_errors else ""
    print(
        f"embedded {result.n_fields} fields ({result.n_crops} crops) in {result.n_wells} wells"
        f"{skipped}{failed}; {result.seconds:.1f} s -> {result.out_dir}"
    )
    for name, path in result.tables.items():
        print(f"  {name:<9} {path}")
    return 0
