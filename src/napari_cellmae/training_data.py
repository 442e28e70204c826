"""Training data for masked-autoencoder training: where fields come from, and how they become
augmented crop batches.

Sources give whole fields ``(C, H, W)``; each has a training part and a validation part split by
well (or group), deterministic by seed:

- :class:`PlateSource`: plate folders (via :mod:`napari_cellmae.plates`), split by well.
- :class:`ArraySource`: fields held in memory, split by group (or given validation fields).
- :class:`GeneratorSource`: fields made on the fly by a function of a seed (synthetic plates),
  fresh ones every epoch.
- :class:`ConcatSource`: several of those together (synthetic + real fields).

An epoch is a *plan* (:func:`epoch_plan`): the list of batches, each a list of (field, crop seed)
tickets, computed without reading a single image. A run resumed mid-epoch skips to its step for
free, and the processes of a distributed run take disjoint batches of the same plan. Fields are
visited in shuffled windows of a few fields whose crops are shuffled together, so a field is read
once per window and a batch mixes crops of several fields; batches hold crops of one channel
count (fields of different counts go to different batches).

Augmentation (:func:`make_crop`, :func:`make_batch`), as suits microscopy: random crops, the 8
flips/rotations, a per-channel intensity jitter (a random gamma per channel: a linear gain would be
undone by the model's per-channel standardisation) and random channel subsets (the model is
channel-agnostic; inference sees any subset of stains). No natural-image colour jitter.

numpy only (no torch).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import tiling

logger = logging.getLogger(__name__)

Key = Hashable  # identifies one field of a source (tuples of ints/strings)


class Ticket(NamedTuple):
    """One crop of an epoch plan: which field, and the seed of its crop and augmentation."""

    key: Key
    seed: int


class PlannedBatch(NamedTuple):
    """One batch of an epoch plan: its crops (same channel count) and a seed for the batch."""

    tickets: tuple[Ticket, ...]
    channels: int
    seed: int


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def _split_groups(
    groups: Sequence[Hashable], val_fraction: float, seed: int, what: str
) -> tuple[list[int], list[int]]:
    """Indices of (train, val) items, whole groups to one side; ``round(fraction · groups)``
    groups (at least 1) go to validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    unique = sorted(set(groups), key=repr)
    if val_fraction == 0 or not unique:
        return list(range(len(groups))), []
    if len(unique) < 2:
        raise ValueError(
            f"A validation split by {what} needs at least 2 {what}s; the data has "
            f"{len(unique)}. Add data, or pass val_fraction=0 (--val-fraction 0: no validation "
            "loss and no early stopping)."
        )
    rng = np.random.default_rng([int(seed), 4099])
    order = rng.permutation(len(unique))
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    val_groups = {unique[i] for i in order[:n_val]}
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val


class FieldSource:
    """Where training fields come from. Subclasses implement the five methods below."""

    channel_names: list[str] | None = None

    def train_keys(self, epoch: int) -> list[Key]:
        """The training fields of ``epoch`` (0-based), in a fixed order."""
        raise NotImplementedError

    def val_keys(self) -> list[Key]:
        """The validation fields (the same every epoch)."""
        raise NotImplementedError

    def channels(self, key: Key) -> int:
        """Channel count of a field, known without reading it."""
        raise NotImplementedError

    def read(self, key: Key) -> np.ndarray:
        """The field ``(C, H, W)``, any real dtype."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the model card records about the data."""
        raise NotImplementedError


class PlateSource(FieldSource):
    """Fields of plate folders, split into training and validation wells.

    Parameters
    ----------
    folders : sequence of paths
        Plate folders (any layout :func:`napari_cellmae.plates.scan_plate` reads).
    val_fraction : float
        Fraction of wells (over all plates) held out for validation.
    seed : int
        Seed of the split.
    channels : sequence of str, optional
        Channel ids or names to read, in this order (default: all of each plate).
    layout : str
        Passed to ``scan_plate``.
    repeats : int
        How many times each training field appears per epoch.
    """

    def __init__(
        self,
        folders: Sequence[str | os.PathLike],
        val_fraction: float = 0.2,
        seed: int = 0,
        channels: Sequence[str] | None = None,
        layout: str = "auto",
        repeats: int = 1,
    ) -> None:
        from .plates import list_fields, scan_plate
        from .plates.channels import index_channel_names
        from .plates.read import _resolve_channels

        if not folders:
            raise ValueError("No plate folders given: pass at least one PLATE_DIR.")
        self.folders = [Path(f).expanduser() for f in folders]
        self.indexes = []
        self.fields: list[tuple[int, dict[str, Any]]] = []
        self.n_channels: list[int] = []
        names: list[str] | None = None
        for i, folder in enumerate(self.folders):
            if not folder.is_dir():
                raise FileNotFoundError(f"Plate folder {folder} does not exist: check the path.")
            index = scan_plate(folder, layout=layout)
            if index.empty:
                raise ValueError(
                    f"No images found in {folder}: is it a plate folder? Pass --layout or a "
                    "regex if the files are named unusually."
                )
            wanted = _resolve_channels(index, channels)
            self.indexes.append(index)
            self.n_channels.append(len(wanted))
            plate_names = list(index_channel_names(index, wanted).values())
            names = plate_names if names is None else names
            table = list_fields(index)
            incomplete = 0
            for row in table.to_dict("records"):
                if channels is None and not row["complete"]:
                    incomplete += 1
                    continue
                self.fields.append((i, row))
            if incomplete:
                logger.warning("%s: %d fields miss channels and are left out", folder, incomplete)
        self.channel_names = names
        self.channel_selection = list(channels) if channels else None
        if not self.fields:
            raise ValueError(f"No complete field in {', '.join(map(str, self.folders))}.")
        groups = [(i, r["Metadata_Plate"], r["Metadata_Well"]) for i, r in self.fields]
        self._train, self._val = _split_groups(groups, val_fraction, seed, "well")
        self.val_fraction = val_fraction
        self.repeats = int(repeats)
        self._groups = groups

    def train_keys(self, epoch: int) -> list[Key]:
        return [("plate", k) for k in self._train] * self.repeats

    def val_keys(self) -> list[Key]:
        return [("plate", k) for k in self._val]

    def channels(self, key: Key) -> int:
        return self.n_channels[self.fields[key[1]][0]]

    def read(self, key: Key) -> np.ndarray:
        from .plates import read_field

        i, row = self.fields[key[1]]
        return read_field(
            self.indexes[i],
            well=row["Metadata_Well"],
            site=int(row["Metadata_Site"]),
            plate=row["Metadata_Plate"],
            plane=row.get("Metadata_Plane"),
            timepoint=row.get("Metadata_Timepoint"),
            channels=self.channel_selection,
        )

    def describe(self) -> dict[str, Any]:
        wells = lambda ids: len({self._groups[k] for k in ids})  # noqa: E731
        return {
            "kind": "plate folders",
            "folders": [str(f) for f in self.folders],
            "layouts": [ix.attrs.get("layout") for ix in self.indexes],
            "channels": self.channel_names,
            "train_fields": len(self._train),
            "val_fields": len(self._val),
            "train_wells": wells(self._train),
            "val_wells": wells(self._val),
            "split": f"by well, {self.val_fraction:.0%} of wells held out",
        }


class ArraySource(FieldSource):
    """Fields held in memory.

    Parameters
    ----------
    fields : sequence of arrays
        Training fields ``(C, H, W)`` (channel counts and sizes may differ).
    val_fields : sequence of arrays, optional
        Validation fields. When not given, whole ``groups`` of ``fields`` are held out.
    groups : sequence, optional
        Group (well) of each field for the split (default: each field its own group).
    val_fraction, seed
        The held-out share of groups and the seed of the split.
    channel_names : list of str, optional
    repeats : int
        How many times each training field appears per epoch.
    name : str
        How the model card names this data.
    """

    def __init__(
        self,
        fields: Sequence[np.ndarray],
        val_fields: Sequence[np.ndarray] | None = None,
        groups: Sequence[Hashable] | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        channel_names: list[str] | None = None,
        repeats: int = 1,
        name: str = "fields in memory",
    ) -> None:
        self.arrays = [self._check(f, i) for i, f in enumerate(fields)]
        if val_fields is not None:
            self.val_arrays = [self._check(f, i) for i, f in enumerate(val_fields)]
            self._train = list(range(len(self.arrays)))
        else:
            groups = list(range(len(self.arrays))) if groups is None else list(groups)
            if len(groups) != len(self.arrays):
                raise ValueError(f"{len(groups)} groups for {len(self.arrays)} fields.")
            self._train, val = _split_groups(groups, val_fraction, seed, "group")
            self.val_arrays = [self.arrays[i] for i in val]
        if not self._train:
            raise ValueError("No training fields: pass at least one field.")
        self.channel_names = channel_names
        self.repeats = int(repeats)
        self.name = name

    @staticmethod
    def _check(field: Any, i: int) -> np.ndarray:
        arr = np.asarray(field)
        if arr.ndim != 3 or min(arr.shape[1:]) < 16:
            raise ValueError(f"Field {i} must be (C, H, W) with H, W >= 16, got {arr.shape}.")
        return arr

    def train_keys(self, epoch: int) -> list[Key]:
        return [("train", i) for i in self._train] * self.repeats

    def val_keys(self) -> list[Key]:
        return [("val", i) for i in range(len(self.val_arrays))]

    def channels(self, key: Key) -> int:
        return ArraySource.read(self, key).shape[0]

    def read(self, key: Key) -> np.ndarray:
        return (self.arrays if key[0] == "train" else self.val_arrays)[key[1]]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "train_fields": len(self._train),
            "val_fields": len(self.val_arrays),
            "channels": self.channel_names,
            "repeats": self.repeats,
        }


class GeneratorSource(FieldSource):
    """Fields made on the fly: ``make(seed, n_channels) -> (C, H, W)``, fresh ones every epoch.

    Parameters
    ----------
    make : callable
        ``make(np.random.SeedSequence, n_channels)`` returns a field; same seed, same field.
    fields_per_epoch : int
        New training fields per epoch.
    val_fields : int
        Fixed validation fields (made from seeds no training field uses).
    n_channels : int or sequence of int
        Channel count of every field, or counts to draw from (per field, by its seed).
    seed : int
    name : str
        How the model card names this data (e.g. "synthetic Cell Painting fields").
    """

    def __init__(
        self,
        make: Callable[[np.random.SeedSequence, int], np.ndarray],
        fields_per_epoch: int,
        val_fields: int = 0,
        n_channels: int | Sequence[int] = 5,
        seed: int = 0,
        name: str = "generated fields",
        channel_names: list[str] | None = None,
    ) -> None:
        if fields_per_epoch < 1:
            raise ValueError(f"fields_per_epoch must be >= 1, got {fields_per_epoch}.")
        self.make = make
        self.fields_per_epoch = int(fields_per_epoch)
        self.n_val = int(val_fields)
        counts = [n_channels] if isinstance(n_channels, int) else list(n_channels)
        self.counts = [int(c) for c in counts]
        self.seed = int(seed)
        self.name = name
        self.channel_names = channel_names

    def _seed(self, key: Key) -> np.random.SeedSequence:
        part, epoch, k = key
        return np.random.SeedSequence([self.seed, 1 if part == "val" else 0, epoch, k])

    def train_keys(self, epoch: int) -> list[Key]:
        return [("train", int(epoch), k) for k in range(self.fields_per_epoch)]

    def val_keys(self) -> list[Key]:
        return [("val", 0, k) for k in range(self.n_val)]

    def channels(self, key: Key) -> int:
        if len(self.counts) == 1:
            return self.counts[0]
        pick = np.random.default_rng(self._seed(key).spawn(1)[0]).integers(len(self.counts))
        return self.counts[int(pick)]

    def read(self, key: Key) -> np.ndarray:
        c = self.channels(key)
        field = np.asarray(self.make(self._seed(key), c))
        if field.ndim != 3 or field.shape[0] != c:
            raise ValueError(f"make(seed, {c}) returned shape {field.shape}, expected ({c}, H, W).")
        return field

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "fields_per_epoch": self.fields_per_epoch,
            "val_fields": self.n_val,
            "channel_counts": self.counts,
        }


class ConcatSource(FieldSource):
    """Several sources together (e.g. synthetic fields made on the fly + real fields)."""

    def __init__(self, *sources: FieldSource) -> None:
        if not sources:
            raise ValueError("ConcatSource needs at least one source.")
        self.sources = sources
        self.channel_names = next((s.channel_names for s in sources if s.channel_names), None)

    def train_keys(self, epoch: int) -> list[Key]:
        return [(i, k) for i, s in enumerate(self.sources) for k in s.train_keys(epoch)]

    def val_keys(self) -> list[Key]:
        return [(i, k) for i, s in enumerate(self.sources) for k in s.val_keys()]

    def channels(self, key: Key) -> int:
        return self.sources[key[0]].channels(key[1])

    def read(self, key: Key) -> np.ndarray:
        return self.sources[key[0]].read(key[1])

    def describe(self) -> dict[str, Any]:
        return {"kind": "combined", "parts": [s.describe() for s in self.sources]}


# --------------------------------------------------------------------------------------------
# Epoch plans
# --------------------------------------------------------------------------------------------
def epoch_plan(
    source: FieldSource,
    epoch: int,
    seed: int,
    batch_size: int,
    crops_per_field: int,
    window: int = 8,
) -> list[PlannedBatch]:
    """The batches of one epoch (all processes together), without reading any image.

    Training fields are shuffled and taken ``window`` at a time; the ``crops_per_field`` tickets
    of a window's fields are shuffled together and cut into batches of one channel count (an
    incomplete batch carries over to the next window; the last ones are dropped).
    """
    rng = np.random.default_rng([int(seed), int(epoch), 8191])
    keys = source.train_keys(epoch)
    order = rng.permutation(len(keys))
    batches: list[PlannedBatch] = []
    pending: dict[int, list[Ticket]] = {}
    for start in range(0, len(order), window):
        tickets = [
            Ticket(keys[i], int(rng.integers(2**62)))
            for i in order[start : start + window]
            for _ in range(crops_per_field)
        ]
        for j in rng.permutation(len(tickets)):
            t = tickets[j]
            bucket = pending.setdefault(source.channels(t.key), [])
            bucket.append(t)
            if len(bucket) == batch_size:
                c = source.channels(t.key)
                batches.append(PlannedBatch(tuple(bucket), c, int(rng.integers(2**62))))
                pending[c] = []
    return batches


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
def dihedral(crop: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of the last two axes (k in 0..7)."""
    out = np.rot90(crop, k % 4, axes=(-2, -1))
    return out[..., ::-1] if k >= 4 else out


def gamma_jitter(crop: np.ndarray, log_gammas: np.ndarray) -> np.ndarray:
    """Per channel: rescale to [0, 1] by min/max, raise to ``exp(log_gamma)``, scale back."""
    out = np.empty(crop.shape, np.float32)
    for c, lg in enumerate(log_gammas):
        v = crop[c].astype(np.float32)
        lo, hi = float(v.min()), float(v.max())
        if hi > lo and lg != 0:
            out[c] = lo + (hi - lo) * ((v - lo) / (hi - lo)) ** np.float32(np.exp(lg))
        else:
            out[c] = v
    return out


def make_crop(
    field: np.ndarray, seed: int, size: int = 256, jitter: float = 0.2, augment: bool = True
) -> np.ndarray:
    """A random ``size`` crop of ``field`` (C, H, W) -> (C, size, size) float32, augmented with
    a random flip/rotation and per-channel gamma ~ exp(N(0, jitter))."""
    rng = np.random.default_rng(seed)
    field = tiling.pad_to_min(field, size)
    h, w = field.shape[-2:]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = field[:, y : y + size, x : x + size]
    if not augment:
        return crop.astype(np.float32)
    crop = dihedral(crop, int(rng.integers(8)))
    log_gammas = rng.normal(0.0, jitter, crop.shape[0]) if jitter > 0 else np.zeros(crop.shape[0])
    return gamma_jitter(crop, log_gammas)


def make_batch(
    crops: Sequence[np.ndarray],
    seed: int,
    subset_prob: float = 0.5,
    min_channels: int = 1,
) -> np.ndarray:
    """Stack crops (C, S, S) into (B, C', S, S) float32; with probability ``subset_prob`` every
    crop keeps its own random subset of C' channels, C' drawn from ``min_channels..C``."""
    batch = np.stack(crops).astype(np.float32, copy=False)  # (B, C, S, S)
    b, c = batch.shape[:2]
    rng = np.random.default_rng(seed)
    if subset_prob <= 0 or c <= min_channels or rng.random() >= subset_prob:
        return batch
    k = int(rng.integers(max(1, min_channels), c + 1))
    if k == c:
        return batch
    picks = [np.sort(rng.choice(c, size=k, replace=False)) for _ in range(b)]
    return np.stack([batch[i, p] for i, p in enumerate(picks)])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class FieldCache:
    """The last ``capacity`` fields read from a source (a field serves all crops of its window).

    A field that cannot be read is recorded in :attr:`errors` and replaced by the next readable
    field of the same batch.
    """

    def __init__(self, source: FieldSource, capacity: int = 32) -> None:
        self.source = source
        self.capacity = capacity
        self._fields: OrderedDict[Key, np.ndarray] = OrderedDict()
        self.errors: dict[Key, str] = {}

    def get(self, key: Key) -> np.ndarray | None:
        if key in self._fields:
            self._fields.move_to_end(key)
            return self._fields[key]
        if key in self.errors:
            return None
        try:
            field = self.source.read(key)
        except (OSError, ValueError) as exc:  # PlateError is a ValueError
            self.errors[key] = str(exc)
            logger.warning("skipping an unreadable field: %s", exc)
            return None
        self._fields[key] = field
        while len(self._fields) > self.capacity:
            self._fields.popitem(last=False)
        return field


def build_batch(
    cache: FieldCache,
    planned: PlannedBatch,
    size: int = 256,
    jitter: float = 0.2,
    subset_prob: float = 0.5,
    min_channels: int = 1,
) -> np.ndarray:
    """The augmented crops of one planned batch: (B, C', size, size) float32."""
    fields = [cache.get(t.key) for t in planned.tickets]
    good = [f for f in fields if f is not None]
    if not good:
        keys = ", ".join(map(str, (t.key for t in planned.tickets[:3])))
        raise ValueError(
            f"No field of a batch could be read ({keys} …): "
            + "; ".join(list(cache.errors.values())[-3:])
        )
    crops = []
    for i, (t, f) in enumerate(zip(planned.tickets, fields)):
        field = f if f is not None else good[i % len(good)]
        crops.append(make_crop(field, t.seed, size, jitter))
    return make_batch(crops, planned.seed, subset_prob, min_channels)


def iter_batches(
    source: FieldSource,
    plan: Sequence[PlannedBatch],
    prefetch: int = 2,
    cache: FieldCache | None = None,
    **batch_options: Any,
) -> Iterator[np.ndarray]:
    """Build the planned batches in order, ``prefetch`` of them ahead in a background thread
    (reading and augmentation overlap the training step). Closing the iterator stops the thread."""
    cache = cache or FieldCache(source)
    if prefetch <= 0:
        for planned in plan:
            yield build_batch(cache, planned, **batch_options)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crops")
    pending: deque[Future] = deque()
    todo = iter(plan)
    try:
        for planned in todo:
            pending.append(pool.submit(build_batch, cache, planned, **batch_options))
            if len(pending) >= prefetch:
                break
        while pending:
            batch = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(build_batch, cache, nxt, **batch_options))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def validation_crops(
    source: FieldSource, size: int = 256, max_crops: int = 64
) -> list[tuple[np.ndarray, Key]]:
    """Fixed validation crops: every field's tiling grid (:func:`napari_cellmae.tiling.crop_grid`),
    no augmentation, at most ``max_crops`` evenly chosen. Returns [(crop (C, S, S), key)]."""
    keys = source.val_keys()
    if len(keys) > max_crops:  # at most one field per crop is needed
        keys = [keys[i] for i in np.round(np.linspace(0, len(keys) - 1, max_crops)).astype(int)]
    out: list[tuple[np.ndarray, Key]] = []
    for key in keys:
        field = tiling.pad_to_min(source.read(key), size)
        for y, x in tiling.crop_grid(*field.shape[-2:], size):
            out.append((np.ascontiguousarray(field[:, y : y + size, x : x + size]), key))
    if len(out) > max_crops:
        out = [out[i] for i in np.round(np.linspace(0, len(out) - 1, max_crops)).astype(int)]
    return out
