"""The model card's per-mechanism breakdown (benchmarks/eval_default_model.py): which phenotype
groups a model retrieves, and what it mistakes the others for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_default_model.py"


def _load():
    spec = importlib.util.spec_from_file_location("eval_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_by_mechanism_reports_each_groups_accuracy_and_what_it_is_mistaken_for():
    ev = _load()
    # two plates; each holds 2 wells of MOA-1 (golgi), 2 of MOA-2 (cell size), 2 controls.
    # P1's MOA-1 wells lie nearer to P2's controls than to P2's MOA-1 wells (a weak phenotype);
    # P2's MOA-1 wells still find P1's MOA-1 first.
    profile = {
        "P1": {"control": [1.0, 0, 0], "MOA-1": [1.0, 0.05, 0], "MOA-2": [0, 0, 1.0]},
        "P2": {"control": [1.0, 0.04, 0], "MOA-1": [1.0, 0.2, 0], "MOA-2": [0, 0.1, 1.0]},
    }
    phenotype = {
        "control": "",
        "MOA-1": "golgi_dispersal=0.9",
        "MOA-2": "cell_size=0.8;er_intensity=1",
    }
    rows, x = [], []
    for plate, wells in profile.items():
        for mech, vector in wells.items():
            for _ in range(2):
                rows.append(
                    {
                        "Metadata_Plate": plate,
                        "Metadata_Mechanism": mech,
                        "Metadata_Phenotype": phenotype[mech],
                    }
                )
                x.append(vector)
    meta = pd.DataFrame(rows)
    x = np.asarray(x)
    mechanism = meta["Metadata_Mechanism"].to_numpy()
    good = np.eye(3)[[("control", "MOA-1", "MOA-2").index(m) for m in mechanism]]

    plates = meta["Metadata_Plate"].to_numpy()
    predicted = {
        name: ev.one_nn_labels(v, mechanism, plates)
        for name, v in (("model", x), ("baseline", good))
    }

    table = ev.by_mechanism(meta, mechanism, predicted)

    assert [r["mechanism"] for r in table] == ["MOA-1", "MOA-2"]  # controls are no group
    moa1, moa2 = table
    assert moa1["phenotype"] == "golgi_dispersal"
    assert moa2["phenotype"] == "cell_size + er_intensity"
    assert moa1["wells"] == moa2["wells"] == 4
    assert moa1["model"] == 0.5 and moa1["model_confused_with"] == "control"
    assert moa2["model"] == 1.0 and moa2["model_confused_with"] == ""
    assert moa1["baseline"] == moa2["baseline"] == 1.0
    assert (predicted["baseline"] == mechanism).all()  # controls find controls too


def test_random_init_control_embeds_like_the_model_with_fresh_weights():
    import torch

    from napari_cellmae.inference import CellMAEModel
    from napari_cellmae.model import create_model

    ev = _load()
    torch.manual_seed(123)
    trained = CellMAEModel(
        create_model("cellmae_vit_test_patch16_256"),
        "cpu",
        "fp32",
        name="tiny-test",
        default_block=1,
        default_pooling="channelwise",
        default_normalization="plate",
    )
    control = ev.random_init(trained, seed=0)
    again = ev.random_init(trained, seed=0)
    assert control.config == trained.config
    assert (control.default_block, control.default_pooling, control.default_normalization) == (
        1,
        "channelwise",
        "plate",
    )
    a, b, c = (m.module.state_dict() for m in (control, again, trained))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the seed fixes the control
    assert not torch.equal(a["patch_embed.proj.weight"], c["patch_embed.proj.weight"])
    field = np.random.default_rng(0).random((2, 256, 256)).astype(np.float32)
    assert control.embed_field(field, normalization="crop").shape == (2 * control.embed_dim,)


def test_random_init_column_in_the_card_tables():
    ev = _load()
    metrics = {
        "replicate_map": 0.2,
        "replicate_map_chance": 0.03,
        "replicate_consistency": 1.0,
        "mechanism_recall": 0.5,
        "mechanism_1nn_accuracy": 0.6,
    }
    e = {
        "model": metrics,
        "baseline": {**metrics, "replicate_map": 0.3},
        ev.RANDOM_INIT: {**metrics, "replicate_map": 0.123},
        "by_mechanism": [
            {
                "mechanism": "MOA-1",
                "phenotype": "golgi_dispersal",
                "wells": 9,
                "model": 0.33,
                "model_confused_with": "control",
                "baseline": 0.89,
                "baseline_confused_with": "",
                ev.RANDOM_INIT: 0.15,
            }
        ],
        "screen": {
            "wells": 252,
            "plates": 3,
            "perturbations": 24,
            "mechanisms": 8,
            "field_px": 512,
            "baseline_features": 70,
            "block": 1,
            "pooling": "channelwise",
            "normalization": "plate",
        },
    }
    text = "\n".join(ev._embedding_lines(e))
    assert "| replicate retrieval mAP | 0.200 | **0.300** | 0.030 | 0.123 |" in text
    assert "| MOA-1 | golgi_dispersal | 9 | 0.33 | control | 0.89 | — | 0.15 |" in text
    assert "random weights" in text
    del e[ev.RANDOM_INIT], e["by_mechanism"][0][ev.RANDOM_INIT]
    assert "random weights" not in "\n".join(ev._embedding_lines(e))
