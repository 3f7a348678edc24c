"""TokenRefresher outside a server: clear errors, and when it plans to refresh."""

from __future__ import annotations

import time

import pytest

from beamhub.auth.token_client import RefreshError, TokenRefresher
from beamhub.auth.tokens import SigningKey, TokenIssuer


def test_from_env_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BEAMHUB_TOKEN", "BEAMHUB_TOKEN_URL", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BEAMHUB_TOKEN", "x")
    with pytest.raises(RefreshError, match="BEAMHUB_TOKEN_URL, JUPYTERHUB_API_TOKEN unset"):
        TokenRefresher.from_env()


def test_margin_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="0 < margin < 1"):
        TokenRefresher("t", "http://127.0.0.1:1/", "a", margin=1.5)


def test_refresh_planned_at_the_margin() -> None:
    token = TokenIssuer(SigningKey.generate()).issue("u", "p", "stream.read", ttl=100)
    refresher = TokenRefresher(token, "http://127.0.0.1:1/services/tokens", "a", margin=0.25)
    assert refresher.service_url.endswith("/")
    assert 70 <= refresher.seconds_until_refresh() <= 75
    assert refresher.expires_at - time.time() == pytest.approx(100, abs=2)


def test_unreachable_service_is_a_refresh_error() -> None:
    token = TokenIssuer(SigningKey.generate()).issue("u", "p", "stream.read", ttl=100)
    refresher = TokenRefresher(token, "http://127.0.0.1:1/", "a", timeout=2)
    with pytest.raises(RefreshError, match="unreachable") as err:
        refresher.refresh_now()
    assert err.value.status == 0 and refresher.token == token
