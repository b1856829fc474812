"""A load shape that adds users in steps, to find where a server saturates.

Each step holds a user count for ``LOADTEST_STEP_SECONDS`` (default 20) and then adds
``LOADTEST_STEP_USERS`` (default 4), up to Locust's ``--users``. The test ends once the top step has
been held for a step's time, or at ``--run-time`` if that comes first. Saturation shows as the step
from which answered requests per second stop growing while latency and the 429 share climb.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def _positive(name: str, default: float) -> float:
    value = float(os.environ.get(name, default))
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class StepLoadShape(LoadTestShape):
    use_common_options = True  # read --users, --spawn-rate and --run-time below

    def __init__(self) -> None:
        super().__init__()
        self.step_users = int(_positive("LOADTEST_STEP_USERS", 4))
        self.step_seconds = _positive("LOADTEST_STEP_SECONDS", 20)

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        max_users = max(1, options.num_users or self.step_users)
        run_time = self.get_run_time()
        steps_to_top = -(-max_users // self.step_users)
        time_limit = steps_to_top * self.step_seconds
        if options.run_time:
            time_limit = min(time_limit, options.run_time)
        if run_time >= time_limit:
            return None
        step = int(run_time // self.step_seconds) + 1
        users = min(step * self.step_users, max_users)
        # Spawn a step within about a second, so that almost all of its time is spent at its level.
        return users, max(options.spawn_rate or 0, self.step_users)
