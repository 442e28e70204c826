"""The default head's training data (scripts/train_qc_head.py) and its leave-one-source-out
evaluation (benchmarks/eval_qc.py): 8-bit copies of the deeper images are trained on with their
source, and never judged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_qc  # noqa: E402
import train_qc_head as T  # noqa: E402


def test_an_8_bit_copy_is_what_an_8_bit_camera_exposed_for_the_cells_records():
    rng = np.random.default_rng(0)
    image = (rng.gamma(2.0, 300.0, (64, 64)) + 100).astype(np.uint16)
    copy = T.eight_bit(image)
    assert copy.dtype == np.uint8 and copy.shape == image.shape
    assert np.percentile(copy, 99.9) == pytest.approx(T.EIGHT_BIT_LEVEL, abs=1)
    order = np.argsort(image, axis=None)
    assert np.all(np.diff(copy.ravel()[order].astype(int)) >= 0)  # monotone: same image, coarser


def test_every_deeper_real_image_has_an_8_bit_copy_in_its_own_source(real_data):
    items = T.real_sources(real_data)
    originals = {it.name: it for it in items if not it.derived}
    copies = [it for it in items if it.derived]
    deeper = [it for it in originals.values() if it.image.dtype != np.uint8]
    assert len(copies) == len(deeper) > 0
    for it in copies:
        base = originals[it.name.removesuffix("@8bit")]
        assert it.source == base.source and it.image.dtype == np.uint8
        assert base.image.dtype != np.uint8
    assert not T.real_sources(real_data, eight_bit_copies=False)[-1].derived


def test_copies_are_trained_on_but_never_judged():
    kinds = ["ok", "sparse", "defocus", "noise", "autofocus", "eval:defocus"]
    rows = []
    for name, derived in (("a", False), ("b", False), ("a@8bit", True)):
        for kind in kinds if not derived else kinds[:4]:
            cls = "ok" if kind in ("ok", "sparse") else ("noise" if "noise" in kind else "blur")
            rows.append((name, derived, kind, cls))
    table = pd.DataFrame(rows, columns=["name", "derived", "kind", "qc_class"])
    table["source"], table["group"], table["severity"] = "s", "g", 3
    assert T.training_rows(table).tolist() == [T.training_kind(k) for k in table["kind"]]
    assert not T.training_kind("autofocus") and not T.training_kind("eval:noise")
    scen = eval_qc.scenarios(table, np.zeros((len(table), 1)), "s", 2, 0.75, seed=0)
    for name, (t, _) in scen.items():
        assert not t["derived"].any(), name
        assert len(t) > 0
