"""Repository contracts: CI runs the README's test command verbatim; kernels/ is megadistill.kernels."""
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


def test_kernels_folder_is_megadistill_kernels_and_shadows_nothing():
    """``kernels/`` is searched by ``megadistill.kernels``; it is not a top-level package, so with the
    repository root on sys.path ``import kernels`` still finds Hugging Face's (transformers needs it)."""
    import importlib.util
    import sys

    import megadistill.kernels as k

    assert str(ROOT / "kernels") in k.__path__
    assert not (ROOT / "kernels" / "__init__.py").exists()
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.find_spec("kernels")
    finally:
        sys.path.remove(str(ROOT))
    assert spec is not None and spec.origin is not None and ROOT not in Path(spec.origin).resolve().parents, spec
