"""Calibrate and evaluate the classic QC baseline leave-one-source-out on the real images.

Every source in ``../shared/data/real/`` is a clean "plate" (nothing in it is spoilt): the
transfluor plate (72 fields), BBBC022 Cell Painting (10 fields × 5 stains), raw BBBC022
ImageXpress Hoechst (7 fields), and three one-field sources cut into 2×2 tiles per channel so
that plate statistics exist (ExampleHuman 3 channels, the JUMP pilot Phenix field 3 channels,
speckles 2 channels). Integer images are scaled as the QC run scales them (the TIFF's
MaxSampleValue, else the dtype's range).

For each source S, the baseline's calibration (``napari_cellmae.qc.baseline.fit_calibration``)
is fitted on the clean images of the OTHER sources only, then judged on S:

- clean: how many of S's images (and fields: any channel flagged) the default threshold flags;
- synthetic artefacts: ``--replicates`` copies of each image of S, each clean with probability
  0.6 or spoilt by a random class / recipe / severity 2–5 (``qc.artefacts``), the copies of one
  channel forming one plate; one-vs-rest ROC-AUC of each class's score;
- majority defocus: ``--defocus-fraction`` (0.75) of S's fields defocused through the PSF of
  ``qc.artefacts.defocus_psf`` (z 4–12 µm), the rest left sharp, as one plate: defocused fields
  flagged, sharp fields flagged, ROC-AUC of the field score (defocused above sharp).

The same table is printed first for the rules before this calibration (plate z-scores only,
z > 2, no gates; ``legacy_flags``), and the calibration fitted on ALL sources (the constants of
``DEFAULT_CALIBRATION`` in baseline.py) at the end. About 5 minutes on 2 busy cores (measuring
805 images); ``--cache DIR`` keeps the measured tables for re-runs.

    python benchmarks/calibrate_classic_qc.py                   # LOSO table + fitted constants
    python benchmarks/calibrate_classic_qc.py --replicates 3 --seed 1 --cache /tmp/cal
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
P_OK = 0.6
FIELD = ("source", "field")  # the clean flag rate of the calibration counts fields


def _tiles(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape
    return [image[y : y + h // 2, x : x + w // 2] for y in (0, h // 2) for x in (0, w // 2)]


def load_sources(real: Path = REAL) -> list[dict]:
    """One dict per clean image: source, channel, field, image (native dtype), max_value."""
    import re

    from napari_cellmae.plates import read_image
    from napari_cellmae.qc.metrics import file_max_value

    if not real.is_dir():
        raise SystemExit(f"real images not found at {real}: run from the project checkout")
    rows = []

    def add(source, channel, field, path, image=None):
        image = read_image(path)[0] if image is None else image
        rows.append(
            {
                "source": source,
                "channel": str(channel),
                "field": str(field),
                "image": image,
                "max_value": file_max_value(path),
            }
        )

    for path in sorted((real / "transfluor-plate").glob("*.TIF")):
        add("transfluor", "GFP", path.name.split("_")[-1][:6], path)
    for path in sorted((real / "bbbc022-cellpainting").glob("*.tif")):
        well, site, ch = re.match(r"plate1_(\w+)_site(\d)_(Ch\d)", path.name).groups()
        add("bbbc022-cellpainting", ch, f"{well}s{site}", path)
    for path in sorted((real / "bbbc022-raw-imagexpress").glob("*.tif")):
        add("bbbc022-raw-ixm", "w1", "_".join(path.name.split("_")[1:3]), path)
    tiled = {
        "ExampleHuman": ("ExampleHuman", "*.tif", lambda p: p.stem[-2:]),
        "jump-pilot-phenix": ("jump-phenix", "*.tiff", lambda p: p.name.split("-")[1][:3]),
        "speckles": ("speckles", "*.tif", lambda p: p.stem.split("hr")[-1]),
    }
    for folder, (source, pattern, channel) in tiled.items():
        for path in sorted((real / folder).glob(pattern)):
            for t, tile in enumerate(_tiles(read_image(path)[0])):
                add(source, channel(path), f"tile{t}", path, tile)
    return rows


def measure_table(rows: list[dict]):
    """Metrics of every row (QC_ columns) plus its metadata, as the QC run measures them."""
    import pandas as pd

    from napari_cellmae.qc.metrics import measure

    out = []
    for r in rows:
        values = measure(r["image"], (20,), max_value=r["max_value"])
        meta = {k: v for k, v in r.items() if k not in ("image",)}
        out.append({**meta, **{f"QC_{k}": float(v[0]) for k, v in values.items()}})
    table = pd.DataFrame(out)
    table["Metadata_Plate"] = table["source"]
    table["Metadata_Channel"] = table["channel"]
    return table


def artefact_rows(rows: list[dict], replicates: int, seed: int) -> list[dict]:
    """Copies of each row: clean (p 0.6) or a random class, recipe and severity 2–5."""
    from napari_cellmae.qc.artefacts import ARTEFACTS, QC_CLASSES, apply_artefact, kinds_for_class

    rng = np.random.default_rng(seed)
    out = []
    for rep in range(replicates):
        for r in rows:
            copy = {**r, "field": f"{r['field']}#{rep}", "cls": "ok", "kind": "", "sev": 0}
            if rng.random() >= P_OK:
                cls = str(rng.choice(QC_CLASSES))
                kind = str(rng.choice(kinds_for_class(cls)))
                sev = int(rng.integers(2, 6))
                copy["image"] = apply_artefact(r["image"], kind, sev, seed=int(rng.integers(2**31)))
                assert ARTEFACTS[kind].qc_class == cls
                copy.update(cls=cls, kind=kind, sev=sev)
            out.append(copy)
    return out


def defocus_rows(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """``fraction`` of the fields (all their channels) defocused (z 4–12 µm), the rest sharp."""
    from napari_cellmae.qc.artefacts import apply_artefact

    rng = np.random.default_rng(seed)
    fields = sorted({r["field"] for r in rows})
    n_bad = int(np.ceil(fraction * len(fields)))
    bad = set(rng.permutation(fields)[:n_bad].tolist())
    out = []
    for r in rows:
        copy = {**r, "cls": "ok", "kind": "", "sev": 0}
        if r["field"] in bad:
            sev = int(rng.integers(2, 5))  # z = 4, 7, 12 µm
            copy["image"] = apply_artefact(
                r["image"], "defocus", sev, seed=int(rng.integers(2**31))
            )
            copy.update(cls="blur", kind="defocus", sev=sev)
        out.append(copy)
    return out


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > a negative), ties count half (= ROC-AUC)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def judge_source(clean, spoilt, defocus, cal, legacy: bool = False) -> dict:
    """Clean flags, per-class ROC-AUC and the majority-defocus figures of one source."""
    from napari_cellmae.qc.baseline import BASELINE_CLASSES, baseline_flags

    def flags(table):
        if legacy:
            return legacy_flags(table)
        return baseline_flags(table, cal.z, calibration=cal)

    out = {}
    b = flags(clean)
    out["n"] = len(clean)
    out["flagged"] = int(b["QC_Baseline_Flag"].sum())
    per_field = b["QC_Baseline_Flag"].groupby(clean["field"].to_numpy()).any()
    out["fields"], out["fields_flagged"] = len(per_field), int(per_field.sum())
    out["why"] = b.loc[b["QC_Baseline_Flag"], "QC_Baseline_Class"].value_counts().to_dict()
    b = flags(spoilt)
    cls = spoilt["cls"].to_numpy()
    for c in BASELINE_CLASSES:
        score = b[f"QC_Baseline_{c}"].to_numpy()
        out[f"auc_{c}"] = _auc(score[cls == c], score[cls != c])
    b = flags(defocus)
    blurred = (defocus["cls"] == "blur").to_numpy()
    field = defocus["field"].to_numpy()
    f_flag = b["QC_Baseline_Flag"].groupby(field).any()
    f_score = b["QC_Baseline_Score"].groupby(field).max()
    f_blur = pd.Series(blurred, index=field).groupby(level=0).any()
    out["def_n"], out["def_flagged"] = int(f_blur.sum()), int((f_flag & f_blur).sum())
    out["sharp_n"], out["sharp_flagged"] = int((~f_blur).sum()), int((f_flag & ~f_blur).sum())
    out["def_auc"] = _auc(f_score[f_blur].to_numpy(), f_score[~f_blur].to_numpy())
    sharp_why = b.loc[~blurred & b["QC_Baseline_Flag"].to_numpy(), "QC_Baseline_Class"]
    out["sharp_why"] = sharp_why.value_counts().to_dict()
    return out


class _Rule(NamedTuple):
    qc_class: str
    metric: str
    sign: int


LEGACY_RULES = (  # the rule set of napari-cellmae <= the calibration (baseline.py history)
    _Rule("blur", "PowerLogLogSlope", -1),
    _Rule("blur", "Correlation_20", +1),
    _Rule("blur", "FocusScore", -1),
    _Rule("noise", "PowerLogLogSlope", +1),
    _Rule("saturation", "PercentMaximal", +1),
    _Rule("empty", "MeanIntensity", -1),
    _Rule("empty", "StdIntensity", -1),
    _Rule("debris", "MaxIntensity", +1),
    _Rule("background", "LowerQuartileIntensity", +1),
    _Rule("background", "LocalFocusScore_20", +1),
)


def legacy_flags(table):
    """The rule set before calibration: plain plate z-scores (median/MAD; PercentMaximal
    mean/SD), no gates, no floors, z > 2 (how the baseline judged until this script)."""
    from napari_cellmae.qc.baseline import BASELINE_CLASSES, MAD_TO_SD

    cols = {}
    keys = ["Metadata_Plate", "Metadata_Channel"]
    for rule in LEGACY_RULES:
        v = table["QC_" + rule.metric].to_numpy(np.float64)
        z = np.zeros(len(v))
        for rows in table.groupby(keys, sort=False).indices.values():
            x = v[rows]
            if len(x) < 2:
                continue
            if rule.metric == "PercentMaximal":
                c, s = x.mean(), x.std()
            else:
                c = np.median(x)
                s = MAD_TO_SD * np.median(np.abs(x - c)) or x.std()
            z[rows] = rule.sign * (x - c) / s if s > 0 else 0.0
        cols.setdefault(rule.qc_class, []).append(z)
    scores = {f"QC_Baseline_{c}": np.max(cols[c], axis=0) for c in BASELINE_CLASSES}
    out = pd.DataFrame(scores, index=table.index)
    out["QC_Baseline_Score"] = out.max(axis=1)
    out["QC_Baseline_Flag"] = out["QC_Baseline_Score"] > 2
    best = np.argmax(out[[f"QC_Baseline_{c}" for c in BASELINE_CLASSES]].to_numpy(), axis=1)
    out["QC_Baseline_Class"] = np.where(
        out["QC_Baseline_Flag"], np.asarray(BASELINE_CLASSES)[best], "ok"
    )
    return out


def print_table(title: str, results: dict[str, dict]) -> None:
    from napari_cellmae.qc.baseline import BASELINE_CLASSES

    print(f"\n{title}\n")
    head = "| source | images | flagged | rate | fields flagged | "
    head += " | ".join(f"AUC {c}" for c in BASELINE_CLASSES)
    head += " | mean AUC | defocused flagged | sharp flagged | defocus AUC | clean flags by class |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    totals = np.zeros(4)
    for source, r in results.items():
        aucs = [r[f"auc_{c}"] for c in BASELINE_CLASSES]
        print(
            f"| {source} | {r['n']} | {r['flagged']} | {r['flagged'] / r['n']:.1%} | "
            f"{r['fields_flagged']}/{r['fields']} | "
            + " | ".join(f"{a:.3f}" for a in aucs)
            + f" | {np.nanmean(aucs):.3f} | {r['def_flagged']}/{r['def_n']} | "
            f"{r['sharp_flagged']}/{r['sharp_n']} ("
            + ", ".join(f"{k} {v}" for k, v in r["sharp_why"].items())
            + f") | {r['def_auc']:.3f} | "
            + ", ".join(f"{k} {v}" for k, v in r["why"].items())
            + " |"
        )
        totals += [r["n"], r["flagged"], r["fields"], r["fields_flagged"]]
    print(
        f"| **all** | {int(totals[0])} | {int(totals[1])} | {totals[1] / totals[0]:.1%} | "
        f"{int(totals[3])}/{int(totals[2])} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", type=Path, default=REAL)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--defocus-fraction", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None, help="folder for measured tables")
    args = parser.parse_args(argv)
    from napari_cellmae.qc.baseline import fit_calibration

    cached = args.cache is not None and (args.cache / "defocus.parquet").is_file()
    if cached:
        clean = pd.read_parquet(args.cache / "clean.parquet")
        spoilt = pd.read_parquet(args.cache / "spoilt.parquet")
        defocus = pd.read_parquet(args.cache / "defocus.parquet")
        print(f"measured tables from {args.cache}")
    else:
        t0 = time.perf_counter()
        rows = load_sources(args.real)
        clean = measure_table(rows)
        spoilt = measure_table(artefact_rows(rows, args.replicates, args.seed))
        defocus = []
        for source in clean["source"].unique():
            part = [r for r in rows if r["source"] == source]
            defocus.append(measure_table(defocus_rows(part, args.defocus_fraction, args.seed)))
        defocus = pd.concat(defocus, ignore_index=True)
        print(
            f"{len(clean) + len(spoilt) + len(defocus)} images measured in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        if args.cache:
            args.cache.mkdir(parents=True, exist_ok=True)
            for name, table in (("clean", clean), ("spoilt", spoilt), ("defocus", defocus)):
                table.to_parquet(args.cache / f"{name}.parquet")
    sources = list(dict.fromkeys(clean["source"]))
    loso, legacy = {}, {}
    for s in sources:
        cal = fit_calibration(clean[clean["source"] != s], field_by=FIELD)
        parts = [t[t["source"] == s] for t in (clean, spoilt, defocus)]
        loso[s] = judge_source(*parts, cal)
        loso[s]["cal"] = cal
        legacy[s] = judge_source(*parts, cal, legacy=True)
    print_table("Before (plate z-scores only, z > 2):", legacy)
    print_table("Leave-one-source-out (calibration fitted without the source):", loso)
    print("\nLOSO calibrations:")
    for s, r in loso.items():
        print(
            f"  without {s}: z {r['cal'].z}, mostly blurred below {r['cal'].plate_blur_limit}, "
            "gates "
            + ", ".join(
                f"{g.qc_class} {g.metric} {'>' if g.sign > 0 else '<'} {g.limit}"
                for g in r["cal"].gates
            )
        )
    full = fit_calibration(clean, field_by=FIELD)
    print(f"\nFitted on all sources (DEFAULT_CALIBRATION): {full}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
