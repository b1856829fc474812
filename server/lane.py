"""One served model, one object: its :class:`Lane` holds the loaded model, its inference worker (the
threads that run its batches), its queues and how their batches are planned and run, its r=auto
with a measured timing table per merge rule and the latency target, its fidelity table per merge
rule (with calibration and shadow runs) from which a fidelity floor becomes a request's auto
ceiling, and its file in the state folder (state.py).

The service looks a model's lane up by name and leaves everything model-specific to it: checking a
request against the model (:meth:`Lane.admit`), refusing it while its queue has no room or r=auto
cannot meet its target (:meth:`Lane.check_room`), and queueing its decoded image (:meth:`Lane.submit`).
The batcher's hooks point here: a batch is planned by :meth:`_plan` (a fixed r, r=auto's choice of r,
or for r=auto requests that name no merge rule its choice of r and rule) and run by
:meth:`_run_batch`, which hands r=auto the batch's ticket (every batch, fixed r too, takes the same
inference threads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

from tome_runtime.fidelity import KINDS, FidelityTable, load_profile

from . import calibration, pooling
from .auto import AutoMetrics, AutoR, Overloaded, TimingTable, Waiting
from .auto.recheck import Recheck, recheck
from .auto.timings import budget_shares, tables_from_json, tables_to_json
from .batching import Batch, Batcher, BatchPlan, BatchPolicy
from .config import Settings
from .errors import BadRequest, QueueFull
from .fidelity_metrics import FidelityMetrics
from .inference import ForwardGate, InferenceWorker, Kept
from .item import Item, QueueKey, Result, Want
from .loading import LoadedModel, StartupError
from .metrics import Metrics
from .params import (
    AUTO,
    MERGE_RULES,
    Asked,
    AutoParams,
    ParamError,
    auto_params,
    default_first,
    merge_rule,
    top_k,
)
from .shadow import Shadow
from .state import Keeper, LaneState, StateFolder, lane_key
from .threads import ThreadPlan

log = logging.getLogger(__name__)

IDLE_S = 1.0
"""The background re-check runs a batch only after this long without requests."""


class Lane:
    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        threads: ThreadPlan,
        metrics: Metrics,
        auto_metrics: AutoMetrics,
        gate: ForwardGate,
        fidelity_metrics: FidelityMetrics,
    ) -> None:
        self.model = model
        self.settings = settings
        self.worker = InferenceWorker(model, metrics, threads.instances, threads.torch_threads, gate)
        policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.max_delay_s,
            max_queue_size=settings.max_queue,
            max_concurrent_batches=threads.instances,
            # A full batch waits ready beside those running, so an inference thread starts the
            # next batch the moment it finishes one, without a round trip through the event loop.
            ready_batches=1,
        )
        self.batcher = Batcher(
            policy,
            self._run_batch,
            lambda key, depth: metrics.set_queue_depth(key.model, key.r, depth),
            self._plan,
        )
        self._auto_metrics = auto_metrics
        self.auto: AutoR | None = None
        """Set by :meth:`warm`."""
        self.target_ms = settings.request_timeout_ms
        """The latency target of r=auto requests that name none (TOME_LATENCY_TARGET_MS, or derived)."""
        self.timings_source: Literal["measured", "state"] = "measured"
        self.state: LaneState | None = None
        """This lane's file in TOME_STATE_DIR (None when unset)."""
        self._keeper: Keeper | None = None
        self._fidelity_metrics = fidelity_metrics
        self.fidelity: dict[str, FidelityTable] | None = None
        """Per merge rule (:attr:`merge_rules`); set by :meth:`warm`."""
        self.shadow: Shadow | None = None
        """Set by :meth:`warm` when TOME_SHADOW_RATE > 0."""
        self._running, self._last_request = 0, 0.0
        """Batches handed to the worker and not yet finished (shadow runs wait for none), and when the
        last one finished (the idle re-check of a saved timing table waits for quiet)."""

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def merge_rules(self) -> tuple[str, ...]:
        """Every merge rule, the default (TOME_DEFAULT_MERGE) first: the order they are measured in."""
        return default_first(self.settings.default_merge)

    @property
    def default_kind(self) -> str:
        """The fidelity kind of a request that names none: agreement for a classifier, else cosine."""
        return "agreement" if self.model.num_classes else "cosine"

    # -- start-up (on the loading thread) ---------------------------------------------------------

    def warm(self) -> None:
        """Run a batch of every size, then take r=auto's timing tables (one per merge rule) from the
        state folder or measure them within TOME_AUTO_WARMUP_S, and set the latency target. Blocks;
        runs before /readyz turns 200."""
        settings, limits = self.settings, self.model.limits
        self.worker.warm(tuple(sorted({1, settings.max_batch_size})))
        started = time.monotonic()
        tables = self._timing_tables()
        table = tables[0]
        full = table.snapshot().seconds(0, settings.max_batch_size)
        if settings.latency_target_ms is not None:
            self.target_ms = settings.latency_target_ms
        else:  # two full batches at r=0: one running plus one's own (docs/r-auto.md)
            self.target_ms = min(math.ceil(2 * full * 1000 / 10) * 10, settings.request_timeout_ms)
        self.auto = AutoR(tables, limits.auto_ceiling, self.worker.instances, self._auto_metrics)
        self._auto_metrics.target.labels(self.name).set(self.target_ms / 1000.0)
        log.info(
            "%s: r=auto timing table: %d cells %s in %.1f s (%s; r=0, batch %d: %.0f ms); latency "
            "target %g ms%s; auto ceiling %d",
            self.name,
            sum(t.measured for t in tables),
            "measured" if self.timings_source == "measured" else f"loaded from {self.state.path}",
            time.monotonic() - started,
            ", ".join(f"{t.merge} {t.measured}" for t in tables),
            settings.max_batch_size,
            full * 1000,
            self.target_ms,
            "" if settings.latency_target_ms is not None else " (derived: 2 full batches at r=0)",
            limits.auto_ceiling,
        )
        self._warm_fidelity(table.rs)

    def _timing_tables(self) -> list[TimingTable]:
        """r=auto's timing table per merge rule, the default rule's first: loaded from the state
        folder, or measured (and saved there)."""
        settings = self.settings
        tables = [
            TimingTable(self.name, self.model.limits.auto_ceiling, settings.max_batch_size, merge=rule)
            for rule in self.merge_rules
        ]
        if settings.state_dir is not None:
            grid = tables[0].rs
            key = lane_key(self.model, settings, grid, self.worker.instances, self.worker.torch_threads)
            self.state = LaneState(StateFolder(settings.state_dir), key)
        saved = self._saved_tables(tables)
        if saved is not None:
            tables, self.timings_source = saved, "state"
        else:
            self._measure(tables)
        if self.state is not None:
            self.state.provide("timings", partial(tables_to_json, tables))
            if self.timings_source == "measured":
                self.state.save()
        return tables

    def _measure(self, tables: Sequence[TimingTable]) -> None:
        """Warm the timing tables up in turn within TOME_AUTO_WARMUP_S, each with its share."""
        started = time.monotonic()
        budget = budget_shares(self.settings.auto_warmup_s, len(tables), lambda: time.monotonic() - started)
        for table, share in zip(tables, budget, strict=True):
            table.warm_up(partial(self.worker.time_batch, merge=table.merge), budget_s=share)

    def _warm_fidelity(self, grid: tuple[int, ...]) -> None:
        """The fidelity tables (one per merge rule) on the timing tables' r grid: from the state folder
        when they were measured from the same profile and calibration images, else the profile's rows,
        then calibration."""
        settings, model = self.settings, self.model
        kinds = KINDS if model.num_classes else ("cosine",)
        origin = calibration.origin(settings.fidelity_profile, self._calibration_folder())
        tables = self._saved_fidelity(grid, kinds, origin)
        if tables is None:
            tables = {rule: FidelityTable(self.name, grid, kinds) for rule in self.merge_rules}
            if settings.fidelity_profile is not None:
                self._merge_profile(tables, settings.fidelity_profile)
            if settings.calibration_budget_s > 0:
                self._calibrate(tables)
            if self.state is not None:
                self.state.save()  # what the next start reads, before any shutdown
        if self.state is not None:
            self.state.provide(
                "fidelity", lambda: {"origin": origin, "tables": {r: t.to_json() for r, t in tables.items()}}
            )
        self.fidelity = tables
        self._fidelity_metrics.serving(self.name)
        if settings.min_fidelity is not None:
            ceilings = {
                rule: {kind: self.fidelity_ceiling(kind, settings.min_fidelity, rule) for kind in kinds}
                for rule in tables
            }
            log.info(
                "%s: TOME_MIN_FIDELITY=%g: r=auto chooses r up to %s",
                self.name,
                settings.min_fidelity,
                ceilings,
            )
        if settings.shadow_rate > 0:
            self.shadow = Shadow(
                self.name,
                settings.shadow_rate,
                tables,
                lambda pixels: self.worker.outputs_async(0, pixels),
                self.busy,
                self._fidelity_metrics.shadow_runs,
            )

    def _saved_fidelity(
        self, grid: tuple[int, ...], kinds: tuple[str, ...], origin: dict[str, str | None]
    ) -> dict[str, FidelityTable] | None:
        """The state file's fidelity tables when they came from ``origin`` (the same profile and
        calibration images: counting them again would overstate the samples), else None."""
        saved = self.state.section("fidelity") if self.state is not None else None
        if saved is None:
            return None
        try:
            if saved.get("origin") != origin:
                raise ValueError("measured from another profile or other calibration images")
            tables = {
                rule: FidelityTable.from_json(saved["tables"][rule], self.name, grid, kinds)
                for rule in self.merge_rules
            }
            if None in tables.values():
                raise ValueError(f"it has no table of {self.name}")
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            self.state.discard("fidelity", f"{type(exc).__name__}: {exc}")
            return None
        sources = {rule: table.sources for rule, table in tables.items()}
        log.info("%s: fidelity tables from %s (%s): calibration skipped", self.name, self.state.path, sources)
        return tables

    def _calibration_folder(self) -> Path:
        return self.settings.calibration_dir or calibration.SAMPLES_DIR

    def _calibrate(self, tables: Mapping[str, FidelityTable]) -> None:
        settings = self.settings
        if self.model.weights == "random":
            log.warning("%s: random weights: its fidelity says little about a trained model", self.name)
        folder = self._calibration_folder()
        started = time.monotonic()
        report = calibration.calibrate(
            tables,
            self.worker.outputs,
            self.model,
            calibration.image_files(folder),
            batch_size=settings.max_batch_size,
            budget_s=settings.calibration_budget_s,
            max_pixels=settings.max_pixels,
        )
        seconds = time.monotonic() - started
        grid = tables[self.settings.default_merge].rs
        detail = calibration.describe(report, folder, grid, seconds, settings.fidelity_min_samples)
        log.info("%s: %s", self.name, detail)

    def _merge_profile(self, tables: Mapping[str, FidelityTable], path: Path) -> None:
        """The profile's rows into the table of the merge rule it names (``merge`` beside its rows;
        tome-eval measures with the library's default rule, the first of MERGE_RULES)."""
        grid = tables[self.settings.default_merge].rs
        try:
            profile = load_profile(path, self.name, grid)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if profile is None:
            log.warning("%s: TOME_FIDELITY_PROFILE %s has no rows for this model", self.name, path)
            return
        weights = profile.about.get("weights")
        if weights not in (None, self.model.weights):
            log.warning(
                "%s: the profile was measured with weights %s, this server uses %s",
                self.name,
                weights,
                self.model.weights,
            )
        rule = profile.about.get("merge", MERGE_RULES[0])
        if rule not in tables:
            raise StartupError(f"TOME_FIDELITY_PROFILE {path}: unknown merge rule {rule!r}")
        tables[rule].merge(profile, "profile", r_max=self.model.limits.ceiling)
        log.info("%s: fidelity profile %s merged in (%s: %s)", self.name, path, rule, profile.sources)

    def fidelity_ceiling(self, kind: str, floor: float, merge: str | None = None) -> int:
        """The largest grid r such that every grid r up to it meets ``floor`` for ``kind`` with merge
        rule ``merge`` (None: the default; 0 before the tables exist): the auto ceiling a floor allows."""
        if self.fidelity is None:
            return 0
        table = self.fidelity[merge or self.settings.default_merge]
        return table.ceiling(kind, floor, self.settings.fidelity_min_samples)

    def busy(self) -> bool:
        """Live work is queued, on its way (decoding) or running."""
        return self._running > 0 or self.batcher.pending() > 0

    def _saved_tables(self, like: Sequence[TimingTable]) -> list[TimingTable] | None:
        """The state file's timing tables, if it has one per merge rule on the grid of ``like``."""
        saved = self.state.section("timings") if self.state is not None else None
        if saved is None:
            return None
        try:
            return tables_from_json(saved, like)
        except ValueError as exc:
            self.state.discard("timings", str(exc))
            return None

    def keep_state(self) -> None:
        """Once the server is ready: re-check a loaded table while idle, and save the state every few
        minutes and at shutdown (no-op without TOME_STATE_DIR)."""
        if self.state is None:
            return
        self._keeper = Keeper(self.state, self._recheck if self.timings_source == "state" else None)
        self._keeper.start()

    def _recheck(self, stop: threading.Event) -> None:
        """Each rule's saved table in turn, within TOME_AUTO_WARMUP_S of batch time, each with its share."""
        done: list[Recheck] = []
        budget = budget_shares(
            self.settings.auto_warmup_s, len(self.auto.tables), lambda: sum(check.seconds for check in done)
        )
        for (rule, table), share in zip(self.auto.tables.items(), budget, strict=True):
            done.append(recheck(table, partial(self._backlogged_batch, rule), self._idle, stop, share))
            log.info(
                "%s: background re-check of the saved timing table of merge rule %s: %s",
                self.name,
                rule,
                done[-1].describe(),
            )
            if done[-1].stopped:
                return

    def _backlogged_batch(self, merge: str, r: int, batch_size: int) -> float:
        """A dummy batch with rule ``merge`` timed on an inference thread, in r=auto's backlog like a
        real one."""
        ticket = self.auto.handed(r, batch_size, merge)
        ticket.started()
        seconds: float | None = None
        try:
            seconds = self.worker.time_batch(r, batch_size, merge)
            return seconds
        finally:
            ticket.finished(seconds)  # None (it failed): out of the backlog, nothing learnt

    def _idle(self) -> bool:
        """No batch running, and no request seen for IDLE_S."""
        return not self._running and time.monotonic() - self._last_request >= IDLE_S

    # -- one request ------------------------------------------------------------------------------

    def admit(self, asked: Asked, want: Want, arrived: float, count: int = 1) -> list[Item]:
        """The request as one :class:`Item` per image (``count`` of them, their images still to come),
        its parameters checked against this model: :class:`BadRequest` (422) saying what is allowed
        otherwise. Its fidelity floor is judged in the kind of answer it wants (``Want.fidelity_kind``)."""
        model, settings, merge = self.model, self.settings, asked.merge
        try:
            chosen = model.limits.r(asked.r)
            auto = auto_params(
                chosen,
                asked.target_ms,
                asked.max_r,
                model.limits,
                default_target_ms=self.target_ms,
                timeout_ms=settings.request_timeout_ms,
                min_fidelity=asked.min_fidelity,
                default_floor=settings.min_fidelity,
            )
            want = self._resolve(want)
            # r=auto naming no rule: the server chooses the rule with r, per batch (auto/pareto.py).
            rule = AUTO if chosen == AUTO and merge is None else merge_rule(merge, settings.default_merge)
            auto = self._apply_floor(auto, want.fidelity_kind or self.default_kind, rule)
        except ParamError as exc:
            raise BadRequest(str(exc)) from None
        loop, deadline = asyncio.get_running_loop(), arrived + settings.request_timeout_s
        return [
            Item(model.name, chosen, None, want, arrived, deadline, loop.create_future(), auto, rule)
            for _ in range(count)
        ]

    def _apply_floor(self, auto: AutoParams | None, kind: str, rule: str) -> AutoParams | None:
        """The request's auto ceiling per merge rule, lowered to the largest r whose fidelity with that
        rule meets its floor; its ``max_r`` is that of its ``rule`` (the default's for AUTO)."""
        if auto is None:
            return None
        ceilings = dict.fromkeys(self.merge_rules, auto.max_r)
        if auto.floor is not None:
            if kind not in KINDS or (kind == "agreement" and not self.model.num_classes):
                raise ParamError(f"{self.name} has no fidelity of kind {kind!r}")
            ceilings = {m: min(c, self.fidelity_ceiling(kind, auto.floor, m)) for m, c in ceilings.items()}
        own = self.settings.default_merge if rule == AUTO else rule
        return dataclasses.replace(auto, max_r=ceilings[own], kind=kind, max_r_by_merge=ceilings)

    def _resolve(self, want: Want) -> Want:
        if want.pooling is not None and (why := pooling.unavailable(self.model.module, want.pooling)):
            raise ParamError(why)
        width = pooling.width(self.model.module, want.pooling) if want.pooling else 0
        if want.dimensions is not None and not 1 <= want.dimensions <= width:
            raise ParamError(
                f"dimensions must be an integer from 1 to {width} for this model, got {want.dimensions}"
            )
        if want.top_k == 0:
            return want
        if not self.model.num_classes:
            raise ParamError(f"{self.name} has no classifier head; use /v1/embeddings or /visualize")
        return dataclasses.replace(want, top_k=top_k(want.top_k, self.model.num_classes))

    def check_room(self, items: Sequence[Item]) -> None:
        """429 (or 503 when shutting down) now if the queue of ``items`` (one request's) would refuse
        them; for r=auto also 429 when even the request's auto ceiling cannot meet its target behind the
        queue (Retry-After from the same prediction)."""
        key, waiting = items[0].key, items[-1].waiting
        self.batcher.check_room(key, len(items))
        if waiting is None or self.auto is None:
            return
        ahead = self._backlog(key, self.batcher.queued(key)) + [item.waiting for item in items[:-1]]
        try:
            self.auto.admit(ahead, waiting, _named(key))
        except Overloaded as exc:
            floor = items[-1].auto.floor if items[-1].auto is not None else None
            which = "" if floor is None else f" (fidelity floor {floor:g})"
            raise QueueFull(
                f"r=auto cannot answer {self.name} within {waiting.target_s * 1000:g} ms even at "
                f"r={waiting.max_r}{which}: {exc}",
                exc.retry_after_s,
            ) from None

    def reserve(self, items: Sequence[Item]) -> None:
        """Hold a place in the queue for each of ``items`` while their images are decoded (a batch
        waits for them meanwhile); all or none."""
        self._last_request = time.monotonic()
        for done, item in enumerate(items):
            try:
                self.batcher.reserve(item.key, item.waiting)
            except BaseException:
                for reserved in items[:done]:
                    self.batcher.release(reserved.key, reserved.waiting)
                raise

    def submit(self, item: Item) -> None:
        """Queue ``item`` (decoded) in the place :meth:`reserve` kept for it."""
        self.batcher.submit(item, reserved=True)

    def release(self, item: Item) -> None:
        """Give up the place kept for ``item``: its image will not come."""
        self.batcher.release(item.key, item.waiting)

    def answered(self, item: Item, result: Result | None) -> None:
        """For r=auto's metrics: ``item`` was answered with ``result``, or timed out (None)."""
        if self.auto is None or item.auto is None:
            return
        if result is None:
            self.auto.timed_out()
        else:
            self.auto.answered(result.r, time.monotonic() - item.arrived, item.auto.target_s)

    # -- the batcher's hooks ----------------------------------------------------------------------

    def _plan(self, key: QueueKey, queued: Sequence[Item]) -> BatchPlan:
        """A fixed-r queue's batch runs at its r; an auto queue's batch at the r the controller
        chooses for the queued requests, and takes as many as it says. The auto queue that names no
        merge rule gets the rule chosen with r (``AutoR.choose_pair``); every other queue runs its
        key's rule (the default one while r=auto is still warming up)."""
        if key.r != AUTO or self.auto is None:
            return BatchPlan(0 if key.r == AUTO else key.r, None, _named(key) or self.settings.default_merge)
        backlog = self._backlog(key, queued)
        if key.merge != AUTO:
            decision = self.auto.choose(backlog, key.merge)
            return BatchPlan(decision.r, decision.batch_size)
        # The requests a batch can take: its r and rule must suit each one's auto ceiling per rule.
        batch = [item.auto for item in queued[: self.settings.max_batch_size] if item.auto is not None]
        ceilings = {rule: min(auto.max_r_by_merge[rule] for auto in batch) for rule in self.merge_rules}
        decision, rule = self.auto.choose_pair(backlog, ceilings, self._lower_bound(batch[0].kind))
        return BatchPlan(decision.r, decision.batch_size, rule)

    def _lower_bound(self, kind: str | None) -> Callable[[int, str], float | None]:
        """The measured fidelity lower bound of (r, rule) in ``kind`` (None: the model's), as r=auto's
        choice of rule reads it (``fidelity.FidelityTable.lower_bound``)."""
        tables, min_samples = self.fidelity or {}, self.settings.fidelity_min_samples
        kind = kind or self.default_kind

        def lower(r: int, rule: str) -> float | None:
            table = tables.get(rule)
            return None if table is None else table.lower_bound(r, kind, min_samples)

        return lower

    def _backlog(self, key: QueueKey, queued: Sequence[Item]) -> list[Waiting]:
        """What r=auto plans for: the queued requests of ``key``, oldest first, then those still
        being decoded (with one instance on every core they decode only between batches, so the
        queue alone would hide most of a burst)."""
        waiting = [item.waiting for item in queued] + list(self.batcher.coming(key))
        return [w for w in waiting if w is not None]

    async def _run_batch(self, batch: Batch) -> None:
        keep = self.shadow.pick(batch.r, len(batch.items)) if self.shadow is not None else frozenset()
        self._running += 1
        try:
            kept = await self._run_on_worker(batch, keep)
        finally:
            self._running -= 1
            self._last_request = time.monotonic()
        if self.shadow is not None:
            self.shadow.offer(batch.r, batch.merge, kept)

    async def _run_on_worker(self, batch: Batch, keep: frozenset[int]) -> list[Kept]:
        if self.auto is None:  # only while warming up
            return await self.worker.run(batch, keep=keep)
        ticket = self.auto.handed(batch.r, len(batch.items), batch.merge)
        try:
            return await self.worker.run(batch, ticket, keep)
        finally:
            ticket.finished(None)  # no-op unless the batch never reached the model

    # -- shutting down ----------------------------------------------------------------------------

    async def drain(self) -> None:
        await self.batcher.drain()
        if self._keeper is not None:  # before the worker closes: a re-check batch may be running
            await asyncio.to_thread(self._keeper.stop)
        if self.shadow is not None:
            await self.shadow.close()
        self.worker.close()


def _named(key: QueueKey) -> str | None:
    """The merge rule ``key``'s requests named, None when the server chooses it (AUTO)."""
    return None if key.merge == AUTO else key.merge
