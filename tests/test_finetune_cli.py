"""`cellmae finetune`: in-process (probes, report, JSON events) and as a real subprocess (graceful
stop through stdin, then --resume)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from napari_cellmae import registry
from napari_cellmae.cli import main
from napari_cellmae.hub import load_model

TEST_PRESET = "cellmae_vit_test_patch16_256"


def _args(plate, out, *extra: str) -> list[str]:
    return [
        "finetune",
        str(plate),
        "--from-scratch",
        TEST_PRESET,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--crops-per-field",
        "2",
        "--lr",
        "1e-3",
        "--val-crops",
        "2",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *extra,
    ]


def test_finetune_with_probes_report_and_json_events(small_screen, tmp_path, capsys):
    plate, platemap = small_screen
    out = tmp_path / "tuned"
    args = ["--platemap", str(platemap), "--label-column", "Metadata_Perturbation"]
    assert main(_args(plate, out, *args, "--html", "--progress-json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [line["event"] for line in lines]
    assert kinds[-1] == "done" and kinds.count("probes") == 2
    steps = [x for x in lines if x["event"] == "progress" and x["payload"]["kind"] == "step"]
    assert steps and {"epoch", "step", "train_loss", "lr"} <= set(steps[0]["payload"])
    done = lines[-1]
    assert done["folder"] == str(out) and done["metrics"]["steps"] == 3
    # block search stored in the model: embed() uses it by default
    cfg = json.loads((out / "config.json").read_text())
    probes = [x for x in lines if x["event"] == "probes"]
    assert cfg["best_block"] == probes[1]["best_block"] == load_model(out).default_block
    assert set(cfg["probes"]["accuracy_per_block"]) == {"1", "2"}
    assert "## Linear probes" in (out / "README.md").read_text()
    report = out / "report"
    for name in ("report.md", "report.html", "loss.png", "probes.png", "examples.png"):
        assert (report / name).stat().st_size > 100, name
    assert "probe accuracy, fine-tuned" in (report / "report.md").read_text()
    assert str(out.resolve()) in [m.source for m in registry.list_models()]


def test_finetune_errors_are_one_line(small_screen, tmp_path, capsys):
    plate, platemap = small_screen
    assert main(_args(plate, tmp_path / "m", "--platemap", str(platemap))) == 2
    assert "--label-column go together" in capsys.readouterr().err
    assert (
        main(_args(plate, tmp_path / "m", "--train-only", "norms+last", "--freeze-blocks", "9"))
        == 2
    )
    assert "freeze_blocks 9" in capsys.readouterr().err
    bad = ["--platemap", str(platemap), "--label-column", "Metadata_Nope"]
    assert main(_args(plate, tmp_path / "m2", *bad)) == 2
    assert "Metadata_Nope" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()  # refused before training


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--from",
        "--from-scratch",
        "--minutes",
        "--freeze-blocks",
        "--train-only",
        "--resume",
        "--platemap",
        "--label-column",
        "--progress-json",
        "--device",
        "--batch-size",
        "torchrun",
    ):
        assert option in text, option


def test_subprocess_stops_gracefully_on_stdin_and_resumes(small_screen, tmp_path):
    plate, _ = small_screen
    out = tmp_path / "sub"
    cmd = [sys.executable, "-m", "napari_cellmae.cli", *_args(plate, out, "--progress-json")]
    cmd[cmd.index("--epochs") + 1] = "50"
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1]["payload"]["kind"] == "step":
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        assert time.monotonic() - t0 < 120
    assert proc.wait(timeout=60) == 130
    assert events[-1]["event"] == "cancelled"
    assert (tmp_path / "sub-checkpoints" / "last.pt").is_file() and not out.exists()
    steps = [e for e in events if e["event"] == "progress" and e["payload"]["kind"] == "step"]
    assert len(steps) < 5  # stopped right after the request, not at the end
    # resume in-process with a smaller budget: continues from the checkpoint
    resumed = _args(plate, out, "--resume", "--no-report")
    resumed[resumed.index("--epochs") + 1] = "1"
    assert main(resumed) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["metrics"]["steps"] == 3
