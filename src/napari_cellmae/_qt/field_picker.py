"""Plate / well / site (/ plane / timepoint) combo boxes over a ``list_fields`` table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import QComboBox, QFormLayout, QWidget

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


class FieldPicker(QWidget):
    """Choose one field. Plate, plane and timepoint rows appear only when the plate has several
    plates or has planes/timepoints; incomplete sites are marked."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: pd.DataFrame | None = None
        self.plate_combo = QComboBox()
        self.well_combo = QComboBox()
        self.site_combo = QComboBox()
        self.plane_combo = QComboBox()
        self.time_combo = QComboBox()
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        for label, combo in (
            ("Plate", self.plate_combo),
            ("Well", self.well_combo),
            ("Site", self.site_combo),
            ("Plane", self.plane_combo),
            ("Timepoint", self.time_combo),
        ):
            self.form.addRow(label, combo)
        self.plate_combo.currentIndexChanged.connect(self._fill_wells)
        self.well_combo.currentIndexChanged.connect(self._fill_sites)
        self.site_combo.currentIndexChanged.connect(self._fill_planes)
        for combo in (self.plate_combo, self.plane_combo, self.time_combo):
            self._show_row(combo, False)

    def set_fields(self, fields: pd.DataFrame) -> None:
        """Offer the fields of ``fields`` (a ``list_fields`` table)."""
        self.fields = fields
        self.plate_combo.blockSignals(True)
        self.plate_combo.clear()
        for plate in dict.fromkeys(fields["Metadata_Plate"]):
            self.plate_combo.addItem(str(plate), str(plate))
        self.plate_combo.blockSignals(False)
        self._show_row(self.plate_combo, self.plate_combo.count() > 1)
        self._fill_wells()

    def current(self) -> dict[str, Any] | None:
        """The chosen field as ``open_field`` keyword arguments, or None."""
        if self.fields is None or self.well_combo.currentData() is None:
            return None
        return {
            "well": self.well_combo.currentData(),
            "site": self.site_combo.currentData() or 1,
            "plate": self.plate_combo.currentData(),
            "plane": self.plane_combo.currentData() if self.plane_combo.isEnabled() else None,
            "timepoint": self.time_combo.currentData() if self.time_combo.isEnabled() else None,
        }

    def _show_row(self, widget: QWidget, shown: bool) -> None:
        widget.setEnabled(shown)
        widget.setVisible(shown)
        label = self.form.labelForField(widget)
        if label is not None:
            label.setVisible(shown)

    def _fill_wells(self, *_: Any) -> None:
        if self.fields is None:
            return
        rows = self.fields[self.fields["Metadata_Plate"] == self.plate_combo.currentData()]
        self.well_combo.blockSignals(True)
        self.well_combo.clear()
        for well in dict.fromkeys(rows["Metadata_Well"]):
            self.well_combo.addItem(well, well)
        self.well_combo.blockSignals(False)
        self._fill_sites()

    def _well_rows(self) -> pd.DataFrame:
        assert self.fields is not None
        f = self.fields
        return f[
            (f["Metadata_Plate"] == self.plate_combo.currentData())
            & (f["Metadata_Well"] == self.well_combo.currentData())
        ]

    def _fill_sites(self, *_: Any) -> None:
        if self.fields is None:
            return
        rows = self._well_rows()
        self.site_combo.blockSignals(True)
        self.site_combo.clear()
        for site in sorted(set(rows["Metadata_Site"].tolist())):
            complete = rows[rows["Metadata_Site"] == site]["complete"].all()
            self.site_combo.addItem(f"{site}" + ("" if complete else " (incomplete)"), int(site))
        self.site_combo.blockSignals(False)
        self._fill_planes()

    def _fill_planes(self, *_: Any) -> None:
        if self.fields is None:
            return
        rows = self._well_rows()
        rows = rows[rows["Metadata_Site"] == self.site_combo.currentData()]
        for combo, column in (
            (self.plane_combo, "Metadata_Plane"),
            (self.time_combo, "Metadata_Timepoint"),
        ):
            combo.clear()
            present = column in rows.columns
            if present:
                for value in sorted(set(rows[column].tolist())):
                    combo.addItem(str(value), int(value))
            self._show_row(combo, present)
