"""Live analysis on Dask workers: each pulls its own frames, small results come back, steering goes out.

No frame touches the Dask scheduler or the notebook kernel: every worker task opens its own consumer
(``consumer_factory()``, e.g. a PULL socket on the DSN's data path) and runs
:func:`beamhub.streaming.analysis.analyse_stream`. What travels through Dask is small and plain (msgpack-able):

* frames: ``consumer_factory`` runs inside the worker task (it must be picklable, e.g. a
  ``functools.partial`` of :class:`beamhub.streaming.consumer.StreamConsumer`); PULL sockets share the
  channel's frames among the workers;
* results: every ``flush_interval_s`` a worker puts one batch — compact per-frame results (peaks as
  float32 bytes) and the sum of the batch's radial profiles — on the session's results
  ``distributed.Queue``;
* steering: :meth:`AnalysisSession.set_params` puts ``{"rev", "params"}`` on one control Queue per
  worker; a thread in the worker task blocks on it, swaps the parameters into the worker's
  :class:`~beamhub.streaming.analysis.Analyzer` (applied from that worker's next frame) and acknowledges the
  revision, so the notebook can tell when every worker has it. ``stop`` travels the same way.
* a DSN restart: each worker's consumer reconnects by itself (the channel comes back on the same
  endpoints) and the task goes on; its ``dsn_restart`` events (see
  :class:`~beamhub.streaming.consumer.StreamConsumer`) ride along with the batches, so
  :meth:`AnalysisSession.loss` says why ``lost`` frames are missing.

A notebook does::

    factory = functools.partial(StreamConsumer.from_dsn, dsn_url, channel_id, token)
    session = AnalysisSession(client, factory, workers=2)
    session.set_params(min_snr=8)        # every worker, from its next frame
    session.poll(); session.stats.snapshot()
    session.stop()
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from beamhub.streaming.analysis import Analyzer, FrameResult, RunningStats, analyse_stream
from beamhub.streaming.link import DSN_RESTART
from beamhub.streaming.params import ParamError
from beamhub.streaming.peakfinder import PEAK_COLUMNS, PeakFinderParams

__all__ = [
    "STREAMING_WORKER_CONFIG",
    "STREAMING_WORKER_ENV",
    "AnalysisSession",
    "analysis_worker",
    "result_from_wire",
    "result_to_wire",
]

log = logging.getLogger("beamhub.analysis")
#: Environment for Dask workers that receive detector frames. Dask's nanny sets
#: ``MALLOC_TRIM_THRESHOLD_=65536``, which pins glibc's mmap threshold at 128 KiB: every 4 MiB frame
#: ZeroMQ receives then lands in a fresh ``mmap`` and is paid for again in page faults (measured:
#: 2.5 ms of CPU per frame instead of 0.4 ms). Frames stay on the heap with these values; pass them
#: as ``dask.config.set({"distributed.nanny.pre-spawn-environ": {...}})`` or the worker's ``env``.
STREAMING_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "134217728"}
#: Dask configuration for clusters that run streaming analysis: Dask's statistical profiler samples
#: every thread's stack every 10 ms, 4 % of a streaming worker's CPU in a py-spy profile (issue 13).
#: Pass it to ``dask.config.set`` around the cluster's creation (the nanny hands it to workers).
STREAMING_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
#: How long a worker task waits for its control thread to finish at shutdown.
JOIN_TIMEOUT_S = 5.0
#: Shortest period of the client-side wait loop (a timed-out ``Queue.get`` logs an error on the
#: scheduler, so the client polls). Each poll is a round trip to the scheduler: at 10 ms the
#: notebook's process spent 0.13 cores just polling (issue 13), so a session polls at half its
#: workers' flush interval, between this and ``MAX_POLL_PERIOD_S``.
POLL_PERIOD_S = 0.01
MAX_POLL_PERIOD_S = 0.05


def result_to_wire(r: FrameResult) -> list[Any]:
    """A compact msgpack-friendly row (no profile: batches carry profile sums)."""
    return [
        r.stream,
        r.seq,
        r.run,
        r.source_rev,
        r.params_rev,
        list(r.shape),
        r.hit,
        r.n_peaks,
        np.ascontiguousarray(r.peaks, dtype=np.float32).tobytes(),
        r.latency_s,
        r.analysis_s,
        r.worker,
        r.error,
    ]


def result_from_wire(row: list[Any]) -> FrameResult:
    (
        stream,
        seq,
        run,
        source_rev,
        params_rev,
        shape,
        hit,
        n_peaks,
        peaks,
        latency_s,
        analysis_s,
        worker,
        error,
    ) = row
    array = np.frombuffer(peaks, dtype=np.float32).reshape(-1, len(PEAK_COLUMNS))
    return FrameResult(
        stream,
        seq,
        run,
        source_rev,
        params_rev,
        tuple(shape),
        hit,
        n_peaks,
        array,
        None,
        latency_s,
        analysis_s,
        worker,
        error,
    )


def analysis_worker(
    session: str,
    index: int,
    consumer_factory: Callable[[], Iterable[Any]],
    params: dict[str, Any],
    rev: int = 0,
    flush_interval_s: float = 0.1,
) -> dict[str, Any]:
    """The long-running Dask task of one worker (submit with ``pure=False``); returns a summary."""
    from distributed import Queue, get_worker

    label = get_worker().address
    results = Queue(f"{session}-results")
    control = Queue(f"{session}-control-{index}")
    analyzer = Analyzer(params, rev=rev, worker=label)
    stop = threading.Event()
    send_lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        with send_lock:
            results.put({"worker": label, "index": index, **message})

    def listen() -> None:
        # a blocking get (a timed-out Queue.get makes the scheduler log an error each time);
        # the task wakes this thread with {"wake": True} on its way out
        while not stop.is_set():
            message = control.get()
            if message.get("stop") or message.get("wake"):
                stop.set()
                return
            try:
                applied = analyzer.set_params(message["params"], rev=message["rev"])
            except ParamError as exc:
                send({"error": str(exc), "field": exc.field, "rev": message.get("rev")})
                continue
            send({"applied_rev": applied})

    pending: list[list[Any]] = []
    sent_outages: list[dict[str, Any]] = []
    consumer: Any = None
    profile: dict[str, Any] = {"sum": None, "n": 0}
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        last_flush = time.monotonic()
        outages = [dict(e) for e in getattr(consumer, "events", ()) if e["event"] == DSN_RESTART]
        if outages == sent_outages:
            outages = None
        if not pending and not profile["n"] and outages is None:
            return
        if outages is not None:
            sent_outages[:] = outages
        batch = {
            "outages": outages,
            "results": pending[:],
            "rev": analyzer.rev,
            "profile_n": profile["n"],
            "profile_sum": None if profile["sum"] is None else profile["sum"].tobytes(),
        }
        pending.clear()
        profile.update(sum=None, n=0)
        send(batch)

    def on_result(result: FrameResult) -> None:
        if result.radial_profile is not None:
            p = np.nan_to_num(result.radial_profile.astype(np.float64))
            same = profile["sum"] is not None and profile["sum"].shape == p.shape
            if profile["sum"] is not None and not same:
                flush()
            profile["sum"] = p if profile["sum"] is None else profile["sum"] + p
            profile["n"] += 1
        pending.append(result_to_wire(result))
        if time.monotonic() - last_flush >= flush_interval_s:
            flush()

    consumer = consumer_factory()  # may raise (bad endpoint): before any thread is started
    listener = threading.Thread(target=listen, name=f"{session}-control-{index}", daemon=True)
    listener.start()
    frames = 0
    try:
        send({"ready": True, "applied_rev": analyzer.rev})
        frames = analyse_stream(
            consumer, analyzer, on_result, stop=stop, on_idle=flush, idle_timeout_s=flush_interval_s
        )
    finally:
        stop.set()
        flush()
        close = getattr(consumer, "close", None)
        if close is not None:
            close()
        if listener.is_alive():
            control.put({"wake": True})
            listener.join(timeout=JOIN_TIMEOUT_S)
    stats = getattr(consumer, "stats", None)
    return {
        "worker": label,
        "index": index,
        "frames": frames,
        "rev": analyzer.rev,
        "consumer": stats() if callable(stats) else {},
    }


class AnalysisSession:
    """N analysis tasks on N Dask workers, steered and collected from one client (a notebook)."""

    def __init__(
        self,
        client: Any,
        consumer_factory: Callable[[], Iterable[Any]],
        *,
        workers: int | None = None,
        params: dict[str, Any] | None = None,
        flush_interval_s: float = 0.1,
        stats: RunningStats | None = None,
        name: str | None = None,
    ) -> None:
        from distributed import Queue

        self.params = PeakFinderParams.create(params)  # refuse bad values before starting
        addresses = sorted(client.scheduler_info()["workers"])
        n = len(addresses) if workers is None else workers
        if not 1 <= n <= len(addresses):
            raise ValueError(
                f"workers: asked for {n} analysis tasks, the cluster has "
                f"{len(addresses)} workers; scale the cluster or ask for fewer"
            )
        self.client = client
        self.name = name or f"beamhub-analysis-{uuid.uuid4().hex[:8]}"
        self.rev = 0
        self.poll_period_s = min(MAX_POLL_PERIOD_S, max(POLL_PERIOD_S, flush_interval_s / 2))
        self.stats = stats or RunningStats()
        self.ready: set[int] = set()
        self.applied: dict[int, int] = {}
        self.errors: list[dict[str, Any]] = []
        self.outages: dict[int, list[dict[str, Any]]] = {}  # worker index -> its DSN outages
        self.changed_at: dict[int, float] = {}
        self._results = Queue(f"{self.name}-results", client=client)
        self._controls = [Queue(f"{self.name}-control-{i}", client=client) for i in range(n)]
        self.futures = [
            client.submit(
                analysis_worker,
                self.name,
                i,
                consumer_factory,
                self.params.to_dict(),
                0,
                flush_interval_s,
                workers=[addr],
                allow_other_workers=False,
                pure=False,
                key=f"{self.name}-worker-{i}",
            )
            for i, addr in enumerate(addresses[:n])
        ]
        self._stopped = False
        log.info("analysis session %s: %d worker tasks on %s", self.name, n, addresses[:n])

    @property
    def n_workers(self) -> int:
        return len(self.futures)

    def set_params(self, changes: dict[str, Any] | None = None, **kwargs: Any) -> int:
        """Validate here, then broadcast; each worker applies it from its next frame."""
        new = self.params.replace(**{**(changes or {}), **kwargs})
        self.rev += 1
        self.params = new
        self.changed_at[self.rev] = time.monotonic()
        for control in self._controls:
            control.put({"rev": self.rev, "params": new.to_dict()})
        return self.rev

    def poll(self, timeout: float = 0.0) -> list[FrameResult]:
        """Fold what workers sent into :attr:`stats`; return the new frame results.

        Waits up to ``timeout`` seconds for the first message when none is queued. A worker task
        that failed raises its exception here.
        """
        deadline = time.monotonic() + timeout
        messages = self._results.get(batch=True)
        while not messages and time.monotonic() < deadline:
            time.sleep(self.poll_period_s)
            messages = self._results.get(batch=True)
        out: list[FrameResult] = []
        for message in messages:
            out.extend(self._handle(message))
        for future in self.futures:
            if future.status == "error":
                future.result()  # raises the worker's exception
        return out

    def _handle(self, message: dict[str, Any]) -> list[FrameResult]:
        index = message.get("index", -1)
        if message.get("ready"):
            self.ready.add(index)
        if "applied_rev" in message:
            self.applied[index] = max(self.applied.get(index, 0), message["applied_rev"])
        if "error" in message:
            self.errors.append(message)
            log.warning(
                "analysis worker %s refused rev %s: %s",
                message.get("worker"),
                message.get("rev"),
                message["error"],
            )
        if message.get("outages") is not None:
            self.outages[index] = message["outages"]
            log.warning(
                "analysis worker %s: %d DSN outage(s) so far; frames missing meanwhile are "
                "lost (dsn_restart)",
                message.get("worker"),
                len(message["outages"]),
            )
        results = [result_from_wire(row) for row in message.get("results", ())]
        for result in results:
            self.stats.add(result)
        if message.get("profile_sum") is not None and message.get("profile_n"):
            self.stats.add_profile(
                np.frombuffer(message["profile_sum"], dtype=np.float64), message["profile_n"]
            )
        return results

    def loss(self) -> dict[str, Any]:
        """Frames lost (sequence holes across all workers) and the DSN outages the workers saw.

        Work consumers share the stream, so no single worker can count what an outage cost; the
        holes are the session's count, and ``dsn_restart`` outages are the reason when there are
        any (``outages``: per worker, ``after_seq`` / ``resumed_seq`` / ``outage_s``).
        """
        lost = self.stats.lost()
        restarts = max((len(v) for v in self.outages.values()), default=0)
        return {
            "lost": lost,
            "reason": DSN_RESTART if restarts and lost else ("gap" if lost else None),
            "dsn_restarts": restarts,
            "outages": {i: list(v) for i, v in self.outages.items()},
        }

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
    ) -> list[FrameResult]:
        """Poll until ``predicate()`` holds; returns the results seen meanwhile."""
        deadline = time.monotonic() + timeout
        seen: list[FrameResult] = []
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"analysis session {self.name}: no {what} after {timeout} s (frames "
                    f"{self.stats.frames}, per worker {dict(self.stats.per_worker)}, ready "
                    f"{sorted(self.ready)}, applied {self.applied})"
                )
            seen.extend(self.poll(timeout=min(0.2, remaining)))
        return seen

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda: len(self.ready) == self.n_workers, timeout, "ready workers")

    def wait_applied(self, rev: int | None = None, timeout: float = 10.0) -> list[FrameResult]:
        """Wait until every worker acknowledged ``rev`` (default: the latest)."""
        rev = self.rev if rev is None else rev
        return self.wait_for(
            lambda: all(self.applied.get(i, 0) >= rev for i in range(self.n_workers)),
            timeout,
            f"acknowledgement of rev {rev} from every worker",
        )

    def stop(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Stop every worker task, collect what is left; returns the tasks' summaries.

        A task that failed is summarised as ``{"index", "error"}`` (:meth:`poll` raised it).
        """
        if self._stopped:
            return []
        self._stopped = True
        for control in self._controls:
            control.put({"stop": True})
        from distributed import wait

        deadline = time.monotonic() + timeout
        wait(self.futures, timeout=timeout)  # raises TimeoutError if a task does not stop
        summaries = [
            {"index": i, "error": f"{type(f.exception()).__name__}: {f.exception()}"}
            if f.status == "error"
            else f.result()
            for i, f in enumerate(self.futures)
        ]
        while time.monotonic() < deadline:  # what the tasks flushed on their way out
            messages = self._results.get(batch=True)
            if not messages:
                break
            for message in messages:
                self._handle(message)
        for queue in (self._results, *self._controls):
            queue.close()
        return summaries

    def __enter__(self) -> AnalysisSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
