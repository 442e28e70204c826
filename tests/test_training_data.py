"""Training data: well-level splits, epoch plans, augmentation, loading."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cellmae.training_data import (
    ArraySource,
    ConcatSource,
    GeneratorSource,
    PlateSource,
    build_batch,
    dihedral,
    epoch_plan,
    gamma_jitter,
    iter_batches,
    make_batch,
    make_crop,
    validation_crops,
)


def test_plate_source_splits_by_well(small_screen):
    plate, _ = small_screen
    src = PlateSource([plate], val_fraction=0.25, seed=0)
    train_wells = {src.fields[k[1]][1]["Metadata_Well"] for k in src.train_keys(0)}
    val_wells = {src.fields[k[1]][1]["Metadata_Well"] for k in src.val_keys()}
    assert len(val_wells) == 2 and len(train_wells) == 6 and not train_wells & val_wells
    assert src.read(src.val_keys()[0]).shape == (3, 256, 256)
    assert src.describe()["val_wells"] == 2 and len(src.channel_names) == 3
    assert PlateSource([plate], val_fraction=0.25, seed=1).val_keys() != src.val_keys()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PlateSource([plate / "nope"])


def test_split_needs_two_groups():
    fields = [np.zeros((2, 64, 64), np.uint16)] * 3
    with pytest.raises(ValueError, match="val_fraction=0"):
        ArraySource(fields, groups=["w1"] * 3, val_fraction=0.3)
    src = ArraySource(fields, groups=["w1", "w1", "w2"], val_fraction=0.3)
    assert len(src.val_keys()) in (1, 2) and len(src.train_keys(0)) == 3 - len(src.val_keys())


def test_epoch_plan_is_deterministic_and_groups_channel_counts():
    fields = [np.zeros((c, 64, 64), np.float32) for c in (1, 2, 3, 2, 1, 3)]
    src = ArraySource(fields, repeats=2)
    plan = epoch_plan(src, epoch=0, seed=0, batch_size=2, crops_per_field=3)
    assert plan == epoch_plan(src, epoch=0, seed=0, batch_size=2, crops_per_field=3)
    assert plan != epoch_plan(src, epoch=1, seed=0, batch_size=2, crops_per_field=3)
    assert len(plan) == 6 * 2 * 3 // 2  # every channel count fills whole batches here
    for batch in plan:
        assert {src.channels(t.key) for t in batch.tickets} == {batch.channels}
    # a batch mixes crops of several fields
    assert any(len({t.key for t in b.tickets}) > 1 for b in plan)


def test_generator_and_concat_sources():
    def make(seed, c):
        return np.random.default_rng(seed).random((c, 64, 80)).astype(np.float32)

    gen = GeneratorSource(make, fields_per_epoch=4, val_fields=2, n_channels=(2, 5), seed=3)
    assert gen.train_keys(0) != gen.train_keys(1)  # fresh fields every epoch
    key = gen.train_keys(0)[0]
    np.testing.assert_array_equal(gen.read(key), gen.read(key))  # same seed, same field
    assert gen.read(key).shape[0] == gen.channels(key) in (2, 5)
    both = ConcatSource(gen, ArraySource([make(0, 3)], val_fields=[make(1, 3)]))
    assert len(both.train_keys(0)) == 5 and len(both.val_keys()) == 3
    assert both.channels(both.val_keys()[-1]) == 3
    crops = validation_crops(both, size=32, max_crops=5)
    assert len(crops) == 5 and all(c.shape[1:] == (32, 32) for c, _ in crops)


def test_augmentations():
    img = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    outs = {dihedral(img, k).tobytes() for k in range(8)}
    assert len(outs) == 8  # 8 distinct flips/rotations
    g = gamma_jitter(img, np.array([np.log(2.0), 0.0]))
    assert g[0].min() == img[0].min() and g[0].max() == img[0].max()  # range kept
    assert (g[0] <= img[0] + 1e-4).all() and not np.allclose(g[0], img[0])  # gamma 2 darkens
    np.testing.assert_allclose(g[1], img[1])
    field = np.random.default_rng(0).integers(0, 4096, (3, 300, 200), dtype=np.uint16)
    crop = make_crop(field, seed=1, size=256)  # 200 < 256: reflect-padded
    assert crop.shape == (3, 256, 256) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop, make_crop(field, seed=1, size=256))
    crops = [crop] * 4
    subset = [make_batch(crops, seed=s, subset_prob=1.0, min_channels=1) for s in range(20)]
    assert {b.shape[1] for b in subset} > {3}  # subsets of 1 or 2 channels occur
    assert all(
        make_batch(crops, seed=s, subset_prob=0.0).shape == (4, 3, 256, 256) for s in range(5)
    )


def test_unreadable_field_is_replaced_and_recorded(tmp_path):
    class Flaky(ArraySource):
        def read(self, key):
            if key == ("train", 1):
                raise OSError("disk error")
            return super().read(key)

    fields = [np.full((2, 64, 64), i, np.float32) + np.eye(64, dtype=np.float32) for i in range(3)]
    src = Flaky(fields)
    plan = epoch_plan(src, 0, 0, batch_size=3, crops_per_field=1)
    batches = list(iter_batches(src, plan, size=32, jitter=0.0, subset_prob=0.0))
    assert batches and batches[0].shape == (3, 2, 32, 32)
    from napari_cellmae.training_data import FieldCache

    cache = FieldCache(src)
    build_batch(cache, plan[0], size=32)
    assert list(cache.errors) == [("train", 1)]
