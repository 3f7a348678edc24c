"""Project access tokens: issue, verify, refuse (expired, forged, wrong audience/project/scope)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import jwt
import pytest

from beamhub.auth.tokens import SigningKey, TokenError, TokenIssuer, TokenVerifier


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def issuer(key: SigningKey) -> TokenIssuer:
    return TokenIssuer(key, max_ttl=3600)


@pytest.fixture
def verifier(key: SigningKey) -> TokenVerifier:
    return TokenVerifier(key.jwks())


def test_issued_token_verifies_with_public_jwks_only(issuer, verifier):
    token = issuer.issue("alice", "p-1001", "stream.read steer", ttl=60)
    claims = verifier.verify(token, project="p-1001", scope="steer")
    assert claims.sub == "alice"
    assert claims.project == "p-1001"
    assert claims.scopes == frozenset({"stream.read", "steer"})
    assert 55 <= claims.expires_in <= 60
    assert len(claims.jti) == 32
    body = jwt.decode(token, options={"verify_signature": False})
    assert body["wlcg.ver"] == "1.0"  # WLCG profile verifiers can read it
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert token not in json.dumps(claims.log_fields())


def test_each_token_has_its_own_jti(issuer, verifier):
    a = verifier.verify(issuer.issue("alice", "p", "stream.read", ttl=60))
    b = verifier.verify(issuer.issue("alice", "p", "stream.read", ttl=60))
    assert a.jti != b.jti


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (lambda i, k: None, 401, "missing"),
        (lambda i, k: "not-a-jwt", 401, "malformed"),
        (
            lambda i, k: i.issue("alice", "p", "stream.read", ttl=60, audience="other"),
            401,
            "audience",
        ),
        (
            lambda i, k: TokenIssuer(
                SigningKey(SigningKey.generate().private_key, kid=k.kid)
            ).issue("alice", "p", "stream.read", ttl=60),
            401,
            "signature",
        ),
        (
            lambda i, k: TokenIssuer(SigningKey.generate()).issue(
                "alice", "p", "stream.read", ttl=60
            ),
            401,
            "unknown_key",
        ),
        (
            lambda i, k: TokenIssuer(k, issuer="someone-else").issue(
                "a", "p", "stream.read", ttl=60
            ),
            401,
            "issuer",
        ),
    ],
    ids=["missing", "malformed", "audience", "forged-same-kid", "unknown-key", "issuer"],
)
def test_bad_tokens_are_refused_with_a_reason(issuer, verifier, key, make, status, reason):
    with pytest.raises(TokenError) as err:
        verifier.verify(make(issuer, key))
    assert (err.value.status, err.value.reason) == (status, reason)


def test_tampered_payload_is_refused(issuer, verifier):
    head, body, sig = issuer.issue("bob", "p-1001", "stream.read", ttl=60).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"] = "stream.read steer"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError) as err:
        verifier.verify(f"{head}.{forged_body}.{sig}")
    assert err.value.reason == "signature"


def test_expired_token_is_refused(key):
    verifier = TokenVerifier(key.jwks(), leeway=0)
    token = TokenIssuer(key).issue("alice", "p", "stream.read", ttl=1)
    time.sleep(2.1)  # the clock must pass exp: there is no event to wait for
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.reason == "expired"


def test_other_project_and_missing_scope_are_403(issuer, verifier):
    token = issuer.issue("alice", "p-1001", "stream.read", ttl=60)
    with pytest.raises(TokenError) as err:
        verifier.verify(token, project="p-2002")
    assert (err.value.status, err.value.reason) == (403, "project")
    with pytest.raises(TokenError) as err:
        verifier.verify(token, project="p-1001", scope="steer")
    assert (err.value.status, err.value.reason) == (403, "scope")


def test_revoked_jti_is_refused(issuer, key):
    revoked: set[str] = set()
    verifier = TokenVerifier(key.jwks(), is_revoked=revoked.__contains__)
    token = issuer.issue("alice", "p", "stream.read", ttl=60)
    revoked.add(verifier.verify(token).jti)
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.reason == "revoked"


def test_issuer_refuses_ttl_over_cap_and_empty_scope(issuer):
    with pytest.raises(ValueError, match=r"outside 1\.\.3600"):
        issuer.issue("alice", "p", "stream.read", ttl=7200)
    with pytest.raises(ValueError, match="at least one scope"):
        issuer.issue("alice", "p", " ", ttl=60)


def test_key_round_trips_through_a_private_file(tmp_path):
    path = tmp_path / "k.pem"
    key = SigningKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SigningKey.load_or_create(path).kid == key.kid


def test_processes_starting_together_get_one_key(tmp_path):
    """The hub, token service and DSN may create the key at once: all must load the same one."""
    path = tmp_path / "k.pem"
    code = "import sys; from beamhub.auth.tokens import SigningKey; print(SigningKey.load_or_create(sys.argv[1]).kid)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    kids = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert kids == {SigningKey.load(path).kid}
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temporary files left


def test_cli_issues_a_token_the_jwks_verifies(beamhub_home):
    run = [sys.executable, "-m", "beamhub.hub.cli", "token"]
    token = subprocess.run(
        [*run, "issue", "--project", "p-9", "--scope", "stream.read", "--ttl", "30"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    jwks = json.loads(subprocess.run([*run, "jwks"], check=True, capture_output=True).stdout)
    assert TokenVerifier(jwks).verify(token, project="p-9").scopes == {"stream.read"}
    bad = subprocess.run(
        [*run, "issue", "--project", "p", "--scope", "x", "--ttl", "999999"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "ttl 999999s is outside" in bad.stderr
