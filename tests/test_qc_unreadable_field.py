"""An unreadable field in the QC tables names the channel whose file is broken, once."""

from __future__ import annotations

import pandas as pd

from napari_cellmae.progress import run
from napari_cellmae.qc import run_qc
from napari_cellmae.synthetic import write_plate


def test_unreadable_field_names_the_broken_channel_once(tmp_path):
    root = write_plate(
        tmp_path / "plate", "imagexpress", wells=2, sites=1, n_channels=3, size=128, seed=5
    )
    broken = next(root.rglob("*_A02_s1_w3.tif"))  # the LAST channel, as d2 in the issue
    broken.write_bytes(broken.read_bytes()[:300])
    result = run(run_qc(root, tmp_path / "out", None, None))
    fields = result["fields"]
    row = fields[fields["Metadata_Well"] == "A02"].iloc[0]
    assert row["QC_Class"] == "unreadable" and not row["QC_Pass"]
    assert row["QC_Channel"] == "w3"  # was w1: the first channel, whose file is fine
    reason = row["QC_Reason"]
    assert broken.name in reason
    assert reason.count("cannot be read") == 1  # was the same sentence three times
    assert "field unreadable" not in reason
    written = pd.read_csv(tmp_path / "out" / "qc_fields.csv")
    assert written.loc[written["Metadata_Well"] == "A02", "QC_Channel"].item() == "w3"
