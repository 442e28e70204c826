"""Keyboard labelling in the QC tab, through napari's keybinding system.

Each key is a napari *action* (``napari-cellmae:qc_next_field``, ``napari-cellmae:qc_label_blur``,
…) registered with napari's action manager for the viewer, so it is listed (and can be changed)
in napari's Preferences → Shortcuts under "Viewer key bindings" and works while the canvas has
focus. The QC tab's table and suggestion list forward the same keys (their current shortcuts,
as the action manager has them) so that a row can be clicked and labelled without moving the
mouse to the canvas.

The default keys avoid napari's own viewer keys and those of the layers the QC tab shows (image
layers of the field, the plate map's points): ``.`` / ``,`` next / previous field, then one
letter per class. A Labels or Shapes layer, when active, keeps its own meaning of E, F, B, D.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..qc.head import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from .qc_tab import QCTab

PREFIX = "napari-cellmae:qc_"
CLASS_KEYS: dict[str, str] = {
    "ok": "K",
    "blur": "F",  # out of focus
    "saturation": "T",
    "debris": "D",
    "noise": "N",
    "empty": "E",
    "background": "B",
}
STEP_KEYS: dict[str, str] = {"next_field": ".", "previous_field": ","}
assert set(CLASS_KEYS) == set(CLASSES)

_tabs: list[weakref.ReferenceType[QCTab]] = []
_registered = False


def action_name(what: str) -> str:
    """``next_field``, ``previous_field`` or a class -> the napari action's name."""
    return f"{PREFIX}{what}" if what in STEP_KEYS else f"{PREFIX}label_{what}"


def default_keys() -> dict[str, str]:
    """Action name -> default key."""
    keys = {action_name(w): k for w, k in STEP_KEYS.items()}
    keys.update({action_name(c): k for c, k in CLASS_KEYS.items()})
    return keys


def current_key(what: str) -> str:
    """The key bound now to ``what`` (a user may have changed it in napari's preferences)."""
    from napari.utils.action_manager import action_manager

    name = action_name(what)
    from napari.utils.key_bindings import coerce_keybinding

    bound = action_manager._shortcuts.get(name) or [default_keys()[name]]  # no public getter
    return str(coerce_keybinding(bound[0]))


def tab_for(viewer: Any) -> QCTab | None:
    """The QC tab of ``viewer`` that keys act on: the newest one that is shown."""
    alive = [t for t in (ref() for ref in _tabs) if t is not None]
    _tabs[:] = [weakref.ref(t) for t in alive]
    mine = [t for t in alive if t.viewer is viewer]
    shown = [t for t in mine if _alive(t) and t.isVisible()]
    return (shown or [t for t in mine if _alive(t)] or [None])[-1]


def _alive(tab: QCTab) -> bool:
    try:
        tab.objectName()  # raises once the C++ widget is deleted
    except RuntimeError:
        return False
    return True


def _command(what: str) -> Callable[[Any], None]:
    def command(viewer):  # no annotation: napari passes the viewer the key was pressed in
        tab = tab_for(viewer)
        if tab is not None:
            tab.key_action(what)

    command.__name__ = f"qc_{what}"
    return command


def register(tab: QCTab) -> None:
    """Let ``tab`` receive the QC keys of its viewer (the actions are registered once)."""
    global _registered
    _tabs.append(weakref.ref(tab))
    if _registered:
        return
    from napari.components import ViewerModel
    from napari.utils.action_manager import action_manager

    descriptions = {"next_field": "QC: open the next field", "previous_field": "QC: open the "
                    "previous field"}  # fmt: skip
    descriptions.update({c: f"QC: label the open field {c}, open the next" for c in CLASSES})
    for what, key in [*STEP_KEYS.items(), *CLASS_KEYS.items()]:
        name = action_name(what)
        action_manager.register_action(
            name=name,
            command=_command(what),
            description=descriptions[what],
            keymapprovider=ViewerModel,
        )
        if not action_manager._shortcuts.get(name):  # keep a key the user chose
            action_manager.bind_shortcut(name, key)
    _registered = True


def what_for_key(text: str) -> str | None:
    """``next_field`` / ``previous_field`` / a class for a key's text (no modifier), or None."""
    from napari.utils.key_bindings import coerce_keybinding

    try:
        pressed = coerce_keybinding(text)
    except (ValueError, TypeError):  # not a key napari knows
        return None
    for what in [*STEP_KEYS, *CLASSES]:
        try:
            if coerce_keybinding(current_key(what)) == pressed:
                return what
        except (ValueError, TypeError):
            continue
    return None


def legend() -> str:
    """The keys, as the tab shows them."""
    step = f"{current_key('next_field')} / {current_key('previous_field')} next / previous field"
    labels = " · ".join(f"{current_key(c)} {c}" for c in CLASSES)
    return f"Keys: {step} · {labels} (the field is labelled and the next one opens)"
