"""The documentation site builds with warnings as errors, and its reference pages match the code.

The build is the real one (`sphinx-build -E -W`, as `./dev docs` runs it) into a temporary folder:
a broken link, a missing screenshot or a generator that no longer fits the code fails here.
"""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import beamhub_docs  # noqa: E402  (docs/_ext is not a package)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    build = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html"),
            *("-d", str(out / "doctrees"), str(DOCS), str(out / "html")),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert build.returncode == 0, f"sphinx-build failed:\n{build.stderr[-4000:]}"
    return out / "html"


def _text(page: Path) -> str:
    """What a reader sees: tags dropped, entities decoded, runs of spaces made one."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


@pytest.mark.timeout(180)
def test_the_site_builds_with_every_page(site: Path) -> None:
    for page in (
        "index",
        "user/beamtime",
        "user/streams",
        "admin/install",
        "admin/tenancy",
        "admin/slurm",
        "admin/enclaves",
        "reference/configuration",
        "reference/enclaves",
        "reference/hub-config",
        "reference/gateway-api",
        "reference/cli",
        "reference/errors",
        "troubleshooting",
        "architecture",
        "dmz",
    ):
        assert (site / f"{page}.html").stat().st_size > 5_000, page
    shots = {p.name for p in (site / "_images").glob("*.png")}
    assert {"notebook-03-steering.png", "dashboard-viewer.png"} <= shots


def test_configuration_reference_lists_every_key(site: Path) -> None:
    from beamhub.hub.up.deployment import Deployment

    text = _text(site / "reference/configuration.html")
    defaults = Deployment()
    for section in dataclasses.fields(Deployment):
        if section.name == "source":
            continue
        assert section.name in text, section.name
        value = getattr(defaults, section.name)
        for key in dataclasses.fields(value) if dataclasses.is_dataclass(value) else ():
            assert key.name in text, f"{section.name}.{key.name}"
    assert "is outside 0.2..5 updates per second" in text  # a check's message, from the code


def test_hub_config_reference_lists_every_trait(site: Path) -> None:
    from beamhub.hub.authenticator import BeamhubAuthenticator
    from beamhub.kernels.spawner import ReservedNodeSpawner

    text = _text(site / "reference/hub-config.html")
    for cls in (BeamhubAuthenticator, ReservedNodeSpawner):
        for name in cls.class_own_traits(config=True):
            assert name in text, f"{cls.__name__}.{name}"


def test_api_reference_lists_every_operation(site: Path) -> None:
    doc = yaml.safe_load((REPO / "hub/gateway/openapi.yaml").read_text())
    text = _text(site / "reference/gateway-api.html")
    for path, item in doc["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "delete", "patch"):
                assert f"{method.upper()} {path}" in text, (method, path)


def test_error_reference_lists_the_reasons_of_the_code(site: Path) -> None:
    found = beamhub_docs.scan_errors()
    assert {"not_owner", "policy", "expired", "scope", "not_member", "capacity"} <= set(found)
    text = _text(site / "reference/errors.html")
    for reason in found:
        assert reason in text, reason


def test_enclave_reference_shows_each_profile() -> None:
    table = beamhub_docs.gen_enclaves()
    for enclave, ttl in (("dev", "86400"), ("open", "3600"), ("moderate", "900")):
        assert enclave in table and ttl in table
    assert "CURVE on every data-plane channel" in beamhub_docs.gen_check()


def test_yaml_comments_by_dotted_key() -> None:
    text = (
        "# about a\n"
        "a: 1\n"
        "\n"
        "b:\n"
        "  c: x        # the c\n"
        "              # and more of it\n"
        "  d: [1, 2]\n"
    )
    assert beamhub_docs.yaml_comments(text) == {"a": "about a", "b.c": "the c and more of it"}


def test_a_generator_that_does_not_fit_the_code_stops_the_build() -> None:
    with pytest.raises(beamhub_docs.GeneratorError, match="unknown generator 'nope'"):
        beamhub_docs.expand("# T\n\n% beamhub:generate nope\n", "page")
    assert beamhub_docs.expand("no marker here\n") == "no marker here\n"


def test_readme_links_stay_inside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    assert "../shared" not in readme and "DESIGN.md" not in readme
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert "docs/index.md" in links
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("#"):
            continue
        target = (REPO / link.split("#")[0]).resolve()
        assert target.is_relative_to(REPO) and target.exists(), link
