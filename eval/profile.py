"""``tome-eval --profile``: the sweep's per-image comparisons with r=0 as a fidelity profile, which the
server merges into its fidelity table at start-up (TOME_FIDELITY_PROFILE).

The file is the server's own format (``tome_runtime.fidelity.FidelityTable.to_json``): per model and r,
top-1 agreement (with top-5 overlap) and embedding cosine with r=0, each with its samples, mean and
one-sided 95% lower bound; on a labelled folder also the accuracy drop per r. The images should look
like the traffic the server will see: the bounds hold for images like these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tome_runtime.fidelity import KINDS, AccuracyDrop, Comparison, FidelityTable

from .report import write_json
from .runner import FolderRun
from .sweep import SweepRow


def fidelity_table(model: str, r_values: list[int], folder: FolderRun, rows: list[SweepRow]) -> FidelityTable:
    """The sweep over ``folder`` as a fidelity table of ``model`` (the timm name the server serves)."""
    per_image = folder.per_image
    reference = per_image.top1.get(0)
    table = FidelityTable(model, r_values, KINDS if reference is not None else ("cosine",))
    for r in (r for r in r_values if r > 0):
        agree = (
            None if reference is None else [a == b for a, b in zip(per_image.top1[r], reference, strict=True)]
        )
        table.add(r, Comparison(agree, per_image.top5_overlap.get(r), per_image.cosine[r]), "profile")
    for row in rows:
        labelled = folder.tallies[row.r].labelled
        if row.r > 0 and labelled and row.top1_drop is not None:
            table.set_accuracy_drop(row.r, AccuracyDrop(labelled, row.top1_drop, row.top5_drop))
    return table


def write_profile(path: Path, table: FidelityTable, about: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, table.to_json({**about, "made_by": "tome-eval --profile"}))
