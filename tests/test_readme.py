"""The README's front door works as written: its Python blocks run, and its commands name only files the
repository ships (no paths that exist only on the development machines)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
PYTHON = [code for language, code in BLOCKS if language == "python"]

# The claims in the library example's comments, checked after it ran (random weights change no count).
CLAIMS = """
assert info.token_counts[0] == 189 and info.token_counts[-1] == 101, info.token_counts
assert info.sizes.shape == (1, 101) and info.source.shape == (1, 197)
assert tome.token_counts(197, 12, 16)[-2:] == [21, 11]
assert (tome.input_tokens(model), tome.largest_useful_r(model)) == (197, 24)
assert round(tome.gmacs(model, 16), 2) == 8.77 and round(tome.gmacs(model, 0), 2) == 17.56
row = tome.cost_table(model)[16]
assert (row.r, round(row.gmacs, 2), round(row.speedup, 2), row.output_tokens) == (16, 8.77, 2.0, 11)
from PIL import Image
assert Image.open("merge.png").size == (224, 224)
"""


def test_the_readme_has_the_library_example():
    assert len(PYTHON) == 1 and "tome.visualize(" in PYTHON[0]


@pytest.mark.parametrize("code", PYTHON, ids=[f"block{i}" for i in range(len(PYTHON))])
def test_python_block_runs_as_written(code: str, tmp_path: Path):
    """Run with pretrained=False (no model hub in tests), in a scratch folder that sees the repository's
    files under the same relative paths."""
    assert "pretrained=True" in code, "the example should show the real use"
    offline = code.replace("pretrained=True", "pretrained=False")
    (tmp_path / "server").symlink_to(REPO / "server")
    result = subprocess.run(
        [sys.executable, "-c", offline + CLAIMS], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_commands_name_only_files_the_repository_ships():
    assert "/work/" not in README and "../shared" not in README, "development-machine paths"
    commands = "\n".join(code for language, code in BLOCKS if language in ("bash", "sh", ""))
    shell = re.sub(r"(^|\s)#.*", "", commands)  # comments may name files of your own
    named = set(
        re.findall(r"(?<![\w/.-])((?:server|scripts|loadtest|deploy|bench|eval|tome|docs)/[\w./-]+)", shell)
    )
    named |= set(re.findall(r"@((?:server|docs)/[\w./-]+)", README))
    assert named, "expected the commands to name repository files"
    missing = sorted(path for path in named if not (REPO / path.rstrip(".")).exists())
    assert not missing, missing
