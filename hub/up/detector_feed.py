"""The simulated detector `beamhub up` runs, as its own supervised process.

It keeps one DSN channel of its project alive and steerable: creates it (an L7 channel that drops
frames nobody analyses, so dashboards are live from the start; the template's default channel if
that is refused), streams simulated frames into it, serves the source's control endpoint and
attaches it to the channel, renews the channel halfway to its expiry, and creates it again if it
disappears (deleted, or expired while the DSN was down). A DSN restart keeps the channel on the
same endpoints, so the producer socket simply reconnects. Every channel is CURVE: the feed registers
its own producer key (made here; the secret never leaves) on each channel it creates, and its
control endpoint accepts the steering credentials the DSN mints per call (verified with the DSN's
``/api/relay-jwks``), never a caller's token from the DSN. Its tokens (subject
:data:`DETECTOR_USER`, an operator of its project) come from the token service through the
mint-for API; it verifies steering callers with the published JWKS and never opens the signing key.

``python -m beamhub.hub.up.detector_feed CONFIG.json`` with ``$BEAMHUB_MINT_TOKEN`` (its JupyterHub
API token); it writes ``{"channel": id, ...}`` to the config's ``channel_file`` whenever its
channel changes, which is how `beamhub up` knows which channel to show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import zmq

from beamhub.auth.jwks import RemoteJwksVerifier
from beamhub.auth.mint_client import MintError, MintForClient
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import CurveKeys, SourceRunner
from beamhub.streaming.source_control import SourceControlServer

__all__ = ["DETECTOR_USER", "DetectorFeed", "FeedConfig", "main"]

log = logging.getLogger("beamhub.up.detector")

#: The token subject of the detector (an operator of its project in the token register).
DETECTOR_USER = "beamhub-detector"
#: Seconds between checks that the channel still exists.
CHECK_S = 2.0


class FeedError(RuntimeError):
    """The feed cannot (yet) run; the message says why."""


def feed_config(
    *,
    dsn_url: str,
    tokens_url: str,
    project: str,
    stream: str,
    rate_hz: float,
    shape: list[int],
    hit_fraction: float,
    issuer: str,
    audience: str,
    channel_file: str,
) -> dict[str, Any]:
    """The JSON config `beamhub up` writes for the feed (no secrets: the API token is in env)."""
    return {k: v for k, v in locals().items()}


FeedConfig = dict[str, Any]


class DetectorFeed:
    """One channel, one simulated source, its control endpoint; kept alive by :meth:`run`."""

    def __init__(self, cfg: FeedConfig, tokens: MintForClient) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.verifier = RemoteJwksVerifier(
            cfg["tokens_url"] + "jwks.json", issuer=cfg["issuer"], audience=cfg["audience"]
        )
        self.channel: dict[str, Any] | None = None
        self.notes: list[str] = []
        self._source: SourceRunner | None = None
        self._control: SourceControlServer | None = None
        self._control_url = ""
        self._lifetime = 0.0  # seconds the DSN granted at the last create or renew
        self._keypair = zmq.curve_keypair()  # the feed's producer key, registered per channel

    # --- DSN calls (blocking; run in a thread) ---------------------------------------------

    def _token(self, scopes: list[str]) -> str:
        token, _ = self.tokens.mint(
            DETECTOR_USER,
            self.cfg["project"],
            scopes,
            kind="service",
            description="beamhub up: simulated detector",
        )
        return token

    def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON answer); status 0 when the DSN cannot be reached."""
        token = self._token(["stream.read", "stream.publish", "steer"])
        req = urllib.request.Request(  # noqa: S310 - our own DSN on loopback
            self.cfg["dsn_url"] + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read())
            except ValueError:
                return exc.code, {"reason": "http", "message": f"HTTP {exc.code}"}
        except OSError as exc:
            return 0, {"reason": "unreachable", "message": str(exc)}

    def _create_channel(self) -> dict[str, Any]:
        # the producer's key named at creation: a template that requires encryption wants it
        mine = {"stream": self.cfg["stream"], "producer_keys": [self._keypair[0].decode()]}
        status, answer = self._call(
            "POST", "/api/channels", {**mine, "mode": "l7", "when_no_consumer": "drop"}
        )
        if status in (400, 403) and answer.get("field") in ("mode", "when_no_consumer"):
            self.notes.append(
                f"detector channel waits for a work consumer (the DSN template refused "
                f"{answer['field']}: {answer.get('message')}); the dashboard shows frames once "
                "analysis connects"
            )
            status, answer = self._call("POST", "/api/channels", mine)
        if status != 201:
            raise FeedError(
                f"the DSN refused the detector's channel ({status} {answer.get('reason')}, "
                f"field {answer.get('field')!r}): {answer.get('message')}"
            )
        return answer

    def _existing_channel(self) -> dict[str, Any] | None:
        """The channel this feed streamed into before it was restarted, if the DSN still has it.

        Analysis attached to that channel keeps its frames; a new channel would cut it off.
        """
        try:
            cid = json.loads(Path(self.cfg["channel_file"]).read_text())["channel"]
        except (OSError, ValueError, KeyError):
            return None
        status, answer = self._call("GET", f"/api/channels/{cid}")
        if status != 200 or answer.get("state") == "failed":
            return None
        key = {"face": "producer", "public_key": self._keypair[0].decode()}
        status, cred = self._call("POST", f"/api/channels/{cid}/credentials", key)
        if status != 201:
            log.warning("cannot stream into channel %s again (%s); creating a new one", cid, cred)
            return None
        log.warning("restarted: streaming into channel %s again", cid)
        return answer

    # --- lifecycle ----------------------------------------------------------------------------

    async def open_channel(self, reuse: bool = False) -> None:
        """Create the channel (or, when ``reuse``, take back the one of before a restart) and
        point the source and steering at it."""
        channel = (await asyncio.to_thread(self._existing_channel)) if reuse else None
        if channel is None:
            channel = await asyncio.to_thread(self._create_channel)
        producer = channel["endpoints"]["producer"]
        if self._source is None or self._source.connect != producer:
            if self._source is not None:
                await asyncio.to_thread(self._source.stop)
            cfg = self.cfg
            generator = SimulatedDetector(
                tuple(cfg["shape"]), rate_hz=cfg["rate_hz"], hit_fraction=cfg["hit_fraction"]
            )
            curve = CurveKeys(
                public=self._keypair[0],
                secret=self._keypair[1],
                server_public=channel["endpoints"]["server_key"].encode(),
            )
            self._source = SourceRunner(
                generator, stream=cfg["stream"], connect=producer, curve=curve
            )
            await asyncio.to_thread(self._source.start)
            await asyncio.to_thread(self._source.start_run)
            if self._control is not None:
                await self._control.stop()
            self._control = SourceControlServer(
                self._source,
                verifier=self.verifier,
                project=cfg["project"],
                relay_jwks=cfg["dsn_url"] + "/api/relay-jwks",
            )
            self._control_url = await self._control.start()
        self.channel = channel
        self._lifetime = channel["expires_at"] - time.time()
        await self._attach_steering()
        self._publish()

    async def _attach_steering(self) -> None:
        assert self.channel is not None
        path = f"/api/channels/{self.channel['id']}/source_control"
        status, answer = await asyncio.to_thread(
            self._call, "PUT", path, {"source_control": self._control_url}
        )
        if status != 200:
            self.notes.append(f"detector steering not attached: {answer}")

    def _publish(self) -> None:
        assert self.channel is not None
        out = {
            "channel": self.channel["id"],
            "project": self.cfg["project"],
            "stream": self.cfg["stream"],
            "control": self._control_url,
            "notes": self.notes,
            "pid": os.getpid(),
        }
        path = Path(self.cfg["channel_file"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)

    async def watch(self, stop: asyncio.Event) -> None:
        """Renew halfway to expiry; create the channel again if it is gone."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), CHECK_S)
                return
            except TimeoutError:
                pass
            assert self.channel is not None
            cid = self.channel["id"]
            try:
                status, answer = await asyncio.to_thread(self._call, "GET", f"/api/channels/{cid}")
            except MintError as exc:
                log.warning("no token from the token service (will retry): %s", exc)
                continue
            if status == 0:
                continue  # the DSN is down; it restores the channel when it is back
            if status == 404:
                log.warning("channel %s disappeared; creating the detector's channel again", cid)
                try:
                    await self.open_channel()
                    log.warning("detector streams into channel %s", self.channel["id"])
                except (FeedError, MintError) as exc:
                    log.warning("could not create the channel again (will retry): %s", exc)
                continue
            if status == 200 and answer["expires_at"] - time.time() < self._lifetime / 2:
                renewed, fresh = await asyncio.to_thread(
                    self._call, "POST", f"/api/channels/{cid}/renew", {}
                )
                if renewed == 200:
                    self._lifetime = fresh["expires_at"] - time.time()
                else:
                    log.warning("detector channel renewal failed: %s", fresh)

    async def close(self) -> None:
        if self._control is not None:
            await self._control.stop()
        if self._source is not None:
            await asyncio.to_thread(self._source.stop)


async def _serve(cfg: FeedConfig, api_token: str) -> int:
    feed = DetectorFeed(cfg, MintForClient(cfg["tokens_url"], api_token))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await feed.open_channel(reuse=True)
    except (FeedError, MintError) as exc:
        print(f"detector feed: {exc}", file=sys.stderr, flush=True)
        await feed.close()
        return 1
    assert feed.channel is not None
    print(
        f"detector feed: streaming {cfg['stream']!r} into channel {feed.channel['id']} "
        f"(project {cfg['project']}); control endpoint {feed._control_url}",
        flush=True,
    )
    try:
        await feed.watch(stop)
    finally:
        await feed.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beamhub.hub.up.detector_feed")
    parser.add_argument("config", type=Path, help="the feed's JSON config (from beamhub up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    api_token = os.environ.get("BEAMHUB_MINT_TOKEN", "")
    if not api_token:
        print(
            "detector feed: $BEAMHUB_MINT_TOKEN (its JupyterHub API token) is not set",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_serve(json.loads(args.config.read_text()), api_token))


if __name__ == "__main__":
    sys.exit(main())
