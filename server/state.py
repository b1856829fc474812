"""The state folder (``TOME_STATE_DIR``): what a lane measured, kept between starts.

r=auto's timing table takes ``TOME_AUTO_WARMUP_S`` to measure at every start (20 s by default: most of
a ViT-S/16 server's start on a 2-core CPU). What it measures depends only on the model and its
weights, the dtype, the hardware, the torch and timm versions and the thread plan that runs it, so a
process started with all of these the same can begin from the table the last one kept, and re-check
it in the background once it is ready.

Each lane's state is one JSON file named by a hash of its :class:`StateKey`, the key itself inside for
checking, and named sections: "timings" (``timings.tables_to_json``: r=auto's timing table of each
merge rule, keyed by rule; a file from before tables per rule is measured over), and any other table
a lane keeps (a section this process does not provide is written back as it was read). Files are replaced
atomically (a temporary file in the same folder, then ``os.replace``), so pods that share the folder
never read half a file; the last writer wins. A missing, corrupt or foreign file is logged and
ignored (the lane measures as if there were none, then writes a good one); a failed write is a
warning, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tome_runtime.hardware import cpu_flags, cpu_name
from tome_runtime.weights import RANDOM_SEED

from .config import Settings
from .loading import LoadedModel

log = logging.getLogger(__name__)

FORMAT = 1
"""The file layout's version: a file of another version is ignored."""

ISA_FLAGS = frozenset(
    {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}
    | {"asimd", "sve", "sve2", "bf16", "i8mm"}
)
"""CPU features torch's kernels dispatch on. A VM's CPU name can be as generic as "Intel(R) Xeon(R)
Processor", which does not tell two generations apart; these flags do."""


@dataclass(frozen=True)
class StateKey:
    """Everything a lane's measured state depends on: a file is used only when all of it matches."""

    model: str
    model_kwargs: dict[str, Any]
    weights: str
    """``random (seed N)``, or a digest of the loaded weights (whatever file or hub they came from)."""
    dtype: str
    device: str
    processor: str
    """The CPU's model name, or the GPU's name."""
    isa: list[str]
    """The CPU's :data:`ISA_FLAGS` (empty on a GPU)."""
    torch: str
    timm: str
    max_batch_size: int
    r_grid: list[int]
    """The timing table's grid of r (the auto ceiling decides it)."""
    instances: int
    torch_threads: int

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{_slug(self.model)}-{self.digest[:16]}.json"

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """What differs from another file's key, as ``field: here vs there``."""
        mine = self.as_json()
        return [
            f"{name}: {mine[name]!r} here vs {other.get(name)!r}"
            for name in mine
            if mine[name] != other.get(name)
        ]


def lane_key(
    model: LoadedModel, settings: Settings, r_grid: tuple[int, ...], instances: int, torch_threads: int
) -> StateKey:
    """The key of one lane's state (hashes the weights unless they are the seeded random ones)."""
    return StateKey(
        model=model.name,
        model_kwargs=dict(settings.model_kwargs),
        weights=weights_digest(model.module, model.weights),
        dtype=model.dtype_name,
        device=model.device.type,
        processor=processor_name(model.device),
        isa=[] if model.device.type == "cuda" else sorted(cpu_flags() & ISA_FLAGS),
        torch=torch.__version__,
        timm=timm.__version__,
        max_batch_size=settings.max_batch_size,
        r_grid=list(r_grid),
        instances=instances,
        torch_threads=torch_threads,
    )


def weights_digest(module: nn.Module, weights: str) -> str:
    """``random`` weights are the seed's (same torch and timm: same tensors); any others are hashed
    from the loaded tensors, so the same weights match whatever path or hub they came from."""
    if weights == "random":
        return f"random (seed {RANDOM_SEED})"
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().data)
    return f"sha256:{digest.hexdigest()}"


def processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() or "unknown CPU"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class StateFolder:
    """The folder of state files (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, key: StateKey) -> dict[str, Any]:
        """The sections of ``key``'s file; {} when there is none that can be used (logged why)."""
        path = self.path / key.file_name
        try:
            text = path.read_text()
        except FileNotFoundError:
            log.info("%s: no saved state in %s (%s)", key.model, self.path, self._others(key))
            return {}
        except OSError as exc:
            log.warning("%s: cannot read %s, measuring instead: %s", key.model, path, exc)
            return {}
        try:
            return _sections(text, key)
        except ValueError as exc:
            log.warning("%s: ignoring %s: %s", key.model, path, exc)
            return {}

    def write(self, key: StateKey, sections: Mapping[str, Any]) -> bool:
        """Replace ``key``'s file with ``sections`` atomically; False (logged) when it cannot."""
        payload = {"format": FORMAT, "key": key.as_json(), "written": time.time(), "sections": sections}
        text = json.dumps(payload, indent=1, sort_keys=True, allow_nan=False)
        temporary = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path, prefix=f".{key.file_name}.", suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o644)  # other pods may run as another user
            os.replace(temporary, self.path / key.file_name)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot save the state to %s: %s", key.model, self.path, exc)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            return False
        return True

    def _others(self, key: StateKey) -> str:
        """Why the files kept for the same model do not fit, for the log."""
        reasons = []
        for path in sorted(self.path.glob(f"{_slug(key.model)}-*.json"))[:4]:
            try:
                other = json.loads(path.read_text())["key"]
                reasons.append(f"{path.name} was measured with {'; '.join(key.differences(other))}")
            except (OSError, ValueError, KeyError, TypeError):
                reasons.append(f"{path.name} is unreadable")
        return "; ".join(reasons) or "none kept for this model yet"


def _sections(text: str, key: StateKey) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not a state file of format {FORMAT}")
    if payload.get("key") != key.as_json():
        raise ValueError(f"made for another key ({'; '.join(key.differences(payload.get('key') or {}))})")
    sections = payload.get("sections")
    if not isinstance(sections, dict):
        raise ValueError("it has no sections")
    return sections


class LaneState:
    """One lane's state file: the sections read at start, and the named providers whose sections
    :meth:`save` writes (a loaded section nobody provides is kept as it was)."""

    def __init__(self, folder: StateFolder, key: StateKey) -> None:
        self.folder, self.key = folder, key
        self.loaded = folder.read(key)
        self._providers: dict[str, Callable[[], Any]] = {}

    @property
    def path(self) -> Path:
        return self.folder.path / self.key.file_name

    def section(self, name: str) -> Any | None:
        return self.loaded.get(name)

    def discard(self, name: str, why: str) -> None:
        """A loaded section that turned out unusable: logged, and not written back."""
        log.warning("%s: ignoring the %r section of %s: %s", self.key.model, name, self.path, why)
        self.loaded.pop(name, None)

    def provide(self, name: str, provider: Callable[[], Any]) -> None:
        self._providers[name] = provider

    def save(self) -> bool:
        sections = {**self.loaded, **{name: provider() for name, provider in self._providers.items()}}
        return self.folder.write(self.key, sections)


class Keeper:
    """A thread that runs ``first`` (a background re-check) once, then saves the lane's state every
    ``every_s`` and once more at :meth:`stop`, so a node's next pod starts from a current table."""

    def __init__(
        self,
        state: LaneState,
        first: Callable[[threading.Event], None] | None = None,
        every_s: float = 300.0,
    ) -> None:
        self.state, self._first, self._every_s = state, first, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"state-{state.key.model}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ends the thread (a re-check batch running finishes first), then saves."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.state.save()

    def _run(self) -> None:
        if self._first is not None:
            try:
                self._first(self._stop)
            except Exception:  # a failed re-check leaves the loaded table, which is still valid
                log.exception("%s: the background re-check failed", self.state.key.model)
            self.state.save()
        while not self._stop.wait(self._every_s):
            self.state.save()
