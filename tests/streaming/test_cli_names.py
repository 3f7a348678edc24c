"""The CLI takes names: `beamhub source --channel NAME` and `beamhub consume --channel NAME` against a
real DSN found the way a user's shell finds it (the state folder of a running `beamhub up`), and
the errors a user meets say what to do."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from beamhub.hub.up.lock import UpLock
from beamhub.streaming.credentials import ChannelLookupError, api_call, resolve_channel

from .dsn_helpers import Tokens, api, running_dsn

CLI = [sys.executable, "-m", "beamhub.hub.cli"]

pytestmark = pytest.mark.timeout(120)


async def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BEAMHUB_TOKEN", "BEAMHUB_DSN_URL")}
    return {**env, "BEAMHUB_HOME": str(home), **extra}


def _pretend_up(home: Path, dsn_url: str) -> UpLock:
    """The two things a running `beamhub up` leaves for the CLI: its held lock, its URLs."""
    home.mkdir(parents=True, exist_ok=True)
    lock = UpLock(home / "beamhub-up.lock")
    lock.acquire()
    (home / "runtime-urls.json").write_text(json.dumps({"dsn": dsn_url, "tokens": "http://t/"}))
    return lock


async def test_source_and_consume_by_stream_name_with_the_dsn_from_the_state_dir(tmp_path):
    tokens = Tokens()
    token = tokens.issue(scopes="stream.read stream.publish")
    async with running_dsn(tokens) as node:
        # the monitor gets frames with no work consumer: the detector's setting under `beamhub up`
        code, made = await api(
            node.url, "POST", "/api/channels", token, {"stream": "det", "when_no_consumer": "drop"}
        )
        assert code == 201, made
        lock = _pretend_up(tmp_path / "home", node.url)
        env = _env(tmp_path / "home", BEAMHUB_TOKEN=token)
        source = await asyncio.create_subprocess_exec(
            *CLI,
            *("source", "sim", "--channel", "det", "--shape", "32x32", "--rate", "50", "--run"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            code, out, err = await _cli(
                *("consume", "--channel", "det", "--count", "5", "--timeout", "40", "--json"),
                env=env,
            )
            _, channel = await api(node.url, "GET", f"/api/channels/{made['id']}", token)
        finally:
            source.terminate()
            source_out, source_err = await asyncio.wait_for(source.communicate(), 20)
            lock.release()
    assert code == 0, err + source_err.decode()
    assert "consuming monitor stream" in err  # the monitor by default: no frame taken from work
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["frames"] == 5 and summary["malformed"] == 0, summary
    # the source sent under the channel's stream name (L7 drops any other) through the DSN
    assert "stream 'det'" in source_out.decode(), source_out.decode()
    stats = channel["stats"]
    assert set(stats["drops"]) <= {"no_consumer"}, stats["drops"]  # nothing refused (stream...)
    assert [e["role"] for e in stats["consumers"].values()] == ["monitor"], stats["consumers"]
    assert channel["credentials"]["producer"] == 1 and channel["credentials"]["consumer"] == 1


async def test_names_that_do_not_resolve_say_what_to_do(tmp_path):
    tokens = Tokens()
    token = tokens.issue(scopes="stream.read stream.publish")
    async with running_dsn(tokens) as node:
        for _ in range(2):
            code, _ = await api(node.url, "POST", "/api/channels", token, {"stream": "twice"})
            assert code == 201
        code, once = await api(node.url, "POST", "/api/channels", token, {"stream": "once"})
        env = _env(tmp_path / "home", BEAMHUB_TOKEN=token)
        code, _, err = await _cli("consume", "--dsn", node.url, "--channel", "nosuch", env=env)
        assert code == 2 and "no channel streams 'nosuch' in project p1" in err, err
        assert "['once', 'twice']" in err, err
        code, _, err = await _cli("consume", "--dsn", node.url, "--channel", "twice", env=env)
        assert code == 2 and "2 channels stream 'twice'" in err and "give the channel id" in err
        # the library call behind both, by name and by id
        assert await asyncio.to_thread(resolve_channel, node.url, "once", token) == once["id"]
        assert resolve_channel(node.url, "ch-0", token) == "ch-0"  # ids are taken as given
        # a DELETE answers 204 with no body: that is success, not "cannot reach the DSN"
        answer = await asyncio.to_thread(
            api_call, node.url, "DELETE", f"/api/channels/{once['id']}", token
        )
        assert answer is None
        code, _ = await api(node.url, "GET", f"/api/channels/{once['id']}", token)
        assert code == 404
        with pytest.raises(ChannelLookupError, match="cannot reach the DSN"):
            await asyncio.to_thread(api_call, "http://127.0.0.1:9", "GET", "/api/health", token)


async def test_no_dsn_and_no_token_say_where_to_get_them(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code, _, err = await _cli("consume", "--channel", "detector", env=_env(home, BEAMHUB_TOKEN="t"))
    assert code == 2, err
    assert "--dsn: not given, and `beamhub up` is not running for" in err, err
    assert "start it with `beamhub up`" in err, err
    lock = _pretend_up(home, "http://127.0.0.1:9")
    try:
        code, _, err = await _cli("consume", "--channel", "detector", env=_env(home))
        assert code == 2 and "set BEAMHUB_TOKEN" in err and "http://t/" in err, err
        assert "beamhub token issue --project P --scope stream.read --sub" in err, err
        code, _, err = await _cli(
            "consume", "--channel", "detector", env=_env(home, BEAMHUB_TOKEN="t")
        )
        assert code == 2 and "cannot reach the DSN at http://127.0.0.1:9" in err, err
        code, out, _ = await _cli("urls", "dsn", env=_env(home))
        assert code == 0 and out.strip() == "http://127.0.0.1:9"
    finally:
        lock.release()
    code, _, err = await _cli("urls", env=_env(home))
    assert code == 3 and "not running" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another account")
async def test_a_state_dir_this_account_cannot_read_says_so(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "beamhub-up.lock").touch()
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = await asyncio.create_subprocess_exec(
        *nobody,
        *CLI,
        *("consume", "--channel", "detector"),
        env=_env(home, BEAMHUB_TOKEN="t"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, err
    assert b"is not readable by this account" in err and b"(--dsn URL)" in err, err
