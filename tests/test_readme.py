"""The README's front door works as written: its Python blocks run, its commands name only files the
repository ships (no paths that exist only on the development machines), its links resolve, and it stays
a user's guide (short, no counts that go stale) while measurements live in docs/."""

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
LIBRARY = [code for code in PYTHON if "tome.visualize(" in code]
CLIENT = [code for code in PYTHON if "from openai import OpenAI" in code]

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


def test_the_readme_has_the_library_and_the_embeddings_client_examples():
    assert len(LIBRARY) == 1 and len(CLIENT) == 1 and len(PYTHON) == 2


@pytest.mark.parametrize("code", LIBRARY, ids=[f"block{i}" for i in range(len(LIBRARY))])
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


def test_the_embeddings_client_example_runs_against_a_server(tiny_server: str, tmp_path: Path):
    """OpenAI's client against a real server with the tiny model (its name and address put in for the
    example's), from a folder that sees the repository's samples under the same relative path."""
    from serverutil import TINY_MODEL_KWARGS
    from tiny import NAME

    (code,) = CLIENT
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and 'model="vit_small_patch16_224"' in code
    local = code.replace("http://127.0.0.1:8000", tiny_server).replace("vit_small_patch16_224", NAME)
    (tmp_path / "server").symlink_to(REPO / "server")
    result = subprocess.run(
        [sys.executable, "-c", local], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    width, r, tokens = result.stdout.split(maxsplit=2)
    assert (int(width), int(r)) == (TINY_MODEL_KWARGS["embed_dim"], 8)
    assert tokens.startswith("{'input': 65, 'output': ")


def test_commands_name_only_files_the_repository_ships():
    assert "/work/" not in README and "../shared" not in README, "development-machine paths"
    commands = "\n".join(code for language, code in BLOCKS if language in ("bash", "sh", ""))
    shell = re.sub(r"(^|\s)#.*", "", commands)  # comments may name files of your own
    named = set(
        re.findall(r"(?<![\w/.-])((?:server|scripts|loadtest|deploy|bench|eval|tome|docs)/[\w./-]+)", shell)
    )
    named |= set(re.findall(r"(?:=|\s)@([\w./-]+)", shell))  # curl uploads: -F file=@x, --data-binary @x
    assert named, "expected the commands to name repository files"
    missing = sorted(path for path in named if not (REPO / path.rstrip(".")).exists())
    assert not missing, missing


DOCS = REPO / "docs"
PAGES = {"README.md": README} | {f"docs/{page.name}": page.read_text() for page in sorted(DOCS.glob("*.md"))}
# [text](target): relative targets only; http(s) and mailto links are not files of the repository.
LINK = re.compile(r"\[[^\]]*\]\((?!https?://|mailto:)([^)\s]+)\)")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0"}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    outside_code = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {slug(title) for title in re.findall(r"^#{1,6} (.+)$", outside_code, flags=re.MULTILINE)}


def resolves(base: Path, target: str, page: str) -> bool:
    """A link target (relative to the folder of the page it is on) names an existing file and heading."""
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else REPO / page
    if not file.exists():
        return False
    return not anchor or file.suffix != ".md" or anchor in anchors(file.read_text())


def test_the_readme_stays_a_guide_of_about_500_lines():
    lines = README.count("\n")
    assert lines <= 550, f"README.md has {lines} lines: move measurements and design notes to docs/"


def test_the_readme_states_no_test_counts():
    """Counts like "the suite has 419 tests" go stale with the next test added."""
    count = r"\b\d[\d,]*\s+(?:tests?|passed|failed|skipped|errors?)\b"
    counts = re.findall(count, README, flags=re.IGNORECASE)
    assert not counts, counts


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_relative_link_resolves(page: str):
    """Files and #anchors, from the README and from every docs page."""
    base = (REPO / page).parent
    broken = [target for target in LINK.findall(PAGES[page]) if not resolves(base, target, page)]
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(README)}
    orphans = sorted(page.name for page in DOCS.glob("*.md") if page.resolve() not in linked)
    assert not orphans, f"docs pages no README link leads to: {orphans}"


def test_urls_name_only_local_addresses():
    """The guide and the notes point at the server they describe, never at a package index."""
    for page, text in PAGES.items():
        hosts = set(re.findall(r"https?://([^/\s:'\"`)]+)", text))
        assert hosts <= LOCAL_HOSTS, (page, sorted(hosts - LOCAL_HOSTS))


def test_the_readme_quotes_the_torch_the_dockerfile_pins():
    dockerfile = (REPO / "Dockerfile").read_text()
    for arg in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        pinned = re.search(rf"^ARG {arg}=(\S+)$", dockerfile, flags=re.MULTILINE)
        assert pinned, f"the Dockerfile no longer pins {arg}"
        assert f"ARG {arg}={pinned[1]}" in README, f"README does not say the image pins {arg}={pinned[1]}"


def test_the_configuration_page_names_every_setting():
    """docs/configuration.md is where the README sends an operator for every setting."""
    from tome_serve.config import Settings

    page = (REPO / "docs" / "configuration.md").read_text()
    missing = [
        name
        for name in Settings.model_fields
        if f"`TOME_{name.upper()}`" not in page or f"`--{name.replace('_', '-')}`" not in page
    ]
    assert not missing, f"docs/configuration.md lacks the settings {missing}"


def test_the_metrics_page_names_every_metric_a_server_exports(tiny_server: str):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    exposition = httpx.get(f"{tiny_server}/metrics", timeout=30).text
    families = text_string_to_metric_families(exposition)
    exported = {f.name for f in families if f.name.startswith("tome_") and not f.name.endswith("_created")}
    page = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(tome_\w+)` \|", page, flags=re.MULTILINE))
    # prometheus_client names a counter's family without its _total suffix.
    missing = {name for name in exported if name not in documented and f"{name}_total" not in documented}
    assert exported and not missing, f"docs/metrics.md lacks {sorted(missing)}"
