"""Watch a client socket's link to the DSN, so a gap in the sequence can say why it happened.

ZeroMQ reconnects a connecting socket to the same endpoint by itself (every ``reconnect_ivl``,
100 ms by default), so a producer or consumer outlives a DSN restart without doing anything; but
the frames in flight through the dead DSN, and those a producer could not queue while it was
down, are gone. :class:`LinkWatch` reads a ZeroMQ socket monitor (``EVENT_DISCONNECTED``, then
``EVENT_HANDSHAKE_SUCCEEDED`` once a DSN answers again) from the thread that owns the socket, so
the owner can attribute the next sequence gap to :data:`DSN_RESTART` instead of leaving it bare.
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["DSN_RESTART", "LinkWatch"]

#: Loss reason: frames lost while the link to the DSN was down (it died or restarted).
DSN_RESTART = "dsn_restart"
_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED


class LinkWatch:
    """The up/down state of one connecting socket; call :meth:`poll` from the socket's thread."""

    def __init__(self, sock: zmq.Socket, what: str, log: logging.Logger) -> None:
        self.sock = sock
        self.what = what
        self.log = log
        self.events: zmq.Socket | None = sock.get_monitor_socket(_EVENTS)
        self.down = False
        self.disconnects = 0
        self.down_since: float | None = None  # monotonic
        self.last_outage_s: float | None = None

    def poll(self) -> list[str]:
        """Apply pending monitor events; return the transitions seen (``"down"``, ``"up"``)."""
        events = self.events
        seen: list[str] = []
        # EVENTS is a cheap flag read: no exception per call while nothing happened
        while events is not None and events.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(events)
            if event["event"] == zmq.EVENT_DISCONNECTED and not self.down:
                self.down, self.down_since = True, time.monotonic()
                self.disconnects += 1
                seen.append("down")
                self.log.warning(
                    "%s: lost the link to %s; ZeroMQ reconnects by itself",
                    self.what,
                    event["endpoint"].decode(errors="replace"),
                )
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.down:
                self.down = False
                self.last_outage_s = round(time.monotonic() - self.down_since, 3)
                seen.append("up")
                self.log.warning(
                    "%s: link to %s is back after %.2f s",
                    self.what,
                    event["endpoint"].decode(errors="replace"),
                    self.last_outage_s,
                )
        return seen

    def close(self) -> None:
        if self.events is None:
            return
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket or its context is already going away
        self.events.close(linger=0)
        self.events = None
