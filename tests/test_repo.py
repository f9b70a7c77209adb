"""Repository contracts: CI runs the README's test command verbatim; kernels install as megadistill.kernels."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
    return [line.strip() for b in blocks for line in b.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_has_exactly_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert "torch==2.13.0" in cmds[0] and "torch==2.13.0" in cmds[1]


def test_ci_runs_readme_test_command_verbatim():
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _quick_start_commands()[1] in ci_lines


def test_kernels_package_is_importable_under_megadistill():
    import megadistill.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
