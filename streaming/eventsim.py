"""A simulated small-event source: fixed-size events at high rate, sent as batch messages.

LCLS-II class instruments produce small events (a waveform digitiser trace, a region of interest,
a few kB) at up to MHz rates. Python cannot pace, stamp and send one message per event at that
rate, and neither can any hop downstream: so the source puts ``events_per_message`` events under
one header (the wire format's batch, :func:`beamhub.streaming.wire.send_batch`), and the source
runner paces messages at ``rate_hz / events_per_message``. Consumers get the events one by one
(:class:`beamhub.streaming.consumer.StreamConsumer` yields each event of a batch).

Each event is ``event_bytes`` of little-endian uint16 samples: a baseline with noise and, on a
steerable fraction of events, a pulse whose height and position travel in no header (events of a
batch share one ``meta``), so its payload is what a consumer analyses.

    beamhub source sim --event-bytes 1024 --rate 100000 --connect tcp://HOST:PORT --run
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beamhub.streaming.params import ParamSet, ParamSpec

__all__ = ["EVENT_PARAMS", "SmallEventSource", "default_events_per_message"]

#: A batch message aims at this many payload bytes (where per-byte costs start to dominate).
TARGET_MESSAGE_BYTES = 64 * 1024
MAX_EVENTS_PER_MESSAGE = 4096

EVENT_PARAMS = (
    ParamSpec(
        "rate_hz",
        "float",
        100_000.0,
        "events per second the source sends",
        "Hz",
        min=1.0,
        max=10_000_000.0,
        step=1.0,
    ),
    ParamSpec(
        "pulse_fraction",
        "float",
        0.2,
        "fraction of events that carry a pulse",
        "",
        min=0.0,
        max=1.0,
        step=0.01,
    ),
)


def default_events_per_message(event_bytes: int) -> int:
    """About 64 KiB per message, at least one event, at most MAX_EVENTS_PER_MESSAGE."""
    return max(1, min(MAX_EVENTS_PER_MESSAGE, TARGET_MESSAGE_BYTES // max(1, event_bytes)))


class SmallEventSource:
    """Makes batches of small events; :class:`beamhub.streaming.source.SourceRunner` sends them."""

    kind = "events"

    def __init__(
        self,
        event_bytes: int = 1024,
        *,
        events_per_message: int | None = None,
        seed: int | None = None,
        bank_events: int = 4096,
        **params: Any,
    ) -> None:
        if event_bytes < 2 or event_bytes % 2 or event_bytes > 16 * 1024 * 1024:
            raise ValueError(
                f"event_bytes must be an even number of bytes from 2 to 16 MiB, got {event_bytes}"
            )
        n = events_per_message or default_events_per_message(event_bytes)
        if not 1 <= n <= MAX_EVENTS_PER_MESSAGE:
            raise ValueError(
                f"events_per_message must be from 1 to {MAX_EVENTS_PER_MESSAGE}, got {n}"
            )
        self.event_bytes = int(event_bytes)
        self.events_per_message = int(n)
        self.params = ParamSet(EVENT_PARAMS, params)
        self.rng = np.random.default_rng(seed)
        samples = self.event_bytes // 2
        # noise bank drawn once; each message takes a random window (a fresh copy: sent zero-copy)
        rows = max(bank_events, 2 * n)
        noise = self.rng.normal(100.0, 3.0, (rows, samples))
        self._bank = np.clip(noise, 0, 65535).astype("<u2")
        t = np.arange(samples, dtype=np.float32)
        self._pulse = (400.0 * np.exp(-(((t - samples / 3) / 4.0) ** 2))).astype("<u2")
        self.generated = 0

    def set_param(self, name: str, value: Any) -> Any:
        return self.params.set(name, value)

    def start_run(self) -> None:
        """Nothing to reset between runs (the runner numbers the events)."""

    def generate(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The next ``(events_per_message, event_bytes / 2)`` uint16 batch and its shared meta."""
        n = self.events_per_message
        start = int(self.rng.integers(0, self._bank.shape[0] - n + 1))
        events = self._bank[start : start + n].copy()
        pulses = self.rng.random(n) < float(self.params["pulse_fraction"])
        events[pulses] += self._pulse
        self.generated += n
        return events, {"event_bytes": self.event_bytes, "pulses": int(pulses.sum())}
