"""Profiling: alignment math on hand-made matrices, metrics on known structure (copairs, checked
against copairs and a hand count), a synthetic screen embedded with its platemap and profiled
(model vs baseline), the pycytominer round trip, the platemap reader and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellmae.profiling import (
    aggregate,
    align,
    baseline_pca,
    center_scale,
    cosine_similarity,
    evaluate,
    held_out_consistency,
    pairs_from_column,
    pca_on_controls,
    phenotypic_activity,
    phenotypic_consistency,
    read_platemap,
    relationship_recall,
    replicate_consistency,
    replicate_retrieval,
    tvn,
)
from napari_cellmae.progress import run


# -- alignment math -------------------------------------------------------------------------------
def test_center_scale_uses_each_batchs_controls():
    x = np.array([[1.0, 10], [3, 14], [5, 0], [10, 100], [30, 140], [50, 0]])
    controls = np.array([True, True, False, True, True, False])
    batches = np.array(["a", "a", "a", "b", "b", "b"])
    out = center_scale(x, controls, batches)
    # batch a controls: mean (2, 12), std (1, 2); batch b: mean (20, 120), std (10, 20)
    np.testing.assert_allclose(out, [[-1, -1], [1, 1], [3, -6], [-1, -1], [1, 1], [3, -6]])
    # a constant feature among the controls is only centred, not divided by zero
    flat = center_scale(np.array([[2.0], [2.0], [5.0]]), np.array([1, 1, 0], bool), np.zeros(3))
    np.testing.assert_allclose(flat[:, 0], [0, 0, 3])
    with pytest.raises(ValueError, match="batch 'b' has no control wells"):
        center_scale(x, controls & (batches == "a"), batches)


def test_pca_on_controls_keeps_the_controls_rank():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6))
    controls = np.zeros(20, bool)
    controls[:4] = True
    z = pca_on_controls(x, controls)
    assert z.shape == (20, 3)  # 4 controls span 3 dimensions around their mean
    np.testing.assert_allclose(z[controls].mean(axis=0), 0, atol=1e-12)
    # distances within the control subspace are kept
    c = x[controls] - x[controls].mean(axis=0)
    np.testing.assert_allclose(z[controls] @ z[controls].T, c @ c.T, atol=1e-10)


def test_tvn_matches_the_efaar_formula():
    from scipy.linalg import fractional_matrix_power
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    n, d = 60, 5
    batches = np.repeat(["p1", "p2"], n // 2)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    x[batches == "p2"] = x[batches == "p2"] * 3 + 7  # a batch effect
    controls = np.tile(np.arange(n // 2) < 12, 2)
    got = tvn(x, controls, batches)

    # the written-out recipe: PCA fit on controls, StandardScaler on each batch's controls,
    # then x_b @ (cov(controls_b) + 0.5 I)^(-1/2)
    want = PCA().fit(x[controls]).transform(x)
    for b in ("p1", "p2"):
        rows = batches == b
        want[rows] = StandardScaler().fit(want[rows & controls]).transform(want[rows])
    for b in ("p1", "p2"):
        rows = batches == b
        cov = np.cov(want[rows & controls], rowvar=False, ddof=1) + 0.5 * np.eye(d)
        want[rows] = want[rows] @ np.real(fractional_matrix_power(cov, -0.5))
    # PCA axes have arbitrary signs: compare what does not depend on them
    np.testing.assert_allclose(got @ got.T, want @ want.T, atol=1e-8)
    np.testing.assert_allclose(np.abs(got), np.abs(want), atol=1e-8)
    # after TVN each batch's controls have covariance C (C + 0.5 I)^-1: eigenvalues below 1
    for b in ("p1", "p2"):
        ctrl = got[(batches == b) & controls]
        eig = np.linalg.eigvalsh(np.cov(ctrl, rowvar=False))
        assert eig.max() < 1


def test_align_dispatch_and_unknown_method():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4))
    controls = np.arange(12) % 3 == 0
    batches = np.repeat([0, 1], 6)
    assert align(x, controls, batches, "none").shape == (12, 4)
    np.testing.assert_allclose(
        align(x, controls, batches, "pca-cs"),
        center_scale(pca_on_controls(x, controls), controls, batches),
    )
    with pytest.raises(ValueError, match="choose one of none, center-scale, pca-cs, tvn"):
        align(x, controls, batches, "combat")


# -- metrics on known structure -------------------------------------------------------------------
def _ap_by_hand(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ranking ``scores`` (high first) for the boolean ``positive``."""
    hits = positive[np.argsort(-scores, kind="stable")]
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks)) if len(ranks) else np.nan


def test_ap_by_hand_is_right():
    assert _ap_by_hand(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1], bool)) == (
        pytest.approx((1 + 2 / 3) / 2)
    )
    assert _ap_by_hand(np.array([0.1, 0.9]), np.array([1, 0], bool)) == 0.5


def _structured(seed: int = 0, noise: float = 0.3, shuffle: bool = False):
    """3 mechanisms × 3 perturbations × 4 replicates (2 per plate) + 16 controls (8 per plate)
    in 64 dimensions. Returns (x, meta)."""
    rng = np.random.default_rng(seed)
    d = 64
    mech = rng.normal(size=(3, d))
    rows, labels, moas, plates = [], [], [], []
    for m in range(3):
        for p in range(3):
            own = mech[m] + 0.6 * rng.normal(size=d)
            for r in range(4):
                rows.append(own + noise * rng.normal(size=d))
                labels.append(f"P{m}{p}")
                moas.append(f"M{m}")
                plates.append(f"plate{r % 2}")
    for r in range(16):
        rows.append(noise * rng.normal(size=d))
        labels.append("DMSO")
        moas.append("control")
        plates.append(f"plate{r % 2}")
    x = np.array(rows)
    if shuffle:  # destroy the structure: every well gets a random vector
        x = rng.normal(size=x.shape)
    meta = pd.DataFrame(
        {
            "Metadata_Plate": plates,
            "Metadata_Perturbation": labels,
            "Metadata_IsControl": np.array(labels) == "DMSO",
            "Metadata_Mechanism": moas,
        }
    )
    return x, meta


def test_metrics_see_replicates_and_relationships():
    x, meta = _structured()
    labels, controls = (
        meta["Metadata_Perturbation"].to_numpy(),
        meta["Metadata_IsControl"].to_numpy(),
    )
    batches = meta["Metadata_Plate"].to_numpy()
    consistency = held_out_consistency(x, labels, controls, batches, "none", n_null=200)
    assert consistency["consistent"].all() and (consistency["p_value"] < 0.01).all()
    _, retrieval = replicate_retrieval(x, meta)
    assert retrieval["mAP"].min() > 0.9
    # a query's 2 replicates on the other plate among 8·4 wells of other perturbations and 16
    # controls (its own plate's replicate is neither positive nor negative)
    np.testing.assert_allclose(retrieval["chance"], 2 / (2 + 32 + 16))
    activity = phenotypic_activity(x, meta, null_size=2000)
    assert activity["active"].all() and (activity["corrected_p_value"] < 0.01).all()
    names, profiles = aggregate(x[~controls], labels[~controls])
    assert names == [f"P{m}{p}" for m in range(3) for p in range(3)]
    groups = phenotypic_consistency(
        profiles, names, [n[1] for n in names], "Metadata_Mechanism", null_size=2000
    )
    assert groups["retrieved"].all() and groups["mAP"].min() > 0.9
    np.testing.assert_allclose(groups["chance"], 2 / 8)
    sim = cosine_similarity(profiles)
    pairs = pairs_from_column(meta, "Metadata_Mechanism")
    assert len(pairs) == 9 and ("P00", "P01") in pairs
    summary, table = relationship_recall(sim, names, pairs)
    assert summary["mean_cosine_related"] > summary["mean_cosine_unrelated"] + 0.3
    # 36 pairs: the top 5% holds 2 of them, both related
    assert table["recalled"].sum() == 2 and summary["recall"] == pytest.approx(2 / 9)
    assert summary["n_pairs"] == 9


def test_metrics_stay_at_chance_without_structure():
    x, meta = _structured(shuffle=True)
    labels, controls = (
        meta["Metadata_Perturbation"].to_numpy(),
        meta["Metadata_IsControl"].to_numpy(),
    )
    batches = meta["Metadata_Plate"].to_numpy()
    consistency = held_out_consistency(x, labels, controls, batches, "center-scale", n_null=500)
    assert consistency["consistent"].mean() <= 0.34
    _, retrieval = replicate_retrieval(x, meta)
    assert retrieval["mAP"].mean() < 0.25
    activity = phenotypic_activity(x, meta, null_size=2000)
    assert activity["active"].mean() <= 0.12


def test_replicate_retrieval_equals_copairs_and_a_hand_count():
    """Our replicate mAP is copairs' (called here as its docs show) and a by-hand count: other-
    plate replicates are the positives, same-plate replicates are left out of the ranking;
    with same_plate=True every replicate is a positive and every other well a candidate."""
    from copairs.map import average_precision

    x, meta = _structured(noise=1.2)
    _, ours = replicate_retrieval(x, meta)
    theirs = average_precision(
        meta,
        x,
        pos_sameby=["Metadata_Perturbation"],
        pos_diffby=["Metadata_Plate"],
        neg_sameby=[],
        neg_diffby=["Metadata_Perturbation"],
        progress_bar=False,
    )
    theirs = theirs[~theirs["Metadata_IsControl"]].groupby("Metadata_Perturbation")
    np.testing.assert_allclose(
        ours.set_index("Metadata_Perturbation")["mAP"],
        theirs["average_precision"].mean().loc[ours["Metadata_Perturbation"]],
        rtol=0,
        atol=1e-12,
    )
    sims = cosine_similarity(x)
    labels, plates = meta["Metadata_Perturbation"].to_numpy(), meta["Metadata_Plate"].to_numpy()
    for same_plate in (False, True):
        _, table = replicate_retrieval(x, meta, same_plate=same_plate)
        for name, got in zip(table["Metadata_Perturbation"], table["mAP"]):
            aps = []
            for q in np.flatnonzero(labels == name):
                positive = (labels == name) & (np.arange(len(labels)) != q)
                if not same_plate:
                    positive &= plates != plates[q]
                candidates = positive | (labels != name)
                aps.append(_ap_by_hand(sims[q, candidates], positive[candidates]))
            assert got == pytest.approx(np.mean(aps), abs=1e-12), (name, same_plate)
    # other-plate replicates are harder to find than any replicate: the plate effect helped
    assert ours["mAP"].mean() < replicate_retrieval(x, meta, same_plate=True)[1]["mAP"].mean()


def test_activity_p_values_are_copairs_with_benjamini_hochberg():
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import assign_reference_index
    from scipy.stats import false_discovery_control

    x, meta = _structured(noise=2.0, seed=4)
    ours = phenotypic_activity(x, meta, null_size=2000, seed=3).set_index("Metadata_Perturbation")
    ref = assign_reference_index(meta, "Metadata_IsControl", reference_col="ref")
    ap = average_precision(
        ref,
        x,
        pos_sameby=["Metadata_Perturbation", "ref"],
        pos_diffby=["Metadata_Plate"],
        neg_sameby=[],
        neg_diffby=["Metadata_Perturbation", "ref"],
        progress_bar=False,
    )
    ap = ap[~ap["Metadata_IsControl"]]
    theirs = mean_average_precision(
        ap, ["Metadata_Perturbation"], null_size=2000, threshold=0.05, seed=3, progress_bar=False
    ).set_index("Metadata_Perturbation")
    theirs = theirs.loc[ours.index]
    np.testing.assert_allclose(ours["mAP"], theirs["mean_average_precision"], atol=1e-12)
    np.testing.assert_allclose(ours["p_value"], theirs["p_value"], atol=1e-12)
    bh = false_discovery_control(ours["p_value"].to_numpy(float), method="bh")
    np.testing.assert_allclose(ours["corrected_p_value"], bh, rtol=1e-9)
    assert (ours["active"] == (bh < 0.05)).all()
    assert 0 < ours["active"].mean() < 1  # noisy enough that not every perturbation is found


def test_replicates_on_one_plate_each_fall_back_to_same_plate_positives():
    x, meta = _structured()
    # each perturbation's 4 replicates on one plate (the plate of its mechanism)
    meta["Metadata_Plate"] = np.where(
        meta["Metadata_IsControl"], meta["Metadata_Plate"], meta["Metadata_Mechanism"]
    )
    wells, table = replicate_retrieval(x, meta)  # nothing to find on other plates: no error
    assert wells.empty and table.empty
    meta["Metadata_Batch"] = "one batch"  # the plates of perturbations hold no controls
    ev = evaluate(x, meta, "none", batch_column="Metadata_Batch", null_size=500, n_null=50)
    assert ev.metrics["same_plate"] == 1.0 and ev.metrics["replicate_map"] > 0.9


def _no_phenotype_screen(seed: int, n_ctrl: int, n_pert: int = 20, reps: int = 3):
    """Two plates with their own offsets; perturbations drawn like the controls (no phenotype)."""
    rng = np.random.default_rng(seed)
    rows, labels, plates = [], [], []
    for plate in ("p1", "p2"):
        offset = rng.normal(size=16) * 3  # a plate effect, removed by the alignment
        for i in range(n_ctrl + n_pert * reps):
            rows.append(offset + rng.normal(size=16))
            labels.append("DMSO" if i < n_ctrl else f"P{(i - n_ctrl) // reps}")
            plates.append(plate)
    labels = np.array(labels)
    return np.array(rows), labels, labels == "DMSO", np.array(plates)


def test_replicate_consistency_null_is_honest():
    """Controls the alignment was fit on look unlike each other by construction (their mean was
    subtracted): a null drawn from them sits too low and passes perturbations without any
    phenotype. Held-out controls do not; too few of them give no null rather than a bad one."""
    old, new = [], []
    for seed in range(5):
        x, labels, controls, plates = _no_phenotype_screen(seed, n_ctrl=12)
        aligned = align(x, controls, plates, "center-scale")
        old.append(replicate_consistency(aligned, labels, controls, n_null=300))
        new.append(held_out_consistency(x, labels, controls, plates, "center-scale", n_null=300))
    old, new = pd.concat(old), pd.concat(new)
    assert old["consistent"].mean() > 0.2  # 5% expected
    assert new["consistent"].mean() <= 0.1
    assert new["null_threshold"].mean() > old["null_threshold"].mean() + 0.05
    # 6 controls per plate: 3 held out, 3 replicates per plate -> one possible control set
    x, labels, controls, plates = _no_phenotype_screen(0, n_ctrl=6)
    few = held_out_consistency(x, labels, controls, plates, "center-scale")
    assert few["null_threshold"].isna().all() and not few["consistent"].any()
    aligned = align(x, controls, plates, "center-scale")
    assert replicate_consistency(aligned, labels, controls)["consistent"].mean() > 0.5


def test_relationship_recall_by_hand():
    names = ["a", "b", "c", "d"]
    sim = np.array(
        [[1, 0.9, 0.1, -0.8], [0.9, 1, 0.2, 0.0], [0.1, 0.2, 1, 0.3], [-0.8, 0.0, 0.3, 1]]
    )
    # 6 pairwise cosines: -0.8, 0, 0.1, 0.2, 0.3, 0.9 -> 5%/95% quantiles -0.6 / 0.75
    summary, table = relationship_recall(
        sim, names, [("a", "b"), ("d", "a"), ("b", "c"), ("x", "a")]
    )
    assert table["recalled"].tolist() == [True, True, False]
    assert summary["recall"] == pytest.approx(2 / 3) and summary["n_pairs_given"] == 4
    assert summary["threshold_high"] == pytest.approx(0.75)


def test_baseline_pca_drops_constant_statistics():
    rng = np.random.default_rng(3)
    feats = np.c_[rng.normal(size=(10, 5)), np.full(10, 7.0)]
    z = baseline_pca(feats)
    assert z.shape == (10, 5)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)


# -- platemaps ------------------------------------------------------------------------------------
def test_read_platemap_loose_names_and_controls(tmp_path):
    path = tmp_path / "layout.csv"
    path.write_text("plate,Well,treatment,is_control,dose\nP1,A1,DMSO,TRUE,0\nP1,b12,X,no,1\n")
    pm = read_platemap(path)
    assert pm.columns.tolist() == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Perturbation",
        "Metadata_IsControl",
        "Metadata_dose",
    ]
    assert pm["Metadata_Well"].tolist() == ["A01", "B12"]
    assert pm["Metadata_IsControl"].tolist() == [True, False]
    tsv = tmp_path / "layout.tsv"
    tsv.write_text("well\tcompound\nA01\tDMSO\nA02\tX\n")
    assert read_platemap(tsv, controls=["DMSO"])["Metadata_IsControl"].tolist() == [True, False]
    with pytest.raises(ValueError, match="does not say which wells are controls.*--control"):
        read_platemap(tsv)
    with pytest.raises(ValueError, match="no perturbation column"):
        read_platemap(pd.DataFrame({"well": ["A01"]}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_platemap(tmp_path / "missing.csv")


# -- a synthetic screen, embedded and profiled ----------------------------------------------------
@pytest.fixture(scope="module")
def screen(tmp_path_factory, test_model_dir):
    from napari_cellmae.embed import EmbedConfig, embed_plates
    from napari_cellmae.synthetic import make_screen

    root = tmp_path_factory.mktemp("screen")
    make_screen(
        root, n_plates=2, perturbations=6, replicates=2, controls=8, n_channels=3, size=256, seed=0
    )
    plates = sorted(p for p in root.iterdir() if p.is_dir())
    config = EmbedConfig(
        model=str(test_model_dir),
        device="cpu",
        precision="fp32",
        batch_size=8,
        platemap=str(root / "platemap.csv"),
    )
    run(embed_plates(plates, root / "emb", config))
    return root


def test_embed_joins_the_platemap_into_every_table(screen):
    from napari_cellmae.embed import read_table

    pm = pd.read_csv(screen / "platemap.csv")
    for level in ("crops", "fields", "wells", "features"):
        table = read_table(screen / "emb", level)
        for column in ("Metadata_Perturbation", "Metadata_IsControl", "Metadata_Mechanism"):
            assert column in table, (level, column)
        assert table["Metadata_IsControl"].dtype == bool
        keys = ["Metadata_Plate", "Metadata_Well"]
        got = table[[*keys, "Metadata_Perturbation", "Metadata_Mechanism"]].drop_duplicates()
        want = got[keys].merge(pm, on=keys)[got.columns]
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
        if level != "features":
            assert {"Metadata_Row", "Metadata_Col"} <= set(table.columns), level
    wells = pd.read_csv(screen / "emb" / "wells.csv")
    assert wells["Metadata_IsControl"].sum() == 2 * 8
    record = json.loads((screen / "emb" / "config.json").read_text())
    assert record["platemap"]["wells_unannotated"] == []


def test_screen_report_model_vs_baseline(screen, tmp_path):
    from napari_cellmae.profiling import profile_report

    report = run(
        profile_report(
            screen / "emb",
            screen / "platemap.csv",
            tmp_path,
            method="center-scale",
            relationship_column="Metadata_Mechanism",
            n_null=300,
            null_size=2000,
        )
    )
    metrics = report.metrics.set_index("metric")
    # the baseline statistics see the synthetic phenotypes: replicates on the other plate find
    # each other, perturbations stand out from controls, and perturbations of one mechanism
    # resemble each other more than the others
    base = metrics["baseline"]
    assert base["replicate_map"] > 2 * metrics.loc["replicate_map", "chance"]
    assert base["activity_map"] > 2 * metrics.loc["activity_map", "chance"]
    assert base["consistency_map"] > metrics.loc["consistency_map", "chance"]
    # 6 perturbations × 4 wells on 256² fields: too few to pass Benjamini-Hochberg or the
    # held-out control null reliably; the fractions are computed, whatever they are
    for key in ("activity_fraction", "consistency_fraction", "replicate_consistency"):
        assert 0 <= base[key] <= 1, key
    assert base["relationship_mean_cosine_related"] > base["relationship_mean_cosine_unrelated"]
    assert "replicates on other plates" in metrics.loc["replicate_map", "description"]
    # the random-weight test model gets the same metrics, whatever they are
    assert np.isfinite(metrics["model"].to_numpy(float)).all()
    assert len(report.wells) == 2 * (6 * 2 + 8) and report.model.names == report.baseline.names
    for name in (
        "report.md",
        "metrics.csv",
        "replicates_model.csv",
        "replicates_baseline.csv",
        "consistency_model.csv",
        "similarity_model.csv",
        "pairs_baseline.csv",
        "profiles_model.parquet",
        "aligned_baseline.parquet",
        "config.json",
    ):
        assert (tmp_path / name).is_file(), name
    text = (tmp_path / "report.md").read_text()
    assert "| Replicate retrieval mAP (positives: replicates on other plates) |" in text
    assert "Phenotypic activity" in text and "center-scale" in text
    sim = pd.read_csv(tmp_path / "similarity_model.csv", index_col=0)
    assert sim.shape == (6, 6) and np.allclose(np.diag(sim), 1)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["alignment"] == "center-scale" and record["replicate_positives"] == "other-plates"
    replicates = pd.read_csv(tmp_path / "replicates_baseline.csv")
    assert {"mAP", "activity_p_value", "activity_corrected_p_value", "null_threshold"} <= set(
        replicates.columns
    )
    # the annotations `embed --platemap` wrote give the same report without a platemap
    again = run(
        profile_report(
            screen / "emb",
            None,
            tmp_path / "again",
            method="center-scale",
            relationship_column="Mechanism",
            n_null=300,
            null_size=2000,
        )
    )
    pd.testing.assert_frame_equal(again.metrics, report.metrics)


def test_pycytominer_runs_on_our_tables(screen):
    """The recipe of docs/embeddings.md: only the features are named; the platemap columns come
    from `embed --platemap`; per-plate standardisation on controls is our center-scale."""
    pycytominer = pytest.importorskip("pycytominer")
    from napari_cellmae.embed import embedding_columns, read_table

    fields = read_table(screen / "emb", "fields")
    features = embedding_columns(fields)
    strata = [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Row",
        "Metadata_Col",
        "Metadata_Perturbation",
        "Metadata_IsControl",
        "Metadata_Mechanism",
    ]
    wells = pycytominer.aggregate(fields, strata=strata, features=features, operation="mean")
    assert wells.shape == (40, len(strata) + len(features))
    ours = read_table(screen / "emb", "wells").set_index(["Metadata_Plate", "Metadata_Well"])
    np.testing.assert_allclose(
        wells.set_index(["Metadata_Plate", "Metadata_Well"])[features].loc[ours.index],
        ours[features],
        rtol=1e-5,
        atol=1e-6,
    )
    normalized = pd.concat(
        pycytominer.normalize(
            plate,
            features=features,
            samples="Metadata_IsControl == True",
            method="standardize",
        )
        for _, plate in wells.groupby("Metadata_Plate")
    )
    assert normalized.shape == wells.shape
    aligned = align(
        wells[features].to_numpy(np.float64),
        wells["Metadata_IsControl"].to_numpy(bool),
        wells["Metadata_Plate"].to_numpy(),
        "center-scale",
    )
    np.testing.assert_allclose(normalized[features].to_numpy(np.float64), aligned, atol=1e-4)
    selected = pycytominer.feature_select(
        normalized, features=features, operation=["variance_threshold", "correlation_threshold"]
    )
    kept = [c for c in selected.columns if c in features]
    assert len(selected) == len(wells) and 0 < len(kept) <= len(features)
    assert [c for c in selected.columns if c not in features] == strata


def test_screen_tvn_related_above_unrelated_for_the_baseline(screen):
    from napari_cellmae.profiling import load_tables

    _, baseline, _ = run(load_tables(screen / "emb"))
    pm = read_platemap(screen / "platemap.csv")
    meta = baseline[["Metadata_Plate", "Metadata_Well"]].merge(
        pm, on=["Metadata_Plate", "Metadata_Well"]
    )
    x = baseline_pca(baseline.filter(like="feat_").to_numpy())
    ev = evaluate(x, meta, "tvn", pairs=pairs_from_column(pm, "Metadata_Mechanism"), n_null=300)
    m = ev.metrics
    assert m["relationship_mean_cosine_related"] > m["relationship_mean_cosine_unrelated"]
    assert m["replicate_map"] > 2 * m["replicate_map_chance"]


def test_missing_statistics_are_computed_from_the_plates(screen, test_model_dir, tmp_path):
    from napari_cellmae.embed import EmbedConfig, embed_plates
    from napari_cellmae.profiling import load_tables

    config = EmbedConfig(
        model=str(test_model_dir), precision="fp32", features=False, levels=("well",)
    )
    run(embed_plates(screen / "SCREEN-1", tmp_path, config))
    assert not (tmp_path / "features.parquet").exists()
    events = []
    _, baseline, _ = run(load_tables(tmp_path), events.append)
    _, want, _ = run(load_tables(screen / "emb"))
    want = want[want["Metadata_Plate"] == "SCREEN-1"]
    assert events[-1].done == events[-1].total == 20
    np.testing.assert_allclose(baseline.filter(like="feat_"), want.filter(like="feat_"), rtol=1e-5)


def test_cli_profile(screen, tmp_path, capsys):
    from napari_cellmae.cli import main

    pairs = tmp_path / "pairs.csv"
    pm = read_platemap(screen / "platemap.csv")
    pd.DataFrame(pairs_from_column(pm, "Metadata_Mechanism"), columns=["a", "b"]).to_csv(
        pairs, index=False
    )
    argv = [
        "profile",
        str(screen / "emb"),
        "--platemap",
        str(screen / "platemap.csv"),
        "--pairs",
        str(pairs),
        "--align",
        "pca-cs",
        "--out",
        str(tmp_path / "r"),
        "--null-size",
        "200",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "replicate_map" in out and "relationship_recall" in out and "report.md" in out
    assert "NaN" not in out and "–" in out  # a metric without a chance level, as in report.md
    assert main(["profile", str(tmp_path / "nothing"), "--platemap", "x.csv", "--out", "r"]) == 2
    assert "is not an embedding folder" in capsys.readouterr().err
    # the annotations of `embed --platemap`, positives on any plate, copairs' metrics named
    argv = ["profile", str(screen / "emb"), "--relationship-column", "Metadata_Mechanism"]
    argv += ["--same-plate-replicates", "--permutations", "500", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "activity_fraction" in out and "consistency_map" in out
    record = json.loads((tmp_path / "s" / "config.json").read_text())
    assert record["replicate_positives"] == "same-plate" and record["null_size"] == 500


def test_cli_embed_platemap_is_checked_before_embedding(screen, test_model_dir, tmp_path, capsys):
    from napari_cellmae.cli import main

    pm = pd.read_csv(screen / "platemap.csv")
    pm["Metadata_Plate"] = "OTHER-" + pm["Metadata_Plate"]
    pm.to_csv(tmp_path / "other.csv", index=False)
    argv = ["embed", str(screen / "SCREEN-1"), "--out", str(tmp_path / "emb")]
    argv += ["--model", str(test_model_dir), "--platemap", str(tmp_path / "other.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "other.csv names none of the 20 wells" in err and "SCREEN-1" in err
    assert not (tmp_path / "emb").exists()  # refused before anything was written
    assert main([*argv[:6], "--control", "DMSO"]) == 2
    assert "give the platemap too" in capsys.readouterr().err


def test_platemap_that_matches_nothing_says_why(screen, tmp_path):
    from napari_cellmae.profiling import profile_report

    pm = read_platemap(screen / "platemap.csv")
    pm["Metadata_Plate"] = "OTHER-" + pm["Metadata_Plate"]
    with pytest.raises(ValueError, match="no profile matches the platemap.*plate names"):
        run(profile_report(screen / "emb", pm, tmp_path))


def test_embedding_folder_path_is_checked(tmp_path):
    from napari_cellmae.profiling import profile_report

    with pytest.raises(FileNotFoundError, match="cellmae embed"):
        run(profile_report(tmp_path, Path("platemap.csv"), tmp_path / "r"))


def test_annotations_by_well_on_every_plate_and_missing_wells_left_empty():
    import pyarrow as pa

    from napari_cellmae.embed_store import _annotate
    from napari_cellmae.profiling import annotate
    from napari_cellmae.profiling.platemap import platemap_annotations

    # no plate column: a well's annotation holds on every plate; B01 is not in the platemap
    pm = read_platemap(
        pd.DataFrame({"well": ["A1", "A2"], "treatment": ["DMSO", "X"], "dose": [0, 5]}),
        controls=["DMSO"],
    )
    table = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1", "P2", "P2"],
            "Metadata_Well": ["A02", "B01", "A01", "A02"],
            "Metadata_Row": ["A", "B", "A", "A"],
            "emb_0000": [1.0, 2.0, 3.0, 4.0],
        }
    )
    got = annotate(table, pm)
    assert got["Metadata_Perturbation"].tolist()[::2] == ["X", "DMSO"]
    assert pd.isna(got.at[1, "Metadata_Perturbation"]) and got.attrs["n_unannotated"] == 1
    assert str(got["Metadata_IsControl"].dtype) == "boolean"
    assert got["Metadata_Row"].tolist() == ["A", "B", "A", "A"]  # the table keeps its own
    # the Arrow join `embed --platemap` runs per well gives the same rows, in order
    _, columns = platemap_annotations(pm)
    arrow = _annotate(pa.Table.from_pandas(table), pa.Table.from_pandas(columns)).to_pandas()
    assert arrow["emb_0000"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert arrow["Metadata_Perturbation"].tolist()[::2] == ["X", "DMSO"]
    assert arrow["Metadata_dose"].tolist()[2:] == [0, 5]
    # two annotations for one well are refused, naming it
    twice = pd.concat([pm, pm.assign(Metadata_Perturbation="Y")])
    with pytest.raises(ValueError, match="annotates .*A01.* twice"):
        annotate(table, twice)
