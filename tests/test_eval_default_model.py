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
