"""Train the default QC head shipped in ``src/napari_cellmae/qc/heads/default.npz``.

The head must hold on a plate from a microscope it has never seen, so it is trained on every real
source in ``../shared/data/real/`` (used in place, never copied; :func:`real_sources`):

========================  ===========================================  =====  ==========
source                    images (one channel each)                    bits   pixel (µm)
========================  ===========================================  =====  ==========
transfluor                72 GFP fields, 512×512 (BBBC016, Cellomics)  8      0.65 (*)
ExampleHuman              3 stains × four 256×256 tiles (HT29)         8      0.65 (*)
bbbc022-cellpainting      10 fields × 5 Cell Painting stains, 520×696  16     0.656
bbbc022-raw-imagexpress   7 raw Hoechst fields (vignetting), 520×696   16     0.656
jump-pilot-phenix         3 stains × four 540×540 tiles (Phenix)       16     0.598 (*)
speckles                  2 stains × four 500×600 tiles                12/16  0.65 (*)
========================  ===========================================  =====  ==========

(*) not recorded with the images: assumed, the recipe's 20× default (0.65 µm) or a Phenix 20×
value for JUMP. Sparse (ExampleHuman, speckles, raw BBBC022 corners) and dense (transfluor,
JUMP) fields, 8-, 12- and 16-bit, three instruments.

Each deeper image also gets an 8-bit copy (:func:`eight_bit`, ``derived``): two sources are
8-bit, and a head that has not seen one of them would learn 8-bit data from the other alone. A
copy belongs to its image's source (held out with it) and is trained on, never judged.

Every image is used (:func:`variants_of`, seeded by its name) as it is (``ok``), thinned to a
handful of its cells (``ok``: a sparse field is not empty), and once per artefact recipe of
:mod:`napari_cellmae.qc.artefacts` at a random severity 2–5, defocus through the PSF at the
source's pixel size. The head (:func:`fit_default_head`) uses only features that do not depend on
the rest of the plate (``FeatureSpec(relative=False)``): the frozen encoder's embedding of the
image alone and scale-invariant transforms of its CellProfiler metrics. A plate where most fields
are bad then cannot turn its few good fields into outliers (see docs/qc.md).

Each variant is measured and embedded once and cached (:func:`feature_table`, under
``$CELLMAE_QC_CACHE`` or ``/tmp/cellmae-qc-cache``, keyed by the encoder's checksum and block);
``benchmarks/eval_qc.py`` builds its leave-one-source-out heads from the same cache.

    python scripts/train_qc_head.py --model cellmae-tiny --threads 1
    python scripts/train_qc_head.py --model /path/to/OpenPhenom --out my_openphenom_head.npz

The head records the encoder's name and checksum; the plugin uses it only with that encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_cellmae.qc.head import CUE_FEATURES  # numpy only: no torch at import

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_OUT = ROOT / "src" / "napari_cellmae" / "qc" / "heads" / "default.npz"
CACHE = Path(os.environ.get("CELLMAE_QC_CACHE", "/tmp/cellmae-qc-cache"))
TRAIN_SEVERITIES = (2, 3, 4, 5)
AUTOFOCUS_SEVERITIES = (3, 4, 5)  # z = 7, 12, 20 µm: a failed autofocus, not a slight drift
# share of the training weight on "ok" (the six artefact classes share the rest): real plates are
# mostly good; leave-one-source-out, 0.8 flags far fewer clean fields of unseen sources than
# balanced classes while the shipped head still catches >= 90% of a defocused plate (0.85 caught
# 89.5% once the 8-bit copies were added; docs/qc.md)
OK_PRIOR = 0.8
SPARSE_KEEP = (0.05, 0.25)  # fraction of cells a sparse variant keeps (at least 3)
# scale-invariant metric transforms of the shipped head (not ThresholdOtsu: its definition is
# being aligned with CellProfiler's, and a head should not depend on it)
HEAD_METRICS = (
    "plls",
    "correlation",
    "log_cv2",
    "log_local_focus",
    "log_pct_max",
    "log_pct_min",
    "log_max_over_mad",
    "log_iqr_over_median",
    "log_mad_over_median",
    "log_min_over_median",
    # and the plate-independent physical cues (qc/cues.py): illumination, bright objects, clipping
    *CUE_FEATURES,
)
# variant kinds: "ok", "sparse" (ok), every artefact recipe, and "autofocus" (defocus z 7–20 µm,
# the majority-defocus scenario of eval_qc; not used for training)
SOURCES = (
    "transfluor",
    "ExampleHuman",
    "bbbc022-cellpainting",
    "bbbc022-raw-imagexpress",
    "jump-pilot-phenix",
    "speckles",
)


@dataclass(frozen=True)
class RealImage:
    source: str  # one of SOURCES
    name: str  # unique, stable (seeds its variants)
    group: str  # plate/channel group (plate-relative statistics, the baseline's z-scores)
    pixel_um: float
    image: np.ndarray  # (H, W) as read, the file's dtype
    derived: bool = False  # an 8-bit copy of a deeper image: trained on, never judged


EIGHT_BIT_LEVEL = 200  # where an 8-bit copy puts the 99.9th percentile (of 255)


def eight_bit(image: np.ndarray) -> np.ndarray:
    """The image as an 8-bit camera exposed for the cells would record it: scaled so its 99.9th
    percentile lands at :data:`EIGHT_BIT_LEVEL` of 255, rounded and clipped to uint8."""
    x = np.asarray(image, np.float64)
    top = max(float(np.percentile(x, 99.9)), 1e-12)
    return np.clip(np.round(x / top * EIGHT_BIT_LEVEL), 0, 255).astype(np.uint8)


def _read(path: Path) -> np.ndarray:
    from napari_cellmae.plates import read_image

    return read_image(path)[0]


def _tiles(image: np.ndarray, n: int = 2) -> Iterator[tuple[str, np.ndarray]]:
    h, w = image.shape
    for i in range(n):
        for j in range(n):
            y, x = i * h // n, j * w // n
            yield f"[{y}:{x}]", image[y : y + h // n, x : x + w // n]


def real_sources(real: Path = REAL, eight_bit_copies: bool = True) -> list[RealImage]:
    """Every real training/evaluation image, in a fixed order (see the module docstring), then
    (``eight_bit_copies``) an 8-bit copy of each deeper image (:func:`eight_bit`, ``derived``):
    two of the six sources are 8-bit, so a head that has not seen one of them learns 8-bit
    data from the copies. A copy belongs to its image's source: leave-one-source-out holds both
    out, and only the originals are judged."""
    if not real.is_dir():
        raise SystemExit(f"real images not found at {real}: run from the project checkout")
    out: list[RealImage] = []
    for p in sorted((real / "transfluor-plate").glob("*.TIF")):
        out.append(RealImage("transfluor", f"transfluor/{p.name}", "transfluor/d2", 0.65, _read(p)))
    for p in sorted((real / "ExampleHuman").glob("*.tif")):
        ch = p.stem[-2:]
        for tag, tile in _tiles(_read(p)):
            out.append(RealImage("ExampleHuman", f"ExampleHuman/{p.name}{tag}", ch, 0.65, tile))
    for p in sorted((real / "bbbc022-cellpainting").glob("*.tif")):
        ch = p.stem.rsplit("_", 1)[-1]
        out.append(
            RealImage("bbbc022-cellpainting", f"bbbc022/{p.name}", f"cp/{ch}", 0.656, _read(p))
        )
    for p in sorted((real / "bbbc022-raw-imagexpress").glob("*.tif")):
        out.append(
            RealImage("bbbc022-raw-imagexpress", f"ixm/{p.name[:17]}", "ixm/w1", 0.656, _read(p))
        )
    for p in sorted((real / "jump-pilot-phenix").glob("*.tiff")):
        ch = p.stem.split("-")[1][:3]
        for tag, tile in _tiles(_read(p)):
            out.append(
                RealImage("jump-pilot-phenix", f"jump/{p.name}{tag}", f"jump/{ch}", 0.598, tile)
            )
    for p in sorted((real / "speckles").glob("*.tif")):
        for tag, tile in _tiles(_read(p)):
            out.append(RealImage("speckles", f"speckles/{p.name}{tag}", p.stem, 0.65, tile))
    if eight_bit_copies:
        out += [
            RealImage(
                it.source,
                f"{it.name}@8bit",
                f"{it.group}@8bit",
                it.pixel_um,
                eight_bit(it.image),
                True,
            )
            for it in out
            if it.image.dtype != np.uint8
        ]
    return out


def _seed(*parts: Any) -> int:
    digest = hashlib.sha1("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


EVAL_DRAWS = 2  # extra draws of every recipe per image, for the evaluation only (kind "eval:…")


def variants_of(item: RealImage) -> Iterator[tuple[str, str, int, np.ndarray]]:
    """(kind, qc_class, severity, image) of one real image: as it is, sparse, every artefact
    recipe at a severity 2–5, the autofocus-failure defocus (seeded by the image's name), then
    :data:`EVAL_DRAWS` more draws of every recipe (kind ``eval:<recipe>``; never trained on:
    ``benchmarks/eval_qc.py`` judges held-out sources on more artefacts than one per recipe)."""
    from napari_cellmae.qc.artefacts import ARTEFACTS, apply_artefact, sparse_field

    rng = np.random.default_rng(_seed(item.name))
    yield "ok", "ok", 0, item.image
    keep = float(rng.uniform(*SPARSE_KEEP))
    yield "sparse", "ok", 0, sparse_field(item.image, keep, seed=int(rng.integers(2**31)))
    for kind, recipe in ARTEFACTS.items():
        sev = int(rng.choice(TRAIN_SEVERITIES))
        seed = int(rng.integers(2**31))
        spoilt = apply_artefact(item.image, kind, sev, seed=seed, pixel_um=item.pixel_um)
        yield kind, recipe.qc_class, sev, spoilt
    sev = int(rng.choice(AUTOFOCUS_SEVERITIES))
    spoilt = apply_artefact(item.image, "defocus", sev, seed=0, pixel_um=item.pixel_um)
    yield "autofocus", "blur", sev, spoilt
    rng = np.random.default_rng(_seed(item.name, "eval"))
    for _ in range(EVAL_DRAWS):
        for kind, recipe in ARTEFACTS.items():
            sev = int(rng.choice(TRAIN_SEVERITIES))
            seed = int(rng.integers(2**31))
            spoilt = apply_artefact(item.image, kind, sev, seed=seed, pixel_um=item.pixel_um)
            yield f"eval:{kind}", recipe.qc_class, sev, spoilt


def _code_key(*texts: str) -> str:
    return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:8]


def _recipes_key() -> str:
    """Changes when the variants would: the artefact recipes' code and this script's sampling."""
    import inspect

    import napari_cellmae.qc.artefacts as artefacts

    return _code_key(
        Path(artefacts.__file__).read_text(),
        inspect.getsource(variants_of),
        repr((TRAIN_SEVERITIES, AUTOFOCUS_SEVERITIES, SPARSE_KEEP, EVAL_DRAWS)),
    )


def _measure_key() -> str:
    """Changes when the measurements would: the metrics' and cues' code."""
    import napari_cellmae.qc.cues as cues
    import napari_cellmae.qc.metrics as metrics

    return _code_key(Path(metrics.__file__).read_text(), Path(cues.__file__).read_text())


def _save(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _table_arrays(table: Any) -> dict[str, np.ndarray]:
    """Text columns as unicode arrays: the cache is read without pickle."""
    from pandas.api.types import is_numeric_dtype

    out = {}
    for c in table.columns:
        col = table[c]
        out[f"t_{c}"] = (
            col.to_numpy() if is_numeric_dtype(col) else np.array(col.astype(str).tolist(), str)
        )
    return out


def feature_table(
    model: Any,
    block: int | None,
    items: list[RealImage],
    progress: bool = True,
    sources: tuple[str, ...] = SOURCES,
) -> tuple[Any, np.ndarray]:
    """(table, embeddings) of every variant of ``items``: one row per variant with ``source``,
    ``name``, ``group``, ``kind``, ``qc_class``, ``severity`` and the ``QC_`` metrics and cues
    (scale 20); embeddings (N, D) of each variant alone.

    Cached per source under :data:`CACHE`: the embeddings keyed by the encoder's checksum, the
    block and the variants (:func:`_recipes_key`), the measurements by the variants and the
    metrics' code (:func:`_measure_key`), so a change of the metrics re-measures (a minute)
    without re-embedding. Sources can be built in parallel processes (``--cache-only
    --sources``)."""
    import pandas as pd

    from napari_cellmae.qc.head import embed_images
    from napari_cellmae.qc.metrics import measure

    block = int(block or model.default_block or model.depth)
    folder = CACHE / f"{str(model.checksum)[:16]}-block{block}"
    folder.mkdir(parents=True, exist_ok=True)
    tables, embs = [], []
    for source, derived in ((s, d) for s in sources for d in (False, True)):
        chosen = [it for it in items if it.source == source and it.derived == derived]
        if not chosen:
            continue
        key = hashlib.sha1("|".join(it.name for it in chosen).encode()).hexdigest()[:12]
        stem = f"{source}{'@8bit' if derived else ''}-{key}-{_recipes_key()}"
        emb_path = folder / f"{stem}-emb.npz"
        metrics_path = CACHE / "metrics" / f"{stem}-{_measure_key()}.npz"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        have_emb, have_metrics = emb_path.is_file(), metrics_path.is_file()
        if not (have_emb and have_metrics):
            rows, parts = [], []
            t0 = time.monotonic()
            for i, item in enumerate(chosen):
                batch = list(variants_of(item))
                if item.derived:  # trained on, never judged: the training variants only
                    batch = [b for b in batch if training_kind(b[0])]
                for kind, cls, sev, image in batch:
                    row = {
                        "source": item.source,
                        "name": item.name,
                        "group": item.group,
                        "kind": kind,
                        "qc_class": cls,
                        "severity": sev,
                    }
                    if not have_metrics:
                        row.update(
                            {f"QC_{k}": float(v[0]) for k, v in measure(image, (20,)).items()}
                        )
                    rows.append(row)
                if not have_emb:
                    parts.append(embed_images(model, [b[3] for b in batch], block))
                if progress:
                    what = "measured" if have_emb else "embedded"
                    print(
                        f"  {source}: {i + 1}/{len(chosen)} images {what} "
                        f"({time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
            built = pd.DataFrame(rows)
            if not have_emb:
                _save(emb_path, emb=np.concatenate(parts).astype(np.float32))
            if not have_metrics:
                _save(metrics_path, **_table_arrays(built))
        with np.load(metrics_path, allow_pickle=False) as npz:
            table = pd.DataFrame({k[2:]: npz[k] for k in npz.files if k.startswith("t_")})
        with np.load(emb_path, allow_pickle=False) as npz:
            emb = npz["emb"]
        if len(emb) != len(table):
            raise SystemExit(f"cache {emb_path} does not match {metrics_path}: delete both")
        table["derived"] = derived
        tables.append(table)
        embs.append(emb)
    return pd.concat(tables, ignore_index=True), np.concatenate(embs)


def head_spec(model: Any, block: int | None):
    from napari_cellmae.qc.head import FeatureSpec

    block = int(block or model.default_block or model.depth)
    return FeatureSpec(
        metric_features=HEAD_METRICS,
        scale=20,
        embed_dim=int(model.embed_dim),
        block=block,
        relative=False,
        z_features=(),
    )


def features(table: Any, emb: np.ndarray, spec: Any, reference: Any = None) -> np.ndarray:
    """Head features of the rows of a :func:`feature_table`; a head with plate-relative
    features takes them within each ``group`` against the ``reference`` rows (default: the
    clean originals, as in training; QC time: every image of the plate)."""
    from napari_cellmae.qc.head import metric_features, with_relative

    x = metric_features(table, spec)
    if spec.uses_encoder:
        x = np.concatenate([x, emb[:, : spec.embed_dim]], axis=1)
    if reference is None:
        reference = (table["kind"] == "ok").to_numpy()
    return with_relative(x, spec, list(table["group"]), reference)


def training_kind(kind: str) -> bool:
    """Whether a head learns from variants of this kind: all but the autofocus scenario's
    defocus and the evaluation draws."""
    return kind != "autofocus" and not kind.startswith("eval:")


def training_rows(table: Any) -> np.ndarray:
    """The rows a head learns from (:func:`training_kind`)."""
    return np.array([training_kind(str(k)) for k in table["kind"]], bool)


def fit_default_head(
    table: Any, emb: np.ndarray, spec: Any, encoder: Any, ok_prior: float = OK_PRIOR, **training
):
    """A head fitted on the training rows of ``table``."""
    from napari_cellmae.qc.head import fit_head

    rows = training_rows(table)
    x = features(table, emb, spec)[rows]
    y = table["qc_class"].to_numpy()[rows]
    return fit_head(x, y, spec, encoder, training=training, ok_prior=ok_prior), x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="encoder source (default: bundled)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="head file (.npz)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--block",
        type=int,
        default=4,
        help="encoder block of the embedding features (the shipped head uses 4)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)"
    )
    parser.add_argument("--ok-prior", type=float, default=OK_PRIOR, help="share of weight on ok")
    parser.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated sources to cache (with --cache-only: run one process per share)",
    )
    parser.add_argument(
        "--cache-only", action="store_true", help="build the feature cache of --sources and stop"
    )
    args = parser.parse_args(argv)
    sources = tuple(s for s in args.sources.split(",") if s)
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        parser.error(f"unknown sources {unknown}: choose from {', '.join(SOURCES)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from napari_cellmae import load_model
    from napari_cellmae.qc.head import CLASSES, encoder_info

    model = load_model(args.model, device=args.device, encoder_only=True)
    items = real_sources()
    print(f"encoder {model.name} ({model.checksum[:12]}), {len(items)} real images")
    t0 = time.monotonic()
    if args.cache_only:
        feature_table(model, args.block, items, sources=sources)
        print(f"cached {', '.join(sources)} in {time.monotonic() - t0:.0f} s")
        return 0
    table, emb = feature_table(model, args.block, items)
    spec = head_spec(model, args.block)
    rows = training_rows(table)
    head, x, y = fit_default_head(
        table,
        emb,
        spec,
        encoder_info(model),
        ok_prior=args.ok_prior,
        sources=list(SOURCES),
        n_real_images=len(items),
        variants={k: int(v) for k, v in table[rows]["kind"].value_counts().items()},
        severities=list(TRAIN_SEVERITIES),
        script="scripts/train_qc_head.py",
        model_source=str(args.model or "bundled default"),
    )
    predicted = np.asarray(CLASSES)[head.predict_proba(x).argmax(axis=1)]
    print(f"training accuracy {np.mean(predicted == y):.3f} on {len(y)} images")
    head.save(args.out)
    size_kib = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({size_kib:.0f} KiB) in {time.monotonic() - t0:.0f} s")
    print(head.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
