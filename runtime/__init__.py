"""tome_runtime: what the server and the command-line tools share, without any web stack.

:mod:`tome_runtime.weights` creates a timm model with hub, file or seeded random weights,
:mod:`tome_runtime.hub` decides before the hub client is imported whether the hub can be reached, and
:mod:`tome_runtime.hardware` names the CPU, resolves the device and picks the dtype. It needs only
torch and timm (and what timm itself brings, such as safetensors), so ``tome-eval`` and ``tome-bench``
work without FastAPI or uvicorn installed.
"""
