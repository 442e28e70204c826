import json
import subprocess
import sys
from pathlib import Path

import pytest

from napari_cellmae import __version__
from napari_cellmae.cli import COMMANDS, build_parser, main


def test_version_in_process(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_command_documents_its_options(capsys):
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = capsys.readouterr().out
        assert f"cellmae {name}" in text
        assert "--help" in text


def test_info_json_in_process(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["napari_cellmae"] == __version__
    assert info["torch"]
    names = [d["name"] for d in info["devices"]]
    assert names[-1] == "cpu"
    cpu = info["devices"][-1]
    assert isinstance(cpu["bf16"], bool)
    assert cpu["total_memory_gib"] > 0
    # OpenPhenom is offered (not downloaded in the isolated test cache) with its attribution
    openphenom = [m for m in info["models"] if m["source"] == "recursionpharma/OpenPhenom"]
    assert openphenom and openphenom[0]["kind"] == "hub"
    assert "Recursion" in openphenom[0]["note"] and "non-commercial" in openphenom[0]["note"]


def test_cli_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "napari_cellmae", "info"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"napari-cellmae {__version__}" in out.stdout
    assert "devices:" in out.stdout and "cpu" in out.stdout
    # the console script installed beside this interpreter
    script = Path(sys.executable).with_name("cellmae")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and __version__ in version.stdout


def test_layout_help_names_every_layout():
    from napari_cellmae.commands._options import LAYOUT_NAMES
    from napari_cellmae.plates.layouts import LAYOUTS

    assert tuple(LAYOUTS) == LAYOUT_NAMES
