"""Tenancy under a real `beamhub up` (issue 10, finding 1): a member attacks from her own code.

bob (member of p-1001) logs in at the IdP, starts his server and submits a job through the hub's
jobs API. His kernel and his job run as ``bh-bob`` and can read no secret of the state dir, no
other user's home, and cannot write the audit log; they can write their home and /tmp.
The deployment's ``tenancy:`` section is checked here too.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from beamhub.hub.up.deployment import DeploymentError, load_deployment, tenancy_refusal
from tests.hub.hubstack import BEAMHUB, RunningStack, login, spawn, stack_processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="accounts per user need root")

#: Run in the kernel and in a job: what the member reaches (one JSON line).
PROBE = textwrap.dedent("""
    import json, os
    state, other = {state!r}, {other!r}
    secrets = ["tokens/signing-key.pem", "crypt-key", "hub/runtime.json", "runtime.json",
               "hub/jupyterhub.sqlite", "hub/cookie_secret", "tokens/tokens.sqlite",
               "idp-config.json", "dsn/relay-key.pem", "scheduler/local-jobs.sqlite"]
    read = []
    for name in secrets + [os.path.join(other, ".bashrc")]:
        try:
            with open(os.path.join(state, name), "rb") as fh:
                fh.read(1)
            read.append(name)
        except OSError:
            pass
    wrote = []
    for path in (os.path.join(state, "audit.jsonl"), os.path.join(other, "x")):
        try:
            with open(path, "a") as fh:
                fh.write("forged")
            wrote.append(path)
        except OSError:
            pass
    mine = []
    for path in (os.path.join(os.environ["HOME"], "probe.txt"), "/tmp/probe.txt"):
        with open(path, "w") as fh:
            fh.write("ok")
        mine.append(path)
    print(json.dumps({{"uid": os.getuid(), "home": os.environ["HOME"], "read": read,
                      "wrote": wrote, "mine": mine, "lab": os.environ.get(
                      "JUPYTERLAB_WORKSPACES_DIR", "")}}))
""")


def _probe(stack: RunningStack, other_user: str) -> str:
    other = pwd.getpwnam(f"bh-{other_user}").pw_dir
    return PROBE.format(state=str(stack.state), other=other)


async def _execute(base: str, token: str, code: str, timeout: float = 60) -> str:
    """Run ``code`` in a new kernel of the server at ``base`` (/user/NAME/); its stdout."""
    headers = {"Authorization": f"token {token}"}
    r = requests.post(f"{base}api/kernels", headers=headers, json={}, timeout=30)
    assert r.status_code == 201, r.text
    kernel = r.json()["id"]
    ws_url = base.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels"
    conn = await websocket_connect(HTTPRequest(ws_url, headers=headers))
    msg_id = uuid.uuid4().hex
    conn.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {"code": code, "silent": False},
                "channel": "shell",
            }
        )
    )
    out: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(conn.read_message(), deadline - time.monotonic())
            assert raw is not None, "the kernel's websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)
        raise AssertionError("the kernel did not finish")
    finally:
        conn.close()
        requests.delete(f"{base}api/kernels/{kernel}", headers=headers, timeout=30)


def _result(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def _assert_isolated(found: dict, user: str) -> None:
    account = pwd.getpwnam(f"bh-{user}")
    assert found["uid"] == account.pw_uid != 0
    assert found["home"] == account.pw_dir
    assert found["read"] == [], f"{user}'s code read {found['read']}"
    assert found["wrote"] == [], f"{user}'s code wrote {found['wrote']}"
    assert len(found["mine"]) == 2


@pytest.mark.timeout(240)
def test_a_members_kernel_and_job_run_as_her_account_and_reach_no_secret(
    dev_stack: RunningStack,
) -> None:
    stack = dev_stack
    # alice exists first, so bob has another user's home to aim at
    for user, password in (("alice", "alice-dev"), ("bob", "bob-dev")):
        session, _ = login(stack, user, password)
        server = spawn(stack, session, user)
    account = pwd.getpwnam("bh-bob")
    assert oct(os.stat(account.pw_dir).st_mode & 0o777) == "0o700"
    singleuser = [
        p
        for p in psutil.process_iter(["name", "uids", "environ"])
        if (p.info["name"] or "").startswith("jupyterhub-sing")  # the server, not its launchers
        and (p.info["environ"] or {}).get("JUPYTERHUB_USER") == "bob"
    ]
    assert singleuser and all(p.info["uids"].real == account.pw_uid for p in singleuser)
    token = stack.user_api_token("bob")
    base = stack.hub.replace("/hub/", "") + server["url"]

    # 1. his kernel
    found = _result(asyncio.run(_execute(base, token, _probe(stack, "alice"))))
    _assert_isolated(found, "bob")
    assert found["lab"].startswith(account.pw_dir + "/")  # JupyterLab's workspaces are his

    # 2. a job through the hub's jobs API (what the gateway's `jobs` scope reaches, too)
    job = {
        "name": "probe",
        "argv": ["/usr/bin/python3", "-c", _probe(stack, "alice")],
        "env": {"HOME": "/root"},
        "mem_mb": 256,
        "walltime_s": 120,
    }
    headers = {"Authorization": f"token {token}"}
    r = requests.post(f"{stack.hub}api/beamhub/jobs", headers=headers, json=job, timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 60
    while True:
        state = requests.get(
            f"{stack.hub}api/beamhub/jobs/{job_id}", headers=headers, timeout=30
        ).json()[job_id]["state"]
        if state in ("completed", "failed"):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    out = (stack.state / "scheduler" / "job-logs" / f"{job_id}.out").read_text()
    assert state == "completed", out
    _assert_isolated(_result(out), "bob")
    audit = stack.state / "audit.jsonl"
    assert not audit.exists() or "forged" not in audit.read_text()


def _as(account: str, path: Path) -> bool:
    """True if ``account`` can read ``path`` (a real read, with its own uid and groups)."""
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={account}",
            f"--regid={account}",
            "--init-groups",
            "--",
            "head",
            "-c",
            "1",
            str(path),
        ],
        capture_output=True,
        timeout=30,
    )
    return proc.returncode == 0 and proc.stdout != b""


def test_each_service_runs_as_its_account_and_reads_only_its_secrets(
    dev_stack: RunningStack,
) -> None:
    """Finding 1 and build point 2: the signing key is the token service's alone; the hub's
    runtime file (API tokens) is root's; the file other services read holds no secret; the
    state dir admits the services' group only; only the hub's identity records users' roles."""
    stack = dev_stack
    owners = {}
    for proc in stack_processes(stack.state):
        owners.setdefault(_service_of(proc), set()).add(proc.username())
    expected = {
        "idp": "beamhub-idp",
        "dsn": "beamhub-dsn",
        "proxy": "beamhub-proxy",
        "tokens": "beamhub-tokens",
        "dashboard": "beamhub-dashboard",
        "detector": "beamhub-detector",
        "hub": "root",
        "gateway": "root",
    }
    for service, account in expected.items():
        assert owners.get(service) == {account}, (service, owners)

    state = stack.state
    info = state.stat()
    assert info.st_mode & 0o777 == 0o710 and grp.getgrgid(info.st_gid).gr_name == "beamhub"
    assert not (state / "prometheus").exists()  # monitoring is off: no folder for it
    key = state / "tokens" / "signing-key.pem"
    assert key.stat().st_uid == pwd.getpwnam("beamhub-tokens").pw_uid
    assert key.stat().st_mode & 0o077 == 0
    assert _as("beamhub-tokens", key)
    secrets = [
        key,
        state / "tokens" / "tokens.sqlite",
        state / "hub" / "runtime.json",
        state / "crypt-key",
        state / "idp-config.json",
        state / "audit.jsonl",
    ]
    for account in (
        "beamhub-dsn",
        "beamhub-dashboard",
        "beamhub-detector",
        "beamhub-proxy",
        "bh-alice",
    ):
        for path in secrets:
            assert not _as(account, path), f"{account} reads {path}"
    assert not _as("bh-alice", state / "runtime.json")  # users cannot even enter the state dir
    assert _as("beamhub-dashboard", state / "runtime.json")

    public = (state / "runtime.json").read_text()
    hub_rt = json.loads((state / "hub" / "runtime.json").read_text())
    tokens = [
        hub_rt["admin_api_token"],
        hub_rt["hub_api_token"],
        hub_rt["proxy_auth_token"],
        hub_rt["client_secret"],
        *(s["api_token"] for s in hub_rt["services"].values()),
    ]
    assert all(t not in public for t in tokens)
    # the admin token is in no process's environment (only the hub's root-only file holds it)
    for proc in stack_processes(stack.state):
        assert hub_rt["admin_api_token"] not in json.dumps(proc.environ())

    # only the hub's identity may record a user's roles at the token service
    body = {"name": "mallory", "projects": {"p-1001": "pi"}, "admin": True, "mfa": True}
    api = f"http://127.0.0.1:{hub_rt['services']['tokens']['port']}/services/tokens/api/users"
    gateway = hub_rt["services"]["gateway"]["api_token"]
    r = requests.post(api, json=body, headers={"Authorization": f"token {gateway}"}, timeout=10)
    assert r.status_code == 403 and r.json()["reason"] == "scope", r.text
    r = requests.post(
        api,
        json={**body, "projects": {"p-1001": "boss"}},
        headers={"Authorization": f"token {hub_rt['hub_api_token']}"},
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["field"] == "projects", r.text


def _service_of(proc: psutil.Process) -> str:
    line = " ".join(proc.cmdline())
    for marker, name in [
        ("idp.mjs", "idp"),
        (" dsn ", "dsn"),
        ("configurable-http-proxy", "proxy"),
        ("tokens.service", "tokens"),
        ("dashboard_service", "dashboard"),
        ("detector_feed", "detector"),
        ("jupyterhub_config", "hub"),
        ("gateway.service", "gateway"),
    ]:
        if marker in f" {line} ":
            return name
    return "other"


def test_tenancy_section_is_validated_field_by_field(tmp_path) -> None:
    bad = {
        "tenancy: {run_as: nobody}": "tenancy.run_as",
        "tenancy: {account: 'bh-user'}": "tenancy.account",
        "tenancy: {account: 'BH-{username}'}": "tenancy.account",
        "tenancy: {home_root: relative/homes}": "tenancy.home_root",
        "enclave: moderate\ntenancy: {run_as: self}": "tenancy.run_as",
    }
    for text, field in bad.items():
        path = tmp_path / "b.yaml"
        path.write_text(text + "\n")
        with pytest.raises(DeploymentError) as err:
            load_deployment(path)
        assert err.value.field == field, (text, err.value)


def test_only_the_dev_enclave_may_run_without_root(tmp_path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("enclave: moderate\n")
    moderate = load_deployment(path)
    assert tenancy_refusal(moderate, euid=0) is None
    why = tenancy_refusal(moderate, euid=1000)
    assert why and "moderate enclave refuses to start without root" in why
    dev = load_deployment(None)
    assert tenancy_refusal(dev, euid=1000) is None
    assert dev.tenancy.spawner_options(euid=1000)["run_as"] == "self"
    assert dev.tenancy.spawner_options(euid=0) == {
        "run_as": "account",
        "account_template": "bh-{username}",
        "home_root": "",
        "sandbox": True,
    }


@pytest.mark.timeout(120)
def test_check_probes_the_running_stack(dev_stack: RunningStack) -> None:
    """`beamhub check` proves by trying: against the isolated dev stack every probe passes."""
    env = {**os.environ, "BEAMHUB_HOME": str(dev_stack.state)}
    res = subprocess.run(
        [BEAMHUB, "check", "--enclave", "dev", str(dev_stack.config), "--json"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    report = json.loads(res.stdout)
    assert report["probed"].startswith("the `beamhub up` on"), report["probed"]
    found = {r["name"]: r for r in report["requirements"]}
    for name in ("user_code_secrets", "channel_credential", "revocation"):
        assert found[name]["ok"], found[name]
    assert "unknown key: 0 frames" in found["channel_credential"]["actual"]
    assert "200 before revocation, 401 after" in found["revocation"]["actual"]
    assert "second_factor" not in found  # dev requires none: not probed

    # checked for moderate, the dev stack lets bob in with his password alone
    res = subprocess.run(
        [BEAMHUB, "check", "--enclave", "moderate", str(dev_stack.config), "--json"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    found = {r["name"]: r for r in json.loads(res.stdout)["requirements"]}
    assert (
        not found["second_factor"]["ok"]
        and "bob (password only)" in found["second_factor"]["actual"]
    ), found["second_factor"]

    stopped = subprocess.run(
        [BEAMHUB, "check", "--enclave", "dev", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BEAMHUB_HOME": str(dev_stack.state.parent / "nothing-here")},
    )
    assert json.loads(stopped.stdout)["probed"].startswith("nothing: no `beamhub up` has run")


@pytest.mark.timeout(120)
def test_check_second_factor_probe_passes_on_the_moderate_stack(
    moderate_stack: RunningStack,
) -> None:
    from beamhub.hub import probes
    from beamhub.hub.up.deployment import load_deployment

    found = probes._second_factor(moderate_stack.state, load_deployment(moderate_stack.config))
    assert found.ok, found
    assert "bob with a password only: HTTP 403" in found.actual
    assert "code asked True" in found.actual


@pytest.mark.timeout(180)
def test_check_fails_a_stack_whose_user_code_reads_the_secrets(tmp_path) -> None:
    """A real dev stack that runs every user's code as its own account (tenancy.run_as: self,
    here root): `beamhub check` reads the signing key as that account and FAILs."""
    yaml_text = (
        "enclave: dev\nhub: {port: 0}\ntenancy: {run_as: self}\n"
        "dsn: {enabled: false}\ndetector: {enabled: false}\ngateway: {enabled: false}\n"
    )
    stack = RunningStack(tmp_path, yaml_text, "exposed").start()
    try:
        res = subprocess.run(
            [BEAMHUB, "check", "--enclave", "moderate", str(stack.config), "--json"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        found = {r["name"]: r for r in json.loads(res.stdout)["requirements"]}
        exposed = found["user_code_secrets"]
        assert not exposed["ok"] and "read " in exposed["actual"], exposed
        assert "signing-key.pem" in exposed["actual"], exposed
        assert res.returncode == 1
    finally:
        stack.stop_and_check()
