"""Typed errors for plate folders. All are ``ValueError``s whose message names the file or field
and the fix, so the CLI prints them as one line and the GUI shows them on its status line."""

from __future__ import annotations


class PlateError(ValueError):
    """Base class of everything a plate folder can get wrong.

    ``str(error)`` tells a Python or CLI user what to pass (``layout=…``, ``--layout``);
    :attr:`gui_message`, where the fix differs in the GUI, says it in the GUI's words (the
    layout box, the pattern field, the site list) for its status line.
    """

    def __init__(self, message: str, gui_message: str | None = None):
        super().__init__(message)
        self.gui_message = gui_message or message


class LayoutError(PlateError):
    """No layout (or more than one) fits the folder's file names."""


class FieldNotFoundError(PlateError):
    """The requested plate/well/site is not in the index."""


class MissingChannelError(PlateError):
    """A field has no file for one of the requested channels."""


class SizeMismatchError(PlateError):
    """The channel files of one field have different image sizes."""


class CorruptFileError(PlateError):
    """An image file is missing, truncated or not decodable."""


class FileAccessError(CorruptFileError):
    """An image file of the index cannot be opened: permission denied, a dangling symbolic link,
    or gone since the scan (the file itself may be fine)."""


class PlaneError(PlateError):
    """An image file's planes cannot be one channel of a field: RGB(A) samples, a Z stack or
    time series, unlabelled pages, or several channels where the field expects one."""


class NonFiniteError(PlateError):
    """A floating-point image holds NaN or infinite pixel values."""
