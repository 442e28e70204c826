"""The channel-naming box of the Load tab: an editable table (raw id -> stain name), presets
(JUMP Cell Painting, RxRx) and "Save mapping…" to a JSON file of the user's choice."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..plates.channels import PRESETS, apply_preset


class ChannelNamesBox(QGroupBox):
    """Edit channel names. Emits ``names_changed({id: name})`` with the edited entries and
    ``save_requested(path)`` when the user picked a file to save the mapping to."""

    names_changed = Signal(dict)
    save_requested = Signal(str)

    def __init__(self) -> None:
        super().__init__("Channels (names are saved with every output)")
        self._ids: list[str] = []
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["channel id", "name"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.AllEditTriggers)
        self.table.setMaximumHeight(150)
        self.preset_combo = QComboBox()
        self.preset_combo.addItem("name as…", "")
        for preset in PRESETS:
            self.preset_combo.addItem(preset, preset)
        self.preset_combo.setToolTip("Name the channels in order with a reference stain set")
        self.save_button = QPushButton("Save mapping…")
        self.save_button.setEnabled(False)

        buttons = QHBoxLayout()
        buttons.addWidget(self.preset_combo, 1)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(buttons)

        self.table.itemChanged.connect(self._edited)
        self.preset_combo.activated.connect(self._preset)
        self.save_button.clicked.connect(self._ask_path)

    def set_channels(self, ids: Sequence[str], names: dict[str, str]) -> None:
        """Show ``ids`` (read-only) with their ``names`` (editable), without emitting."""
        self._ids = list(ids)
        self.table.blockSignals(True)
        self.table.setRowCount(0)
        for cid in self._ids:
            row = self.table.rowCount()
            self.table.insertRow(row)
            id_item = QTableWidgetItem(cid)
            id_item.setFlags(id_item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            self.table.setItem(row, 0, id_item)
            self.table.setItem(row, 1, QTableWidgetItem(names.get(cid, cid)))
        self.table.blockSignals(False)
        self.save_button.setEnabled(bool(self._ids))

    def _edited(self, item: QTableWidgetItem) -> None:
        if item.column() == 1:
            self.names_changed.emit({self.table.item(item.row(), 0).text(): item.text()})

    def _preset(self, *_: object) -> None:
        preset = self.preset_combo.currentData()
        if preset and self._ids:
            self.names_changed.emit(apply_preset(self._ids, preset))
        self.preset_combo.setCurrentIndex(0)

    def _ask_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save channel mapping", "channels.json")
        if path:
            self.save_requested.emit(path)
