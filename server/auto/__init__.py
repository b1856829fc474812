"""r=auto: the server chooses each batch's r to hold a latency target.

- ``auto_r.py``     :class:`AutoR`, one model's r=auto: admission (429 past the request's auto ceiling),
  the batch's r, and :class:`BatchTicket`, the hook through which every batch reports back
- ``controller.py`` the decision: the least usable r that keeps queued auto requests on time; hysteresis
- ``pareto.py``     for requests that name no merge rule: the batch's (r, rule) pair, on the measured
  Pareto front of cost and fidelity within the controller's time budget
- ``timings.py``    the measured timing table (seconds per r and batch size; one per merge rule), warm-up
  and updates; not to be confused with the analytical GMACs of ``tome.cost_table``
- ``metrics.py``    the r=auto metrics, and the timing table as gauges
- ``recheck.py``    a table loaded from the state folder (``state.py``), measured again while idle
"""

from .auto_r import AutoR, BatchTicket
from .controller import Overloaded, Waiting
from .metrics import AutoMetrics
from .timings import TimingTable

__all__ = ["AutoMetrics", "AutoR", "BatchTicket", "Overloaded", "TimingTable", "Waiting"]
