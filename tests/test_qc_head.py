"""The QC head: detection on real fields, retraining from labels, file round trip, encoder checks.

The head under test (``qc_head_file`` in conftest) is trained on the random-weight test encoder
from synthetic artefacts of 24 transfluor crops (wells O01–O12); the fields it is tested on come
from other wells (O17) and from another plate (ExampleHuman).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_cellmae.qc.artefacts import ARTEFACTS, apply_artefact
from napari_cellmae.qc.head import CLASSES, DEFAULT_HEAD, QCHead
from napari_cellmae.qc.run import head_status
from napari_cellmae.qc.training import image_features, train_qc_head


@pytest.fixture(scope="module")
def model(test_model_dir):
    from napari_cellmae import load_model

    return load_model(test_model_dir, device="cpu")


@pytest.fixture(scope="module")
def head(qc_head_file) -> QCHead:
    return QCHead.load(qc_head_file)


def _read(folder, relpath):
    from napari_cellmae.plates import read_image

    return read_image(folder / relpath)[0]


def test_each_artefact_type_is_detected_on_a_real_field(head, model, real_data):
    plate = real_data / "transfluor-plate"
    names = [f"AS_09047_050428030001_O{w}f0{s}d2.TIF" for w in (17, 18) for s in (0, 1, 2)]
    clean = [_read(plate, n)[:256, :256] for n in names]  # the plate the field is judged in
    field = clean[2]  # O17 site 3
    kinds = list(ARTEFACTS)
    images = [*clean, *(apply_artefact(field, k, 4, seed=7) for k in kinds)]
    reference = np.arange(len(images)) < len(clean)
    p = head.predict_proba(image_features(images, head.spec, model, reference=reference))
    p = np.concatenate([p[2:3], p[len(clean) :]])  # the field, then its artefacts
    score = 1 - p[:, CLASSES.index("ok")]
    for i, kind in enumerate(kinds, start=1):
        predicted = CLASSES[1 + int(np.argmax(p[i, 1:]))]
        assert score[i] > 0.5, f"{kind} not flagged (score {score[i]:.2f})"
        assert score[i] > score[0] + 0.2, kind
        assert predicted == ARTEFACTS[kind].qc_class, f"{kind} called {predicted}"


def test_retraining_changes_verdicts_as_labelled(head, model, real_data):
    dna = _read(real_data, "ExampleHuman/AS_09125_050116030001_D03f00d0.tif")
    tiles = [dna[y : y + 256, x : x + 256] for y in (0, 256) for x in (0, 256)]
    x = image_features(tiles, head.spec, model)
    before = 1 - head.predict_proba(x)[:, 0]
    assert (before[:3] > 0.5).sum() >= 2  # another plate's clean nuclei look odd to this head

    new = train_qc_head(["ok"] * 3, model, base=head, features=x[:3])  # the user says: fine
    after = 1 - new.predict_proba(x)[:, 0]
    assert (after[:3] < 0.5).all()  # verdicts follow the labels
    assert after[3] < before[3]  # and move the unlabelled tile of the same plate too
    spoilt = [apply_artefact(tiles[3], k, 4, seed=7) for k in ("gaussian_blur", "noise", "empty")]
    ref = np.arange(7) < 4  # judged against the plate's (clean) tiles
    q = new.predict_proba(image_features(tiles + spoilt, head.spec, model, reference=ref))[4:]
    assert [CLASSES[i] for i in q.argmax(axis=1)] == ["blur", "noise", "empty"]  # still known
    assert new.training["new_labels"] == {"ok": 3} and new.encoder == head.encoder

    relabel = train_qc_head(["debris"], model, base=head, features=x[3:4])  # the other way
    assert CLASSES[int(relabel.predict_proba(x[3:4]).argmax())] == "debris"


def test_head_file_round_trip(head, model, tmp_path):
    x = np.random.default_rng(0).normal(size=(5, head.spec.n_features))
    path = head.save(tmp_path / "h.npz")
    assert path.stat().st_size < 1_000_000
    with np.load(path, allow_pickle=False) as npz:  # no pickled objects inside
        meta = json.loads(str(npz["meta"]))
        assert set(npz.files) >= {"coef", "intercept", "mean", "scale", "memory_x", "memory_y"}
    assert meta["encoder"] == {"name": model.name, "checksum": model.checksum}
    assert meta["classes"] == list(CLASSES)
    assert meta["spec"]["embed_dim"] == model.embed_dim == head.spec.embed_dim
    assert meta["spec"]["block"] == model.depth  # written down: the block its features came from
    assert meta["training"]["per_class"]["ok"] == 24
    again = QCHead.load(path)
    assert np.allclose(again.predict_proba(x), head.predict_proba(x))
    assert again.spec == head.spec and again.matches(model)
    with pytest.raises(ValueError, match=r"\.npz"):
        head.save(tmp_path / "h.pkl")
    (tmp_path / "bad.npz").write_bytes(b"not a head")
    with pytest.raises(ValueError, match="not a QC head"):
        QCHead.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="not found"):
        QCHead.load(tmp_path / "missing.npz")


def test_a_head_keeps_its_block_when_the_model_default_changes(head, model, real_data):
    from napari_cellmae.qc.head import spec_for

    assert spec_for(None).block is None and spec_for(model, block=1).block == 1
    image = _read(real_data / "transfluor-plate", "AS_09047_050428030001_O17f00d2.TIF")
    before = head.predict_proba(image_features([image], head.spec, model))
    old = model.default_block
    model.default_block = 1  # e.g. a new block selection written into the model folder
    try:
        assert spec_for(model).block == 1
        after = head.predict_proba(image_features([image], head.spec, model))
    finally:
        model.default_block = old
    np.testing.assert_allclose(after, before)


def test_checksum_mismatch_is_detected(head, model, tmp_path):
    import torch

    from napari_cellmae import load_model
    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model

    torch.manual_seed(1)
    save_model(create_model("cellmae_vit_test_patch16_256"), tmp_path / "other")
    other = load_model(tmp_path / "other", device="cpu")
    assert other.checksum != model.checksum
    assert head.matches(model) and not head.matches(other) and not head.matches(None)
    used, notice = head_status(head, other)
    assert used is None and "only the classic metrics" in notice and "Train a head" in notice
    assert head_status(head, model) == (head, "")
    with pytest.raises(ValueError, match="trained on encoder"):
        train_qc_head(tmp_path / "labels.csv", other, base=head)


def test_train_from_a_labels_csv_and_metrics_only_heads(model, real_data, tmp_path):
    import tifffile

    base = _read(real_data, "transfluor-plate/AS_09047_050428030001_O03f00d2.TIF")
    rows = ["path,class"]
    for i, (y, x) in enumerate(((0, 0), (0, 256), (256, 0), (256, 256))):
        crop = base[y : y + 256, x : x + 256]
        tifffile.imwrite(tmp_path / f"ok{i}.tif", crop)
        tifffile.imwrite(tmp_path / f"blur{i}.tif", apply_artefact(crop, "defocus", 4, seed=i))
        rows += [f"ok{i}.tif,ok", f"blur{i}.tif,Blur"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    head = train_qc_head(tmp_path / "labels.csv", model)
    assert head.classes == ("ok", "blur") and head.matches(model)
    assert head.training["per_class"] == {"ok": 4, "blur": 4}
    metrics_only = train_qc_head(tmp_path / "labels.csv")  # no model: classic features only
    assert not metrics_only.spec.uses_encoder and metrics_only.matches(None)
    test = [base[128:384, 128:384], apply_artefact(base[128:384, 128:384], "defocus", 4, seed=9)]
    for h in (head, metrics_only):
        p = h.predict_proba(image_features(test, h.spec, model, reference=np.array([1, 0], bool)))
        assert [CLASSES[int(i)] for i in p.argmax(axis=1)] == ["ok", "blur"]
    (tmp_path / "bad.csv").write_text("path,class\nok0.tif,smudge\n")
    with pytest.raises(ValueError, match="Unknown classes"):
        train_qc_head(tmp_path / "bad.csv", model)
    (tmp_path / "one.csv").write_text("path,class\nok0.tif,ok\n")
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_qc_head(tmp_path / "one.csv", model)


def test_the_default_head_ships_with_the_package():
    head = QCHead.load()
    assert head.path == str(DEFAULT_HEAD)
    assert head.spec.uses_encoder and head.encoder["checksum"]
    assert head.classes == CLASSES
    # trained for generalisation: every real source, judged only on what it sees alone
    assert set(head.training["sources"]) >= {
        "transfluor",
        "ExampleHuman",
        "bbbc022-cellpainting",
        "bbbc022-raw-imagexpress",
        "jump-pilot-phenix",
        "speckles",
    }
    assert not head.spec.relative
    assert "log_otsu_over_median" not in head.spec.metric_features  # scale- and Otsu-free
