"""Profiling: alignment math on hand-made matrices, metrics on known structure, a synthetic screen
embedded and profiled (model vs baseline), the platemap reader and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellmae.profile import (
    aggregate,
    align,
    average_precision,
    baseline_pca,
    center_scale,
    cosine_similarity,
    evaluate,
    pairs_from_column,
    pca_on_controls,
    read_platemap,
    relationship_recall,
    replicate_consistency,
    replicate_map,
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
def test_average_precision_by_hand():
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1], bool)) == (
        pytest.approx((1 + 2 / 3) / 2)
    )
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 0], bool)) == 0.5


def _structured(seed: int = 0, noise: float = 0.3, shuffle: bool = False):
    """3 mechanisms × 3 perturbations × 4 replicates + 12 controls in 64 dimensions."""
    rng = np.random.default_rng(seed)
    d = 64
    mech = rng.normal(size=(3, d))
    rows, labels, moas = [], [], []
    for m in range(3):
        for p in range(3):
            own = mech[m] + 0.6 * rng.normal(size=d)
            for _ in range(4):
                rows.append(own + noise * rng.normal(size=d))
                labels.append(f"P{m}{p}")
                moas.append(f"M{m}")
    for _ in range(12):
        rows.append(noise * rng.normal(size=d))
        labels.append("DMSO")
        moas.append("control")
    x, labels = np.array(rows), np.array(labels)
    controls = labels == "DMSO"
    if shuffle:  # destroy the structure: every well gets a random vector
        x = rng.normal(size=x.shape)
    return x, labels, controls, moas


def test_metrics_see_replicates_and_relationships():
    x, labels, controls, moas = _structured()
    consistency = replicate_consistency(x, labels, controls, n_null=200)
    assert consistency["consistent"].all() and (consistency["p_value"] < 0.01).all()
    retrieval = replicate_map(x, labels, controls)
    assert retrieval["mAP"].min() > 0.9
    np.testing.assert_allclose(retrieval["chance"], 3 / 47)
    names, profiles = aggregate(x[~controls], labels[~controls])
    assert names == [f"P{m}{p}" for m in range(3) for p in range(3)]
    sim = cosine_similarity(profiles)
    pm = pd.DataFrame(
        {
            "Metadata_Perturbation": labels,
            "Metadata_Mechanism": moas,
            "Metadata_IsControl": controls,
        }
    )
    pairs = pairs_from_column(pm, "Metadata_Mechanism")
    assert len(pairs) == 9 and ("P00", "P01") in pairs
    summary, table = relationship_recall(sim, names, pairs)
    assert summary["mean_cosine_related"] > summary["mean_cosine_unrelated"] + 0.3
    # 36 pairs: the top 5% holds 2 of them, both related
    assert table["recalled"].sum() == 2 and summary["recall"] == pytest.approx(2 / 9)
    assert summary["n_pairs"] == 9


def test_metrics_stay_at_chance_without_structure():
    x, labels, controls, _ = _structured(shuffle=True)
    consistency = replicate_consistency(x, labels, controls, n_null=500)
    assert consistency["consistent"].mean() <= 0.34
    retrieval = replicate_map(x, labels, controls)
    assert retrieval["mAP"].mean() < 0.25


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
        root, n_plates=2, perturbations=6, replicates=2, controls=6, n_channels=3, size=256, seed=0
    )
    plates = sorted(p for p in root.iterdir() if p.is_dir())
    config = EmbedConfig(model=str(test_model_dir), device="cpu", precision="fp32", batch_size=8)
    run(embed_plates(plates, root / "emb", config))
    return root


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
        )
    )
    metrics = report.metrics.set_index("metric")
    # the baseline statistics see the synthetic phenotypes: replicates find each other and
    # perturbations of one mechanism resemble each other more than the others
    base = metrics["baseline"]
    assert base["replicate_map"] > 2 * metrics.loc["replicate_map", "chance"]
    assert base["replicate_consistency"] >= 0.8
    assert base["relationship_mean_cosine_related"] > base["relationship_mean_cosine_unrelated"]
    # the random-weight test model gets the same metrics, whatever they are
    assert np.isfinite(metrics["model"].to_numpy(float)).all()
    assert len(report.wells) == 2 * (6 * 2 + 6) and report.model.names == report.baseline.names
    for name in (
        "report.md",
        "metrics.csv",
        "replicates_model.csv",
        "replicates_baseline.csv",
        "similarity_model.csv",
        "pairs_baseline.csv",
        "profiles_model.parquet",
        "aligned_baseline.parquet",
        "config.json",
    ):
        assert (tmp_path / name).is_file(), name
    text = (tmp_path / "report.md").read_text()
    assert "| Replicate retrieval mAP |" in text and "center-scale" in text
    sim = pd.read_csv(tmp_path / "similarity_model.csv", index_col=0)
    assert sim.shape == (6, 6) and np.allclose(np.diag(sim), 1)
    assert json.loads((tmp_path / "config.json").read_text())["alignment"] == "center-scale"


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
    assert events[-1].done == events[-1].total == 18
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


def test_platemap_that_matches_nothing_says_why(screen, tmp_path):
    from napari_cellmae.profiling import profile_report

    pm = read_platemap(screen / "platemap.csv").assign(Metadata_Plate="OTHER")
    with pytest.raises(ValueError, match="no profile matches the platemap.*plate names"):
        run(profile_report(screen / "emb", pm, tmp_path))


def test_embedding_folder_path_is_checked(tmp_path):
    from napari_cellmae.profiling import profile_report

    with pytest.raises(FileNotFoundError, match="cellmae embed"):
        run(profile_report(tmp_path, Path("platemap.csv"), tmp_path / "r"))
