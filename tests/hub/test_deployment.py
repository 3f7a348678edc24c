"""beamhub.yaml: the shipped example equals the embedded defaults; every bad field is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from beamhub.hub.up.deployment import DeploymentError, default_deployment_path, load_deployment

ROOT = Path(__file__).resolve().parents[2]


def test_example_is_the_embedded_default() -> None:
    assert (ROOT / "beamhub.yaml").read_text() == default_deployment_path().read_text()
    dep = load_deployment(ROOT / "beamhub.yaml")
    assert dep.enclave == "dev"
    assert dep.user("alice").projects == {"p-1001": "pi"}
    assert dep.user("mallory").projects == {}
    assert load_deployment(None).source == "<embedded defaults>"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("hub: {prot: 1}\n", "hub.prot", "unknown key"),
        ("bogus: 1\n", "bogus", "unknown key"),
        ("hub: {port: 70000}\n", "hub.port", "65535"),
        ("hub: {port: '80'}\n", "hub.port", "integer"),
        ("enclave: secret\n", "enclave", "unknown enclave"),
        ("tokens: {ttl: 0}\n", "tokens.ttl", "positive"),
        (
            "identity: {users: [{username: a, projects: {p-1: boss}}]}\n",
            "identity.users[0].projects.p-1",
            "unknown role",
        ),
        (
            "identity: {users: [{username: a}, {username: a}]}\n",
            "identity.users[1].username",
            "duplicate",
        ),
        ("detector: {shape: [1]}\n", "detector.shape", "two positive"),
        ("hub: [1, 2]\n", "hub", "mapping"),
        ("hub: {ip: 0.0.0.0}\n", "hub.ip", "loopback"),
        ("tokens: {ttl: 5000, max_ttl: 600}\n", "tokens.ttl", "cap"),
        ("a: [\n", "<file>", "YAML"),
        ("gateway: {maintenance: {start: 1}}\n", "gateway.maintenance", "list"),
        (
            "gateway: {maintenance: [{start: x, end: y, what: z}]}\n",
            "gateway.maintenance[0].start",
            "ISO 8601",
        ),
        (
            "gateway: {maintenance: [{start: 2030-01-01T06:00:00Z, end: 2030-01-01T05:00:00Z, "
            "what: z}]}\n",
            "gateway.maintenance[0].end",
            "not after start",
        ),
        (
            "gateway: {maintenance: [{start: 2030-01-01T06:00:00Z, end: 2030-01-01T07:00:00Z}]}\n",
            "gateway.maintenance[0].what",
            "required",
        ),
        (
            "gateway: {maintenance: [{start: a, end: b, what: c, why: d}]}\n",
            "gateway.maintenance[0].why",
            "unknown key",
        ),
    ],
)
def test_bad_field_is_named(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = tmp_path / "beamhub.yaml"
    path.write_text(text)
    with pytest.raises(DeploymentError) as err:
        load_deployment(path)
    assert err.value.field == field
    assert words in str(err.value)
    assert str(path) in str(err.value)


def test_maintenance_windows_are_read_as_utc(tmp_path: Path) -> None:
    path = tmp_path / "beamhub.yaml"
    path.write_text(
        "gateway: {maintenance: [{start: 2030-01-01T06:00:00Z, "
        "end: '2030-01-01T10:00:00+02:00', what: filesystem upgrade}]}\n"
    )
    (window,) = load_deployment(path).gateway.maintenance
    assert (window.start, window.end) == ("2030-01-01T06:00:00Z", "2030-01-01T08:00:00Z")
    assert window.what == "filesystem upgrade"
    assert load_deployment(None).gateway.maintenance == []


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="cannot read"):
        load_deployment(tmp_path / "nope.yaml")


def test_missing_keys_take_the_embedded_defaults(tmp_path: Path) -> None:
    path = tmp_path / "beamhub.yaml"
    path.write_text("hub: {port: 0}\ntokens: {ttl: 60}\n")
    dep = load_deployment(path)
    assert dep.hub.port == 0 and dep.hub.ip == "127.0.0.1"
    assert dep.tokens.ttl == 60 and dep.tokens.issuer == "beamhub-dev"
    assert [u.username for u in dep.identity.users][:2] == ["alice", "oscar"]
    path.write_text("identity: {users: [{username: zed, projects: {p-9: viewer}}]}\n")
    assert [u.username for u in load_deployment(path).identity.users] == ["zed"]


def test_a_broken_enclave_profile_is_an_error_never_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken moderate.yaml must stop the deployment, not quietly weaken the enclave."""
    from beamhub.hub import enclave

    shipped = (enclave.ENCLAVE_DIR / "moderate.yaml").read_text()
    (tmp_path / "moderate.yaml").write_text(
        shipped.replace("max_token_ttl: 900", "max_token_ttl: soon")
    )
    monkeypatch.setattr(enclave, "ENCLAVE_DIR", tmp_path)
    cfg = tmp_path / "beamhub.yaml"
    cfg.write_text("enclave: moderate\n")
    with pytest.raises(DeploymentError) as err:
        load_deployment(cfg)
    assert err.value.field == "enclave"
    assert "moderate.yaml" in str(err.value) and "max_token_ttl" in str(err.value)


def test_each_scheduler_backend_gets_only_the_options_it_knows(tmp_path) -> None:
    """The SLURM backend refuses the local backend's ``nodes`` (it has a cluster of its own)."""
    from beamhub.kernels.backends import check_backend_options

    cfg = tmp_path / "beamhub.yaml"
    for text, backend in [("{backend: slurm}", "slurm"), ("{backend: local, nodes: 3}", "local")]:
        cfg.write_text(f"scheduler: {text}\n")
        options = load_deployment(cfg).scheduler.backend_options()
        check_backend_options(backend, options)  # raises naming an unknown option
    assert options == {"nodes": 3}
