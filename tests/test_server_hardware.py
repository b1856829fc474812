"""``--dtype auto``: bfloat16 only where the hardware computes it natively."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tome_runtime.hardware import (
    DeviceError,
    auto_dtype,
    cpu_bf16_reason,
    cpu_flags,
    cpu_name,
    resolve_device,
    resolve_dtype,
)
from tome_serve.inference import ForwardGate
from tome_serve.loading import StartupError
from tome_serve.loading import resolve_device as server_device
from tome_serve.threads import plan_threads, usable_cores

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics\n"


@pytest.mark.parametrize(
    ("cpuinfo", "dtype", "flag"),
    [
        (ZEN4, torch.bfloat16, "avx512_bf16"),
        (SAPPHIRE, torch.bfloat16, "amx_bf16"),
        (SKYLAKE, torch.float32, None),
        (GRAVITON3, torch.bfloat16, "bf16"),
        (GRAVITON2, torch.float32, None),
        ("", torch.float32, None),
    ],
)
def test_cpu_choice_follows_the_flags(cpuinfo: str, dtype: torch.dtype, flag: str | None) -> None:
    choice = auto_dtype("cpu", cpuinfo=cpuinfo)
    assert choice.dtype == dtype
    if flag is not None:
        assert flag in choice.reason
    else:
        assert "no native bfloat16" in choice.reason


def test_cpu_name_is_the_kernels_model_name() -> None:
    assert cpu_name("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t: avx2\n") == (
        "AMD EPYC 9R14 96-Core Processor"
    )


def test_flags_are_those_of_the_first_processor() -> None:
    assert cpu_flags(SKYLAKE + "\n" + SAPPHIRE) == {"avx2", "avx512f", "avx512bw", "avx512_vnni"}
    assert cpu_bf16_reason({"avx512f"}) is None


def test_this_machine_agrees_with_its_cpuinfo() -> None:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = cpu_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert (auto_dtype("cpu").dtype == torch.bfloat16) == native


def test_cuda_needs_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    assert auto_dtype("cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))  # T4: emulated only
    assert auto_dtype("cuda").dtype == torch.float32


def test_missing_cuda_is_one_error_that_the_server_reports_at_start_up(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == server_device("cpu")
    with pytest.raises(DeviceError, match="PyTorch sees no CUDA device; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(StartupError, match="PyTorch sees no CUDA device; use --device cpu"):
        server_device("cuda")


def test_explicit_choices_pass_through() -> None:
    assert resolve_dtype("float32", "cpu").dtype == torch.float32
    assert resolve_dtype("bfloat16", "cpu").reason == "set explicitly"
    assert resolve_dtype("auto", "cpu").dtype in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    assert auto_dtype("meta").dtype == torch.float32


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(1, (1, 1, 1)), (2, (2, 1, 1)), (4, (4, 1, 1)), (8, (2, 4, 2)), (16, (4, 4, 4)), (6, (1, 4, 1))],
)
def test_auto_threads_follow_the_cores(cores: int, expected: tuple[int, int, int]) -> None:
    plan = plan_threads("auto", "auto", "auto", "cpu", cores=cores)
    assert (plan.instances, plan.torch_threads, plan.preprocess_threads) == expected
    assert f"{cores} cores" in plan.reason


def test_explicit_thread_settings_are_kept_and_fill_the_rest() -> None:
    plan = plan_threads(3, 2, 5, "cpu", cores=8)
    assert (plan.instances, plan.torch_threads, plan.preprocess_threads) == (3, 2, 5)
    assert plan.reason == "set explicitly"
    assert plan_threads(2, "auto", "auto", "cpu", cores=8).torch_threads == 4  # cores / instances
    assert plan_threads("auto", 2, "auto", "cpu", cores=8).instances == 4  # cores / torch threads
    assert plan_threads(1, "auto", 1, "cpu", cores=2).torch_threads == 2


def test_one_instance_taking_every_core_decodes_between_its_batches() -> None:
    one = plan_threads(1, "auto", "auto", "cpu", cores=2)
    assert (one.torch_threads, one.preprocess_threads, one.decode_between_batches) == (2, 2, True)
    assert "decoded between its batches" in one.reason
    assert not plan_threads("auto", "auto", "auto", "cpu", cores=2).decode_between_batches
    assert not plan_threads(1, 4, "auto", "cpu", cores=6).decode_between_batches  # 2 cores spare
    assert not plan_threads(1, "auto", "auto", "cuda", cores=2).decode_between_batches


def test_a_decode_waits_for_the_running_forward_pass_only_when_the_gate_holds() -> None:
    gate = ForwardGate(hold=True, max_wait_s=30)
    order: list[str] = []
    decoding = threading.Thread(target=lambda: (gate.wait(), order.append("decoded")))
    with gate.forward():
        decoding.start()
        decoding.join(0.2)
        assert decoding.is_alive()  # held while the pass runs
        order.append("forward done")
    decoding.join(5)
    assert order == ["forward done", "decoded"]
    open_gate = ForwardGate(hold=False)
    with open_gate.forward():
        open_gate.wait()  # returns at once
    bounded = ForwardGate(hold=True, max_wait_s=0.05)
    with bounded.forward():
        bounded.wait()  # gives up after max_wait_s instead of starving


def test_a_gpu_gets_one_instance() -> None:
    plan = plan_threads("auto", "auto", "auto", "cuda", cores=8)
    assert plan.instances == 1 and plan.preprocess_threads == 4


def test_settings_take_auto_or_a_positive_integer() -> None:
    from tome_serve.config import Settings

    settings = Settings(instances="2", torch_threads="auto", _cli_parse_args=[])
    assert (settings.instances, settings.torch_threads, settings.dtype) == (2, "auto", "auto")
    with pytest.raises(ValueError):
        Settings(instances=0)


def test_usable_cores_follow_a_cgroup_quota(tmp_path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    unlimited = usable_cores(cpu_max)
    assert unlimited >= 1
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: rounded up, never above the affinity mask
    assert usable_cores(cpu_max) == min(2, unlimited)
    assert usable_cores(tmp_path / "missing") == unlimited
