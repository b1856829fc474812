"""tome-bench: speed of the tome library (``tome-bench``) and of the server (``python -m tome_bench.serve``).

Outside the library on purpose, as timm keeps ``benchmark.py`` outside its package: benchmarks bring
their own dependencies (matplotlib, an HTTP client) and are tools, not Token Merging.

What each needs installed:

- ``tome-bench`` (:mod:`~tome_bench.speed`): torch and timm, and the ``[bench]`` extra for its plot
  (matplotlib; without it, it says so and writes no plot). :mod:`~tome_bench.goals`: torch and timm.
  Neither needs the server.
- The server benchmarks, :mod:`~tome_bench.serve`, :mod:`~tome_bench.auto`, :mod:`~tome_bench.soak`,
  :mod:`~tome_bench.litserve_pairs` and :mod:`~tome_bench.litserve_peer` (which also needs
  ``pip install litserve``): the ``[bench]`` and ``[serve]`` extras. Without one of them they print
  one line naming both (:mod:`~tome_bench.extras`) instead of a traceback.
"""
