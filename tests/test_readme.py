"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_section = readme.split("## Run the tests", 1)[1]
    test_command = _bash_blocks(test_section)[0]
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines, "CI must run exactly the README's test command"


def test_readme_run_command_opens_the_panel():
    readme = (ROOT / "README.md").read_text()
    run_command = _bash_blocks(readme.split("## Run it", 1)[1])[0]
    assert run_command.startswith("python3 -m venv .venv")
    assert "pip install torch==2.13.0" in run_command
    assert run_command.endswith("napari -w napari-cellmae")
    assert (ROOT / "docs" / "images" / "panel.png").is_file()
