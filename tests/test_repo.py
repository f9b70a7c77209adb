"""Repository contracts: CI runs the README's test command verbatim; kernels install as megadistill.kernels."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    # Fences are paired in order; shell blocks (```bash, ```sh or bare) hold commands, others (```text:
    # example output) do not.
    commands, lang = [], None
    for line in section.splitlines():
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            lang = fence.group(1) if lang is None else None
        elif lang in ("", "bash", "sh") and line.strip() and not line.startswith("#"):
            commands.append(line.strip())
    return commands


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
