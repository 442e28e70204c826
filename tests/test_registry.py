import json

import pytest

from napari_cellmae import registry


def test_register_and_list_local_model(tmp_path):
    folder = tmp_path / "my-finetuned"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        registry.register_model(folder)
    (folder / "config.json").write_text("{}")
    registry.register_model(folder)
    entries = {e.source: e for e in registry.list_models()}
    assert entries[str(folder.resolve())].kind == "local"
    # a deleted folder disappears from the list
    (folder / "config.json").unlink()
    assert str(folder.resolve()) not in {e.source for e in registry.list_models()}


def test_hub_cache_snapshot_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snap = tmp_path / "models--recursionpharma--OpenPhenom" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"mask_ratio": 0.0}))
    assert registry.hub_snapshot("recursionpharma/OpenPhenom") == snap
    entries = [e for e in registry.list_models() if e.source == "recursionpharma/OpenPhenom"]
    assert [e.kind for e in entries] == ["hub-cached"]
    assert "non-commercial" in entries[0].note


def test_attribution_only_for_openphenom():
    assert "Recursion" in registry.attribution_for("recursionpharma/OpenPhenom")
    assert "Recursion" in registry.attribution_for("/data/models/OpenPhenom-snapshot")
    assert registry.attribution_for("cellmae-tiny") == ""
