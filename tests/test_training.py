"""MAE training core: lowers validation loss, resume, cancel, time budget, freezing, outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_cellmae import registry, training
from napari_cellmae.hub import load_model, read_state_dict, save_model
from napari_cellmae.model import CellMAE, CellMAEConfig
from napari_cellmae.progress import Cancelled, run
from napari_cellmae.synthetic import make_field
from napari_cellmae.training import (
    CHECKPOINT,
    Lion,
    TrainConfig,
    load_checkpoint,
    lr_factor,
    train,
)
from napari_cellmae.training_data import ArraySource

TEST_PRESET = "cellmae_vit_test_patch16_256"


@pytest.fixture(scope="module")
def fields() -> list[np.ndarray]:
    return [make_field(3, 256, seed=i) for i in range(5)]


def array_source(fields, val: bool = True) -> ArraySource:
    return ArraySource(fields[:4], val_fields=fields[4:] if val else [])


def tiny(tmp_path, **kw) -> TrainConfig:
    opts = {
        "out": str(tmp_path / "model"),
        "from_scratch": TEST_PRESET,
        "epochs": 2,
        "batch_size": 2,
        "crops_per_field": 2,
        "lr": 1e-3,
        "precision": "fp32",
        "val_crops": 2,
        "patience": None,
    }
    return TrainConfig(**{**opts, **kw})


def test_short_run_on_plates_lowers_val_loss_and_writes_a_registered_model(small_screen, tmp_path):
    plate, _ = small_screen
    cfg = tiny(tmp_path, plates=(str(plate),), batch_size=4, val_crops=4, name="my-model")
    events = []
    result = run(train(cfg), progress=events.append)
    m = result.metrics
    assert m["val_loss_best"] < m["val_loss_before"]  # training helped on held-out wells
    assert 0.5 < m["val_mean_fill"] < 1.5  # standardised units: mean-fill ≈ 1
    assert m["stopped"] == "epochs" and m["epochs"] == 2 and m["steps"] == len(result.steps)
    kinds = [e.payload["kind"] for e in events]
    assert kinds[:2] == ["start", "val"] and kinds.count("epoch") == 2
    step = next(e for e in events if e.payload["kind"] == "step")
    assert {"epoch", "step", "train_loss", "val_loss", "lr"} <= set(step.payload)
    assert step.total == m["steps"] and events[-1].done == m["steps"]
    # the model folder: loads, carries its card, is offered by every picker
    model = load_model(result.folder, device="cpu")
    assert model.name == "my-model" and model.channel_names is not None
    cfg_json = json.loads((result.folder / "config.json").read_text())
    training = cfg_json["training"]
    assert training["data"]["kind"] == "plate folders" and training["data"]["val_wells"] == 2
    assert training["recipe"]["mask_ratio"] == 0.75 and training["metrics"]["steps"] == m["steps"]
    assert "Trained from scratch" in (result.folder / "README.md").read_text()
    assert str(result.folder.resolve()) in [e.source for e in registry.list_models()]
    # the best weights were kept: the folder reproduces the best validation loss's weights
    best, _ = read_state_dict(result.checkpoint_dir / "best" / "model.safetensors")
    saved, _ = read_state_dict(result.folder / "model.safetensors")
    assert all(torch.equal(best[k], saved[k]) for k in best)


def test_resume_continues_the_same_trajectory(fields, tmp_path):
    full = run(train(tiny(tmp_path / "a"), array_source(fields)))
    assert full.metrics["steps"] == 8  # 4 fields × 2 crops / batch 2 × 2 epochs

    gen = train(tiny(tmp_path / "b"), array_source(fields))
    for event in gen:
        if event.payload["kind"] == "step" and event.payload["step"] == 5:
            break  # mid-epoch 2
    gen.close()  # what Cancel does
    ckpt = load_checkpoint(tmp_path / "b" / "model-checkpoints" / CHECKPOINT)
    assert ckpt["state"]["global_step"] == 5 and ckpt["state"]["step_in_epoch"] == 1
    assert not (tmp_path / "b" / "model").exists()

    # the resumed run's first event carries what the cancelled session recorded
    start = next(train(tiny(tmp_path / "b", resume=True), array_source(fields))).payload
    assert start["kind"] == "start" and [s[0] for s in start["steps_so_far"]] == [1, 2, 3, 4, 5]
    assert [h["step"] for h in start["history"]] == [0, 4]  # start + epoch 1 validations
    resumed = run(train(tiny(tmp_path / "b", resume=True), array_source(fields)))
    assert resumed.metrics["steps"] == 8
    np.testing.assert_allclose(
        np.array(resumed.steps)[:, 1], np.array(full.steps)[:, 1], rtol=1e-5
    )  # same losses, step for step
    a, _ = read_state_dict(full.folder / "model.safetensors")
    b, _ = read_state_dict(resumed.folder / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_moved_run_resumes_into_its_new_folder_and_never_over_another_model(fields, tmp_path):
    gen = train(tiny(tmp_path / "a"), array_source(fields))
    for event in gen:
        if event.payload["kind"] == "step" and event.payload["step"] == 3:
            break
    gen.close()
    shutil.move(tmp_path / "a", tmp_path / "b")  # the user moved the run folder
    (tmp_path / "other" / "model").mkdir(parents=True)
    (tmp_path / "other" / "model" / "config.json").write_text("{}")  # someone else's model
    other = tiny(
        tmp_path / "other", resume=True, checkpoint_dir=str(tmp_path / "b" / "model-checkpoints")
    )
    with pytest.raises(ValueError, match="already holds a model that this run did not make"):
        run(train(other, array_source(fields)))
    assert (tmp_path / "other" / "model" / "config.json").read_text() == "{}"

    resumed = run(train(tiny(tmp_path / "b", resume=True), array_source(fields)))
    assert resumed.folder == tmp_path / "b" / "model" and resumed.metrics["steps"] == 8
    saved = json.loads((resumed.folder / "config.json").read_text())["training"]["metrics"]
    assert saved["steps"] == 8
    assert not (tmp_path / "a").exists()  # nothing written where the run used to be
    # extending a finished run (a larger budget) rewrites the run's own model
    longer = run(train(tiny(tmp_path / "b", resume=True, epochs=3), array_source(fields)))
    assert longer.folder == resumed.folder and longer.metrics["steps"] == 12


def test_cancel_leaves_a_usable_checkpoint(fields, tmp_path):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(Cancelled, match="resume"):
        run(train(tiny(tmp_path, epochs=3), array_source(fields), should_stop=should_stop))
    ckdir = tmp_path / "model-checkpoints"
    ckpt = load_checkpoint(ckdir / CHECKPOINT)
    assert ckpt["state"]["global_step"] == 3
    module = CellMAE(CellMAEConfig.from_dict(ckpt["architecture"]))
    module.load_state_dict(ckpt["model"])  # the weights load as they are
    assert load_model(ckdir / "best", device="cpu").depth == 2  # best so far: a model folder
    # a new run refuses to overwrite it; --resume finishes it
    with pytest.raises(ValueError, match="--resume"):
        next(train(tiny(tmp_path, epochs=3), array_source(fields)))
    result = run(train(tiny(tmp_path, epochs=3, resume=True), array_source(fields)))
    assert result.metrics["steps"] == 12 and (tmp_path / "model" / "config.json").is_file()
    with pytest.raises(ValueError, match="already holds a model"):
        next(train(tiny(tmp_path, epochs=3), array_source(fields)))


def test_time_budget_is_respected(fields, tmp_path, monkeypatch):
    # a clock that advances 0.1 s per reading: the budget logic, not this machine's speed
    ticks = iter(range(10**6))
    monkeypatch.setattr(training, "_clock", lambda: 0.1 * next(ticks))
    cfg = tiny(tmp_path, epochs=1000, minutes=0.01, patience=None)  # 0.6 s
    result = run(train(cfg, array_source(fields)))
    m = result.metrics
    assert m["stopped"] == "minutes"
    assert m["steps"] == 6  # the step that reaches 0.6 s is the last
    assert m["seconds"] == pytest.approx(0.6)
    lrs = [s[2] for s in result.steps]
    assert lrs[0] > 0  # warm-up starts above 0
    # the schedule followed the time budget (not the 1000 epochs) into its cosine decay
    assert lrs[-1] < 0.5 * max(lrs)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("option", ["freeze_blocks", "norms+last"])
def test_freeze_options_freeze_what_they_say(option, test_model_dir, fields, tmp_path):
    kw = {"freeze_blocks": 1} if option == "freeze_blocks" else {"train_only": "norms+last"}
    cfg = tiny(tmp_path, from_scratch=None, source=str(test_model_dir), epochs=1, **kw)
    result = run(train(cfg, array_source(fields, val=False)))
    before, _ = read_state_dict(test_model_dir / "model.safetensors")
    after, _ = read_state_dict(result.folder / "model.safetensors")
    changed = _changed(before, after)
    assert any(k.startswith("decoder.") for k in changed)  # the decoder always trains
    encoder = {k for k in changed if k.startswith(("blocks.", "patch_embed.", "cls_token"))}
    if option == "freeze_blocks":
        assert not any(k.startswith(("blocks.0.", "patch_embed.", "cls_token")) for k in changed)
        assert any(k.startswith("blocks.1.") for k in encoder)
        assert result.metrics["trainable"] < result.metrics["parameters"]
    else:
        assert all(k.startswith("blocks.1.") or "norm" in k for k in encoder)
        assert any(k.startswith("blocks.0.") and "norm" in k for k in encoder)
        assert not any(k.startswith("blocks.0.in_proj") for k in changed)
    # inherits from its start
    card = json.loads((result.folder / "config.json").read_text())
    assert card["derived_from"]["checksum"] == load_model(test_model_dir).checksum


def test_a_trained_model_embeds_as_its_start_did(test_model_dir, fields, tmp_path):
    # the bundled model embeds channelwise with plate normalisation at block 1: a model trained
    # from it must too (or its embeddings and probes silently change to mean / per-crop)
    start = tmp_path / "start"
    shutil.copytree(test_model_dir, start)
    cfg_path = start / "config.json"
    saved = json.loads(cfg_path.read_text())
    extra = {"best_block": 1, "default_pooling": "channelwise", "default_normalization": "plate"}
    cfg_path.write_text(json.dumps({**saved, **extra}))
    cfg = tiny(tmp_path, from_scratch=None, source=str(start), epochs=1)
    result = run(train(cfg, array_source(fields, val=False)))
    card = json.loads((result.folder / "config.json").read_text())
    assert {k: card.get(k) for k in extra} == extra
    tuned = load_model(result.folder)
    assert (tuned.default_block, tuned.default_pooling, tuned.default_normalization) == (
        1,
        "channelwise",
        "plate",
    )


def test_fixed_channel_decoder_needs_its_channel_count(fields, tmp_path):
    config = CellMAEConfig(
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        decoder_cross_heads=2,
        decoder_channels=2,
    )
    folder = save_model(CellMAE(config), tmp_path / "two-channel")
    cfg = tiny(tmp_path, from_scratch=None, source=str(folder))
    with pytest.raises(ValueError, match="exactly 2 channels"):
        run(train(cfg, array_source(fields)))


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--out"):
        TrainConfig()
    with pytest.raises(ValueError, match="not a preset"):
        TrainConfig(out="x", from_scratch="vit_huge")
    with pytest.raises(FileNotFoundError, match="without --resume"):
        next(train(TrainConfig(out=str(tmp_path / "m"), resume=True)))


def test_lion_and_schedule():
    assert lr_factor(0.0, 0.1, 0.01) == 0.0 and lr_factor(0.05, 0.1, 0.0) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.01) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.01) == pytest.approx(0.01)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt.step()  # first step: sign of the gradient
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 0.5]))
