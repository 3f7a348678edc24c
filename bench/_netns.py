"""The science DMZ as three network namespaces joined by two veth pairs (iproute2, as root).

::

    instrument            dmz (IP forwarding off)             compute
    198.18.1.2 ──veth── 198.18.1.1 │ DSN │ 198.18.2.1 ──veth── 198.18.2.2
    detector source     producer faces    work/monitor faces  analysis consumers

Both end namespaces route the other side's network through the DMZ, as a facility's hosts would
through their gateway, so that what stops a packet is the DMZ itself (it forwards nothing) and not
a missing route. The addresses are from 198.18.0.0/15 (RFC 2544, benchmarking: never a real
network). Namespace names carry a random tag, so runs never meet; :meth:`DmzTopology.destroy`
removes them (and any process left inside, which only this run can have started there).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

__all__ = ["ADDRESSES", "COMPUTE_NET", "INSTRUMENT_NET", "DmzTopology", "NetnsUnavailable"]

INSTRUMENT_NET = "198.18.1.0/24"
COMPUTE_NET = "198.18.2.0/24"
ADDRESSES = {
    "instrument": "198.18.1.2",
    "dmz_instrument": "198.18.1.1",  # the DSN's instrument-side interface
    "dmz_compute": "198.18.2.1",  # the DSN's compute-side interface
    "compute": "198.18.2.2",
}
SIDES = ("instrument", "dmz", "compute")


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot build network namespaces; the message names what is missing."""


def _run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class DmzTopology:
    """Build with :meth:`create` (or ``with``), run commands inside with :meth:`argv`."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.ns = {side: f"beamhub-{side}-{self.tag}" for side in SIDES}
        # interface names: at most 15 characters
        self.links = {
            "instrument": f"bhi{self.tag}",  # in instrument
            "dmz_instrument": f"bhdi{self.tag}",  # in dmz, towards the instrument
            "dmz_compute": f"bhdc{self.tag}",  # in dmz, towards compute
            "compute": f"bhc{self.tag}",  # in compute
        }
        self.created: list[str] = []

    def argv(self, side: str, *argv: str) -> list[str]:
        """The command line that runs ``argv`` inside ``side``'s namespace."""
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def create(self) -> DmzTopology:
        """Build the namespaces, links, addresses and routes; NetnsUnavailable if not allowed."""
        if shutil.which("ip") is None:
            raise NetnsUnavailable(
                "iproute2's `ip` command is not installed (apt-get install iproute2)"
            )
        if os.geteuid() != 0:
            raise NetnsUnavailable(
                f"network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN) for `ip netns add`; "
                f"running as uid {os.geteuid()}"
            )
        try:
            for side in SIDES:
                done = _run(["ip", "netns", "add", self.ns[side]])
                if done.returncode != 0:
                    raise NetnsUnavailable(
                        f"`ip netns add` failed (network namespaces not allowed here?): "
                        f"{done.stderr.strip()}"
                    )
                self.created.append(side)
            self._veth("instrument", "dmz_instrument")
            self._veth("compute", "dmz_compute")
            for side in SIDES:
                self._ip(side, "link", "set", "lo", "up")
            for where, side in (
                ("instrument", "instrument"),
                ("dmz_instrument", "dmz"),
                ("dmz_compute", "dmz"),
                ("compute", "compute"),
            ):
                self._ip(side, "addr", "add", f"{ADDRESSES[where]}/24", "dev", self.links[where])
                self._ip(side, "link", "set", self.links[where], "up")
            self._ip("instrument", "route", "add", COMPUTE_NET, "via", ADDRESSES["dmz_instrument"])
            self._ip("compute", "route", "add", INSTRUMENT_NET, "via", ADDRESSES["dmz_compute"])
            self._exec("dmz", "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
            if self.forwarding() != "0":
                raise RuntimeError(f"IP forwarding is still on in {self.ns['dmz']}")
        except BaseException:
            self.destroy()
            raise
        return self

    def forwarding(self) -> str:
        """``net.ipv4.ip_forward`` inside the DMZ namespace (``"0"``: it routes nothing)."""
        done = self._exec("dmz", "cat", "/proc/sys/net/ipv4/ip_forward")
        return done.stdout.strip()

    def _veth(self, end: str, dmz_end: str) -> None:
        side = "instrument" if end == "instrument" else "compute"
        argv = ["ip", "link", "add", self.links[end], "netns", self.ns[side], "type", "veth"]
        argv += ["peer", "name", self.links[dmz_end], "netns", self.ns["dmz"]]
        done = _run(argv)
        if done.returncode != 0:
            raise NetnsUnavailable(f"cannot create a veth pair: {done.stderr.strip()}")

    def _ip(self, side: str, *args: str) -> None:
        done = _run(["ip", "-n", self.ns[side], *args])
        if done.returncode != 0:
            raise RuntimeError(f"ip -n {self.ns[side]} {' '.join(args)}: {done.stderr.strip()}")

    def _exec(self, side: str, *argv: str) -> subprocess.CompletedProcess:
        done = _run(self.argv(side, *argv))
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.ns[side]}: {done.stderr.strip()}")
        return done

    def destroy(self) -> None:
        """Kill what is left inside (only this run started processes there), delete the
        namespaces (their veth ends go with them). Idempotent."""
        for side in reversed(self.created):
            pids = _run(["ip", "netns", "pids", self.ns[side]]).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", self.ns[side]])
        self.created.clear()

    def __enter__(self) -> DmzTopology:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
