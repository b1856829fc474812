"""tome-bench: speed of the tome library (``tome-bench``) and of the server (``python -m tome_bench.serve``).

Outside the library on purpose, as timm keeps ``benchmark.py`` outside its package: benchmarks bring
their own dependencies (matplotlib, an HTTP client) and are tools, not Token Merging.
"""
