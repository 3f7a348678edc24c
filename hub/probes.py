"""`beamhub check` proves by trying: short probes against the running `beamhub up`.

Reading the configuration says what a deployment intends; these probes try what a hostile member
would, against the stack that runs on the deployment's state dir:

- ``user_code_secrets``: as the Unix account that runs a member's code, read the signing key,
  the hub's runtime file (API tokens), the cookie-encryption key and another user's home;
- ``channel_credential``: connect to the detector's channel with a CURVE key it does not know
  (no frame may arrive), then with a registered one (frames must arrive: the probe can fail);
- ``revocation``: a token the DSN accepts is refused once revoked;
- ``second_factor`` (where the enclave requires MFA): a password-only user may not reach the hub,
  and an enrolled user is asked for her one-time code after the password.

Each probe is a :class:`~beamhub.hub.enclave.Requirement` (PASS/FAIL, what was tried, the fix).
They need root (or the account that runs `beamhub up`): the probe reads the stack's own
credentials to act as its users.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from beamhub.hub.enclave import Requirement

__all__ = ["ProbeUnavailable", "run_probes"]


class ProbeUnavailable(RuntimeError):
    """No stack to probe (or no right to): the message says which and what to do."""


def _runtime(state: Path) -> dict[str, Any]:
    lock = state / "beamhub-up.lock"
    try:
        info = json.loads(lock.read_text() or "{}")
    except OSError as exc:
        raise ProbeUnavailable(f"no `beamhub up` has run on {state} ({exc.strerror})") from None
    except ValueError:
        info = {}
    pid = info.get("pid")
    if not pid or not Path(f"/proc/{pid}").exists():
        raise ProbeUnavailable(f"no `beamhub up` runs on {state}: start it, then check again")
    if not info.get("urls"):
        raise ProbeUnavailable(
            f"the `beamhub up` on {state} is still starting: check again once it says 'running'"
        )
    try:
        return json.loads((state / "hub" / "runtime.json").read_text())
    except OSError as exc:
        raise ProbeUnavailable(
            f"cannot read {state / 'hub' / 'runtime.json'} ({exc.strerror}): run `beamhub check` "
            "as root (or as the account that runs `beamhub up`)"
        ) from None


def run_probes(state: Path, dep: Any, target: Any) -> list[Requirement]:
    """Every probe against the stack on ``state`` run from deployment ``dep``, for enclave
    profile ``target`` (the second-factor probe only where it requires MFA)."""
    runtime = _runtime(state)
    users = [u.username for u in dep.identity.users]
    out = [
        _user_code_secrets(state, runtime, users),
        _channel_credential(state, runtime),
        _revocation(state, runtime),
    ]
    if target.mfa_required:
        out.append(_second_factor(state, dep))
    return out


# --- user code and the hub's secrets --------------------------------------------------------


def _member_accounts(runtime: dict[str, Any], users: list[str]) -> list[pwd.struct_passwd]:
    """The Unix accounts that run the users' code (self mode: the hub's own)."""
    tenancy = runtime.get("tenancy") or {}
    if tenancy.get("run_as") != "account":
        return [pwd.getpwuid(os.geteuid())]
    template = tenancy.get("account_template") or "bh-{username}"
    found = []
    for user in users:
        try:
            found.append(pwd.getpwnam(template.format(username=user)))
        except KeyError:
            continue
    return found or [pwd.getpwnam("nobody")]


def _can_read(account: pwd.struct_passwd, path: Path) -> bool:
    argv = ["head", "-c", "1", str(path)]
    if account.pw_uid != os.geteuid():
        argv = [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--init-groups",
            "--",
            *argv,
        ]
    proc = subprocess.run(argv, capture_output=True, timeout=30)
    return proc.returncode == 0 and bool(proc.stdout)


def _user_code_secrets(state: Path, runtime: dict[str, Any], users: list[str]) -> Requirement:
    accounts = _member_accounts(runtime, users)
    secrets = [
        state / "tokens" / "signing-key.pem",
        state / "hub" / "runtime.json",
        state / "crypt-key",
        state / "hub" / "jupyterhub.sqlite",
    ]
    read: list[str] = []
    for account in accounts:
        others = [a for a in accounts if a.pw_uid != account.pw_uid]
        targets = [p for p in secrets if p.exists()]
        targets += [Path(o.pw_dir) / ".bashrc" for o in others[:1]]
        read += [f"{account.pw_name} read {p}" for p in targets if _can_read(account, p)]
    names = ", ".join(a.pw_name for a in accounts)
    return Requirement(
        "user_code_secrets",
        "a member's code reads no secret of the hub and no other user's home",
        "; ".join(read[:4]) if read else f"tried as {names}: nothing readable",
        not read,
        "run `beamhub up` as root (each user her own account and sandbox; the state dir "
        "admits only the beamhub service accounts)",
    )


# --- channel credentials --------------------------------------------------------------------


def _mint(runtime: dict[str, Any], project: str, scopes: list[str], ttl: int = 120) -> str:
    from beamhub.auth.mint_client import MintForClient
    from beamhub.hub.up.detector_feed import DETECTOR_USER

    subject = (runtime.get("service_subjects") or {}).get("beamhub-detector") or {}
    if not subject.get("api_token"):
        raise ProbeUnavailable("the stack runs no detector (detector.enabled: false)")
    tokens = f"http://{runtime['ip']}:{runtime['services']['tokens']['port']}/services/tokens/"
    token, _ = MintForClient(tokens, subject["api_token"]).mint(
        DETECTOR_USER, project, scopes, kind="service", ttl=ttl, description="beamhub check probe"
    )
    return token


def _detector(state: Path) -> tuple[str, str]:
    feed = json.loads((state / "detector" / "detector.json").read_text())
    config = json.loads((state / "detector-config.json").read_text())
    return feed["channel"], config["project"]


def _frames(consumer: Any, seconds: float) -> int:
    got, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        if consumer.receive(timeout=0.2) is not None:
            got += 1
    return got


def _channel_credential(state: Path, runtime: dict[str, Any]) -> Requirement:
    import zmq

    from beamhub.streaming.consumer import StreamConsumer

    name = "channel_credential"
    required = "a process without the channel's credential receives no frame"
    try:
        channel, project = _detector(state)
        token = _mint(runtime, project, ["stream.read"])
    except (OSError, ValueError, KeyError, ProbeUnavailable) as exc:
        return Requirement(name, required, f"not probed: {exc}", False, "run the detector")
    except Exception as exc:  # MintError and friends: the stack did not cooperate
        return Requirement(name, required, f"not probed: {exc}", False, "see beamhub status")
    dsn = runtime["dsn_url"]
    stranger = StreamConsumer.from_dsn(
        dsn, channel, token, monitor=True, curve_keypair=zmq.curve_keypair()
    )
    try:
        leaked = _frames(stranger, 3.0)
    finally:
        stranger.close()
    known = StreamConsumer.from_dsn(dsn, channel, token, monitor=True)
    try:
        received = _frames(known, 3.0)
    finally:
        known.close()
    actual = (
        f"unknown key: {leaked} frames in 3 s; registered key: {received} frames in 3 s "
        f"(channel {channel})"
    )
    if not received:
        return Requirement(name, required, actual + ": inconclusive", False, "is the detector on?")
    return Requirement(
        name, required, actual, leaked == 0, "use a DSN template: every channel is CURVE"
    )


# --- revocation -------------------------------------------------------------------------------


def _dsn_status(runtime: dict[str, Any], token: str) -> int:
    req = urllib.request.Request(  # noqa: S310 - the stack's own DSN on loopback
        runtime["dsn_url"] + "/api/channels", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _revocation(state: Path, runtime: dict[str, Any]) -> Requirement:
    from beamhub.auth.service_call import post_json

    name, required = "revocation", "a revoked token is refused within the revocation poll"
    try:
        _, project = _detector(state)
        token = _mint(runtime, project, ["stream.read"])
    except Exception as exc:  # no detector, a refusal: say so
        return Requirement(name, required, f"not probed: {exc}", False, "run the detector")
    before = _dsn_status(runtime, token)
    tokens = f"http://{runtime['ip']}:{runtime['services']['tokens']['port']}/services/tokens/"
    subject = runtime["service_subjects"]["beamhub-detector"]["api_token"]
    jti = json.loads(_b64(token.split(".")[1]))["jti"]
    post_json(tokens + "revoke", subject, {"jti": jti}, 10)  # its owner, the detector's subject
    poll = float(runtime.get("revocation_poll") or 5.0)
    deadline, after = time.monotonic() + poll + 5.0, before
    while time.monotonic() < deadline:
        after = _dsn_status(runtime, token)
        if after == 401:
            break
        time.sleep(0.5)
    actual = f"DSN answered {before} before revocation, {after} after"
    return Requirement(
        name,
        required,
        actual + ("" if before == 200 else ": inconclusive"),
        before == 200 and after == 401,
        "check the DSN's --revocations URL and tokens.revocation_poll",
    )


# --- a second factor --------------------------------------------------------------------------


def _second_factor(state: Path, dep: Any) -> Requirement:
    from beamhub.hub.login_client import LoginError, asks_for_code, sign_in
    from beamhub.hub.up import totp

    name, required = "second_factor", "no sign-in without a second factor"
    if dep.identity.provider != "embedded":
        return Requirement(
            name, required, "not probed: the facility's IdP (sign in there without MFA)", True
        )
    hub = json.loads((state / "runtime-urls.json").read_text())["hub"]
    secrets = totp.load_secrets(state)
    enrolled = next((u for u in dep.identity.users if u.username in secrets), None)
    bare = next((u for u in dep.identity.users if u.username not in secrets and u.projects), None)
    tried: list[str] = []
    got_in: list[str] = []
    try:
        if bare is not None:  # a password-only user: the hub must refuse her
            _, r = sign_in(hub, bare.username, bare.password)
            inside = r.status_code == 200 and "/hub/home" in r.url
            tried.append(f"{bare.username} with a password only: HTTP {r.status_code}")
            if inside:
                got_in.append(bare.username + " (password only)")
        if enrolled is not None:  # after the password the IdP must ask for the code
            # (no wrong code is sent: it would count against the user's lockout)
            _, r = sign_in(hub, enrolled.username, enrolled.password)
            asked = asks_for_code(r)
            tried.append(f"{enrolled.username} with her password: code asked {asked}")
            if not asked and r.status_code == 200 and "/hub/home" in r.url:
                got_in.append(enrolled.username + " (no code asked)")
    except (LoginError, OSError) as exc:
        return Requirement(name, required, f"not probed: {exc}", False, "is the hub up?")
    if not tried:
        return Requirement(name, required, "not probed: no dev user to try", False, "add users")
    actual = "; ".join(tried) + (f"; signed in: {', '.join(got_in)}" if got_in else "")
    return Requirement(
        name,
        required,
        actual,
        not got_in,
        "require MFA (identity.require_mfa: true, or an enclave that requires it) and enrol "
        "every user in a second factor",
    )
