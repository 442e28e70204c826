"""File-naming conventions of plate imagers: one compiled regex and one parser per layout.

A layout turns a file name (plus the folders between the plate root and the file) into the parts of
a field key: plate, row, column, site, channel and, where the instrument writes them, plane and
timepoint. :func:`napari_cellmae.plates.scan_plate` tries them all and keeps the one that matches
the most files. Every parser returns a :class:`Parsed` or None (not an image of this layout).

Conventions shared by all layouts: rows are letters (``A``…``Z``, ``AA``…``AF`` on 1536-well
plates), columns are ints, sites are 1-based (Cellomics ``f00`` is site 1), the channel is the
raw id as written in the file name (``w1``, ``1``, ``d0``, ``390 - Blue``, ``phase``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

# Channel ids as RxRx1/2 write them, and the stains they hold (Sypetkowski et al. 2023).
RXRX_CHANNEL_NAMES = {
    "w1": "Hoechst",
    "w2": "ConA",
    "w3": "Phalloidin",
    "w4": "Syto14",
    "w5": "MitoTracker",
    "w6": "WGA",
}
# RxRx3-core uses the same six stains, numbered without the "w".
RXRX3_CHANNEL_NAMES = {k[1:]: v for k, v in RXRX_CHANNEL_NAMES.items()}
# IncuCyte channel tokens, in the order the instrument lists them.
INCUCYTE_CHANNELS = ("phase", "brightfield", "green", "red", "nir", "blue", "orange")

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
_TIF = r"\.tiff?$"


class Parsed(NamedTuple):
    """The field key parts one file name carries (None: not in the name, decided by the scan)."""

    row: str
    col: int
    site: int
    channel: str
    plate: str | None = None
    plane: int | None = None
    timepoint: int | None = None


Parser = Callable[[re.Match, tuple[str, ...]], "Parsed | None"]
Matches = list[tuple[int, "Parsed"]]
Finisher = Callable[[Matches, list[str]], tuple[Matches, str]]


@dataclass(frozen=True)
class Layout:
    """One naming convention.

    Parameters
    ----------
    name : str
        Short id (``"imagexpress"``, ``"regex"`` …) used by ``scan_plate(layout=...)``.
    pattern : re.Pattern
        Matched against the file name (``match_path=False``) or the path relative to the plate root
        with ``/`` separators (``match_path=True``, user regexes), with ``re.search``.
    parse : callable
        ``parse(match, folders) -> Parsed | None``; ``folders`` are the folder names between the
        plate root and the file.
    description, example : str
        For error messages and the docs.
    channel_order : tuple of str
        Known channel ids in the order the instrument lists them (others follow, naturally sorted).
    default_channel_names : dict
        Stain names for known channel ids (e.g. RxRx ``w1 → Hoechst``).
    export_folders : tuple of str
        Lower-case names of folders the instrument's export puts between the plate folder and
        the files (scan^R ``data``): not plate names.
    finish : callable, optional
        ``finish(matched, names) -> (matched, note)``: called by ``scan_plate`` on the chosen
        layout's matches when a decision needs the whole folder (scan^R: which plate format the
        well numbers count on); ``note`` (or "") joins the scan summary.
    """

    name: str
    pattern: re.Pattern
    parse: Parser
    description: str = ""
    example: str = ""
    match_path: bool = False
    channel_order: tuple[str, ...] = ()
    default_channel_names: dict[str, str] = field(default_factory=dict)
    export_folders: tuple[str, ...] = ()
    finish: Finisher | None = None

    def match(self, relpath: str, name: str) -> Parsed | None:
        """Parse one file (``relpath``: path under the root with ``/``; ``name``: its file name)."""
        m = self.pattern.search(relpath if self.match_path else name)
        if m is None:
            return None
        folders = tuple(relpath.split("/")[:-1])
        return self.parse(m, folders)


# -- wells and rows -----------------------------------------------------------------------------
def row_to_index(row: str) -> int:
    """``"A" -> 1``, ``"Z" -> 26``, ``"AA" -> 27``, ``"AF" -> 32`` (1536-well plates)."""
    n = 0
    for ch in row.upper():
        n = n * 26 + (ord(ch) - 64)
    return n


def index_to_row(index: int) -> str:
    """``1 -> "A"``, ``27 -> "AA"`` (inverse of :func:`row_to_index`)."""
    if index < 1:
        raise ValueError(f"row number must be >= 1, got {index}")
    letters = ""
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def well_name(row: str, col: int) -> str:
    """``("B", 3) -> "B03"`` (columns zero-padded to 2 digits, 3 on plates wider than 99)."""
    return f"{row.upper()}{int(col):02d}"


_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


def split_well(well: str) -> tuple[str, int]:
    """``"b3" -> ("B", 3)``, ``"AA02" -> ("AA", 2)``; ValueError for anything else."""
    m = _WELL.match(well.strip())
    if m is None:
        raise ValueError(
            f"{well!r} is not a well name: use a row letter (A-Z, AA-AF) then a column number, "
            "e.g. 'B03' or 'AA2'"
        )
    return m.group(1).upper(), int(m.group(2))


def _row_from_number(text: str) -> str:
    return index_to_row(int(text))


def _structural_time_plane(folders: tuple[str, ...]) -> tuple[int | None, int | None]:
    """ImageXpress ``TimePoint_N`` / ``ZStep_N`` folders -> (timepoint, plane)."""
    timepoint = plane = None
    for part in folders:
        m = STRUCTURAL_FOLDER.match(part)
        if m:
            if m.group(1).lower().startswith("time"):
                timepoint = int(m.group(2))
            else:
                plane = int(m.group(2))
    return timepoint, plane


# Folders that carry time/plane rather than a plate name.
STRUCTURAL_FOLDER = re.compile(r"^(TimePoint|ZStep)_(\d+)$", re.IGNORECASE)


# -- the layouts --------------------------------------------------------------------------------
_IMAGEXPRESS = re.compile(
    r"^(?:(?P<plate>.+?)_)?(?P<row>[A-Za-z]{1,2})(?P<col>\d{2})"
    r"(?:_s(?P<site>\d+))?"
    rf"(?:_w(?P<channel>\d{{1,2}})(?:{_GUID})?)?"
    r"(?:_z(?P<plane>\d+))?(?:_t(?P<timepoint>\d+))?" + _TIF,
    re.IGNORECASE,
)


def _parse_imagexpress(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    if "_thumb" in m.string.lower():  # MetaXpress writes a thumbnail beside every image
        return None
    timepoint, plane = _structural_time_plane(folders)
    if m.group("plane"):
        plane = int(m.group("plane"))
    if m.group("timepoint"):
        timepoint = int(m.group("timepoint"))
    return Parsed(
        row=m.group("row").upper(),
        col=int(m.group("col")),
        site=int(m.group("site") or 1),
        channel="w" + (m.group("channel") or "1"),
        plate=m.group("plate"),
        plane=plane,
        timepoint=timepoint,
    )


_HARMONY = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2,3})p(?P<plane>\d{2,3})"
    r"-ch(?P<channel>\d+)sk(?P<timepoint>\d+)fk\d+fl\d+" + _TIF,
    re.IGNORECASE,
)


def _parse_harmony(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    return Parsed(
        row=_row_from_number(m.group("row")),
        col=int(m.group("col")),
        site=int(m.group("site")),
        channel=str(int(m.group("channel"))),
        plane=int(m.group("plane")),
        timepoint=int(m.group("timepoint")),
    )


_CELLOMICS = re.compile(
    r"^(?P<plate>.+)_(?P<row>[A-Za-z]{1,2})(?P<col>\d{2})f(?P<site>\d{2,3})(?P<channel>[do]\d+)"
    + _TIF,
    re.IGNORECASE,
)


def _parse_cellomics(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    return Parsed(
        row=m.group("row").upper(),
        col=int(m.group("col")),
        site=int(m.group("site")) + 1,  # f00 is the first field
        channel=m.group("channel").lower(),
        plate=m.group("plate"),
    )


_INCELL = re.compile(
    r"^(?P<row>[A-Za-z]{1,2}) - (?P<col>\d{1,3})\(fld (?P<site>\d+) wv (?P<channel>.+?)"
    r"(?: z (?P<plane>\d+))?(?: time (?P<timepoint>\d+)(?: - \d+ ms)?)?\)" + _TIF,
    re.IGNORECASE,
)


def _parse_incell(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    return Parsed(
        row=m.group("row").upper(),
        col=int(m.group("col")),
        site=int(m.group("site")),
        channel=m.group("channel"),
        plane=int(m.group("plane")) if m.group("plane") else None,
        timepoint=int(m.group("timepoint")) if m.group("timepoint") else None,
    )


_INCUCYTE = re.compile(
    r"^(?P<prefix>.+?)_(?P<row>[A-Za-z]{1,2})(?P<col>\d{1,2})_(?P<site>\d+)_"
    r"(?:(?P<d>\d+)d(?P<h>\d+)h(?P<m>\d+)m"
    r"|(?P<Y>\d{4})y(?P<M>\d{2})m(?P<D>\d{2})d_(?P<hh>\d{2})h(?P<mm>\d{2})m)" + _TIF,
    re.IGNORECASE,
)


def _parse_incucyte(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    tokens = m.group("prefix").split("_")
    if tokens[-1].lower() in INCUCYTE_CHANNELS:
        channel = tokens.pop().lower()
    elif folders and folders[-1].lower() in INCUCYTE_CHANNELS:
        channel = folders[-1].lower()
    else:
        channel = "phase"  # the IncuCyte default modality when the name carries no channel
    if m.group("d") is not None:  # elapsed time since the first scan, in minutes
        minutes = int(m.group("d")) * 1440 + int(m.group("h")) * 60 + int(m.group("m"))
    else:  # wall-clock date: minutes since 2000-01-01 keep the order
        from datetime import datetime

        stamp = datetime(
            int(m.group("Y")),
            int(m.group("M")),
            int(m.group("D")),
            int(m.group("hh")),
            int(m.group("mm")),
        )
        minutes = int((stamp - datetime(2000, 1, 1)).total_seconds() // 60)
    return Parsed(
        row=m.group("row").upper(),
        col=int(m.group("col")),
        site=int(m.group("site")),
        channel=channel,
        plate="_".join(tokens) or None,
        timepoint=minutes,
    )


_RXRX = re.compile(
    r"^(?P<row>[A-Za-z]{1,2})(?P<col>\d{2})_s(?P<site>\d+)_w(?P<channel>\d+)\.png$", re.IGNORECASE
)


def _parse_rxrx(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    return Parsed(
        row=m.group("row").upper(),
        col=int(m.group("col")),
        site=int(m.group("site")),
        channel="w" + m.group("channel"),
    )


_RXRX3 = re.compile(
    r"^(?P<row>[A-Za-z]{1,2})(?P<col>\d{2})_s(?P<site>\d+)_(?P<channel>\d+)\.jp2$", re.IGNORECASE
)


def _parse_rxrx3(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
    return Parsed(
        row=m.group("row").upper(),
        col=int(m.group("col")),
        site=int(m.group("site")),
        channel=m.group("channel"),
    )


# -- Olympus scan^R ----------------------------------------------------------------------------
# Plate formats (wells -> rows, columns). scan^R numbers wells W00001, W00002 … row-major: A1, A2,
# …, A12, B1 … on a 96-well plate; only the plate format turns a number into a well.
PLATE_FORMATS: dict[int, tuple[int, int]] = {
    6: (2, 3),
    12: (3, 4),
    24: (4, 6),
    48: (6, 8),
    96: (8, 12),
    384: (16, 24),
    1536: (32, 48),
}
DEFAULT_PLATE_FORMAT = 96
# the formats a well number alone can point to, smallest first (the default is the smallest)
_NUMBER_FORMATS = (96, 384, 1536)

_SCANR = re.compile(
    r"^(?:(?P<prefix>.*?)--)?W(?P<well>\d+)--P(?P<site>\d+)--Z(?P<plane>\d+)--T(?P<timepoint>\d+)"
    r"--(?P<channel>.+?)(?:\.ome)?" + _TIF,
    re.IGNORECASE,
)


def well_from_number(number: int, plate_format: int = DEFAULT_PLATE_FORMAT) -> tuple[str, int]:
    """Row-major well number (1-based, scan^R ``W00014``) -> ``(row, col)``: 14 -> ``("B", 2)``
    on a 96-well plate, ``("A", 14)`` on a 384-well plate."""
    rows, cols = PLATE_FORMATS[plate_format]
    if not 1 <= number <= rows * cols:
        raise ValueError(
            f"well number {number} is not on a {plate_format}-well plate (wells 1-{rows * cols})"
        )
    r, c = divmod(number - 1, cols)
    return index_to_row(r + 1), c + 1


def _prefix_well(prefix: str | None) -> tuple[str, int] | None:
    """The well name scan^R writes before ``--W`` (``B2--W00014…``), when there is one."""
    if not prefix:
        return None
    try:
        return split_well(prefix.rsplit("--", 1)[-1])
    except ValueError:
        return None


def _scanr_format_for(number: int) -> int | None:
    return next((f for f in _NUMBER_FORMATS if number <= f), None)


def _scanr_parser(plate_format: int | None) -> Parser:
    def parse(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
        number = int(m.group("well"))
        well = _prefix_well(m.group("prefix"))
        if well is None:
            fmt = plate_format or _scanr_format_for(number)
            if fmt is None:  # auto: no standard plate has this many wells
                return None
            try:
                well = well_from_number(number, fmt)
            except ValueError as exc:
                from .errors import LayoutError

                raise LayoutError(
                    f"{m.string}: {exc}. Choose the plate format the folder was acquired on, "
                    f"e.g. layout 'scanr:{_scanr_format_for(number) or 1536}' (formats: "
                    f"{', '.join(map(str, PLATE_FORMATS))})"
                ) from None
        return Parsed(
            row=well[0],
            col=well[1],
            site=int(m.group("site")),
            channel=m.group("channel"),
            plane=int(m.group("plane")) + 1,  # scan^R counts Z and T from 0
            timepoint=int(m.group("timepoint")) + 1,
        )

    return parse


def _scanr_finisher(plate_format: int | None) -> Finisher:
    def finish(matched: Matches, names: list[str]) -> tuple[Matches, str]:
        found = [(i, _SCANR.search(names[i])) for i, _ in matched]
        numbers = [int(m.group("well")) for _, m in found]
        named = [(int(m.group("well")), _prefix_well(m.group("prefix"))) for _, m in found]
        named = [(n, w) for n, w in named if w is not None]
        if plate_format is not None:
            return matched, f"scan^R wells numbered on a {plate_format}-well plate (chosen)"
        if named:  # the files name their wells: use them, and the format they imply
            fits = [
                f
                for f in PLATE_FORMATS
                if all(n <= f and well_from_number(n, f) == w for n, w in named)
            ]
            if len(named) == len(found):
                return matched, "scan^R wells from the well names in the file names"
            fmt = fits[0] if fits else None
            why = "the well names in the file names"
        else:
            fmt, why = None, ""
        if fmt is None:
            fmt = _scanr_format_for(max(numbers))
            why = (
                f"well numbers up to {max(numbers)}"
                if fmt != DEFAULT_PLATE_FORMAT
                else "the default; pass layout 'scanr:384' (or 6-1536) for another"
            )
        parse = _scanr_parser(fmt)
        out = [(i, parse(m, ())) for i, m in found]
        return [(i, p) for i, p in out if p is not None], (
            f"scan^R wells numbered row-major on a {fmt}-well plate ({why})"
        )

    return finish


def scanr_layout(plate_format: int | None = None) -> Layout:
    """The Olympus scan^R layout; ``plate_format`` (wells: 6 … 1536) maps the row-major well
    numbers to wells. ``None``: the well names in the file names when written, else the smallest
    of 96/384/1536 that holds the highest well number (96 unless the folder needs more)."""
    if plate_format is not None and plate_format not in PLATE_FORMATS:
        raise ValueError(
            f"plate format {plate_format!r} is not known: use one of "
            f"{', '.join(map(str, PLATE_FORMATS))} wells, e.g. layout 'scanr:384'"
        )
    return Layout(
        "scanr" if plate_format is None else f"scanr:{plate_format}",  # a record re-scans alike
        _SCANR,
        _scanr_parser(plate_format),
        "Olympus scan^R (wells numbered row-major: 96-well unless the folder says otherwise; "
        "'scanr:384' chooses)",
        "A1--W00001--P00001--Z00000--T00000--DAPI.tif",
        export_folders=("data",),
        finish=_scanr_finisher(plate_format),
    )


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "imagexpress",
            _IMAGEXPRESS,
            _parse_imagexpress,
            "Molecular Devices ImageXpress / MetaXpress (GUID optional, TimePoint_N/ZStep_N "
            "folders, _thumb files skipped)",
            "MIP-2P-2sub_C05_s1_w146C9B2CD-0BB3-4B1C-8D9B-8A2A5F7B2A10.tif, A01_s1_w1.tif",
        ),
        Layout(
            "harmony",
            _HARMONY,
            _parse_harmony,
            "Revvity Opera Phenix / Operetta (Harmony export; channel names from Index.xml)",
            "r01c01f01p01-ch1sk1fk1fl1.tiff",
        ),
        Layout(
            "cellomics",
            _CELLOMICS,
            _parse_cellomics,
            "Thermo Cellomics ArrayScan / CellInsight (.tif/.TIF, d or o channels)",
            "AS_09125_050116030001_D03f00d0.tif",
        ),
        Layout(
            "incell",
            _INCELL,
            _parse_incell,
            "Cytiva InCell Analyzer (wavelength names as channel ids)",
            "A - 01(fld 1 wv 390 - Blue).tif",
        ),
        Layout(
            "incucyte",
            _INCUCYTE,
            _parse_incucyte,
            "Sartorius IncuCyte (elapsed time in minutes as the timepoint)",
            "name_A2_1_03d06h40m.tif",
            channel_order=INCUCYTE_CHANNELS,
        ),
        Layout(
            "rxrx",
            _RXRX,
            _parse_rxrx,
            "Recursion RxRx1 / RxRx2 (experiment/plate folders, PNG, rows up to AF)",
            "HUVEC-1/Plate1/M23_s2_w3.png",
            default_channel_names=RXRX_CHANNEL_NAMES,
        ),
        Layout(
            "rxrx3",
            _RXRX3,
            _parse_rxrx3,
            "Recursion RxRx3-core (JPEG 2000)",
            "AA02_s1_3.jp2",
            default_channel_names=RXRX3_CHANNEL_NAMES,
        ),
        scanr_layout(),
    )
}

REGEX_GROUPS = ("well", "row", "col", "site", "channel", "plate", "plane", "timepoint")
REGEX_EXAMPLE = r"(?P<well>[A-P]\d{2})_s(?P<site>\d+)_(?P<channel>\w+)\.tif"
REGEX_GROUPS_HELP = (
    "named groups well (or row + col), site, channel, plate, plane, timepoint, each optional: "
    "without well every field is well A01, without site site 1, without channel one channel"
)


def looks_like_regex(text: str) -> bool:
    """True when ``text`` is a user regex (has a named group) rather than a layout name."""
    return "(?P<" in text


def regex_layout(pattern: str | re.Pattern) -> Layout:
    """A layout from a user regex with named groups, searched in the path under the plate root.

    Groups: ``channel`` (else every file is channel ``"1"``), ``well`` or ``row`` + ``col``
    (else well ``A01``), ``site`` (else 1), and optional ``plate``, ``plane``, ``timepoint``.
    ``row`` may be letters or a number (1 = A).
    """
    try:
        compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"invalid regular expression {pattern!r}: {exc}. Example: {REGEX_EXAMPLE}"
        ) from None
    groups = set(compiled.groupindex)
    unknown = groups - set(REGEX_GROUPS)
    if unknown:
        raise ValueError(
            f"regex group(s) {sorted(unknown)} are not known: use only named groups "
            f"{', '.join(REGEX_GROUPS)} (e.g. {REGEX_EXAMPLE})"
        )
    if ("row" in groups) != ("col" in groups):
        raise ValueError("a regex with a 'row' group needs a 'col' group too (or use 'well')")

    def parse(m: re.Match, folders: tuple[str, ...]) -> Parsed | None:
        g = m.groupdict()
        if g.get("well"):
            row, col = split_well(g["well"])
        elif g.get("row") and g.get("col"):
            raw = g["row"]
            row = _row_from_number(raw) if raw.isdigit() else raw.upper()
            col = int(g["col"])
        else:
            row, col = "A", 1
        return Parsed(
            row=row,
            col=col,
            site=int(g["site"]) if g.get("site") else 1,
            channel=g["channel"] if g.get("channel") else "1",
            plate=g.get("plate") or None,
            plane=int(g["plane"]) if g.get("plane") else None,
            timepoint=int(g["timepoint"]) if g.get("timepoint") else None,
        )

    return Layout(
        "regex",
        compiled,
        parse,
        f"user regular expression {compiled.pattern!r}",
        match_path=True,
    )


def get_layout(layout: str | re.Pattern | Layout) -> Layout:
    """A :class:`Layout` from a name, a regex with named groups, or a Layout."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, re.Pattern) or looks_like_regex(layout):
        return regex_layout(layout)
    name, _, plate_format = layout.lower().partition(":")
    if name == "scanr" and plate_format:
        try:
            return scanr_layout(int(plate_format))
        except ValueError:
            raise ValueError(
                f"layout {layout!r}: the plate format after 'scanr:' must be one of "
                f"{', '.join(map(str, PLATE_FORMATS))} wells, e.g. 'scanr:384'"
            ) from None
    try:
        return LAYOUTS[layout.lower()]
    except KeyError:
        raise ValueError(
            f"unknown layout {layout!r}: use 'auto', one of {', '.join(LAYOUTS)}, or a regular "
            f"expression with named groups, e.g. {REGEX_EXAMPLE}"
        ) from None


_NATURAL = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders ``w2`` before ``w10`` and ``390 - Blue`` before ``475 - Green``."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in _NATURAL.split(text))


def order_channels(ids: list[str] | set[str], layout: Layout) -> list[str]:
    """Channel ids in the layout's instrument order, then naturally sorted."""
    known = [c for c in layout.channel_order if c in ids]
    return known + sorted((c for c in ids if c not in known), key=natural_key)
