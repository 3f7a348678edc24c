"""The admin template: loading validates the file; check() bounds every channel parameter."""

from __future__ import annotations

import pytest
import zmq

from beamhub.streaming.template import TEMPLATE_DIR, Template, TemplateError, TemplateViolation

KEY = zmq.curve_keypair()[0].decode()


@pytest.fixture
def default() -> Template:
    return Template.load(TEMPLATE_DIR / "default.yaml")


@pytest.fixture
def moderate() -> Template:
    return Template.load(TEMPLATE_DIR / "moderate.yaml")


def violation(template: Template, request: dict, **kw) -> TemplateViolation:
    with pytest.raises(TemplateViolation) as info:
        template.check(request, **kw)
    return info.value


def test_packaged_templates_load(default: Template, moderate: Template) -> None:
    assert default.modes == ("l4", "l7") and not default.encryption_required
    assert [str(n) for n in default.source_cidrs] == ["127.0.0.0/8"]
    assert moderate.modes == ("l7",) and moderate.encryption_required
    assert moderate.max_frame_bytes < default.max_frame_bytes
    assert Template.load().name == "default"


def test_omitted_fields_get_defaults(default: Template) -> None:
    params = default.check({"stream": "det-1"})
    assert params.mode == "l7"
    assert params.hwm == 1000
    assert params.max_frame_bytes == 64 * 1024 * 1024
    assert params.max_rate_hz is None
    assert params.source_cidrs == ("127.0.0.0/8",)
    assert params.consumer_cidrs == ("127.0.0.0/8",)
    assert params.encryption is True  # every channel is CURVE, also in dev
    assert params.producer_keys == params.consumer_keys == ()  # clients register them later
    assert params.ttl == 86400
    assert params.source_control is None


def test_values_inside_bounds_pass_through(default: Template) -> None:
    params = default.check(
        {
            "stream": "det",
            "mode": "l4",
            "source_cidrs": ["127.0.0.1", "127.1.0.0/16"],
            "consumer_cidrs": ["127.0.0.0/24"],
            "hwm": 10,
            "max_frame_bytes": 4096,
            "max_rate_hz": 120,
            "ttl": 60,
            "source_control": "http://127.0.0.1:8200/",
        }
    )
    assert params.mode == "l4"
    assert params.source_cidrs == ("127.0.0.1/32", "127.1.0.0/16")
    assert params.hwm == 10 and params.max_frame_bytes == 4096 and params.max_rate_hz == 120.0
    assert params.ttl == 60
    assert params.source_control == "http://127.0.0.1:8200"


@pytest.mark.parametrize(
    ("request_", "field", "limit", "status"),
    [
        ({"stream": "x", "hwm": 0}, "hwm", {"min": 1, "max": 10000}, 400),
        ({"stream": "x", "hwm": 10001}, "hwm", {"min": 1, "max": 10000}, 400),
        ({"stream": "x", "hwm": "10"}, "hwm", {"min": 1, "max": 10000}, 400),
        ({"stream": "x", "hwm": True}, "hwm", {"min": 1, "max": 10000}, 400),
        ({"stream": "x", "max_frame_bytes": 2**26 + 1}, "max_frame_bytes", 2**26, 400),
        ({"stream": "x", "max_rate_hz": 10001}, "max_rate_hz", 10000.0, 400),
        ({"stream": "x", "max_rate_hz": -1}, "max_rate_hz", 10000.0, 400),
        ({"stream": "x", "ttl": 86401}, "ttl", 86400, 400),
        ({"stream": "x", "source_cidrs": ["10.0.0.0/8"]}, "source_cidrs", ["127.0.0.0/8"], 403),
        ({"stream": "x", "source_cidrs": ["0.0.0.0/0"]}, "source_cidrs", ["127.0.0.0/8"], 403),
        ({"stream": "x", "source_cidrs": ["::1"]}, "source_cidrs", ["127.0.0.0/8"], 403),
        ({"stream": "x", "source_cidrs": ["127.0.0.1/8"]}, "source_cidrs", ["127.0.0.0/8"], 400),
        ({"stream": "x", "source_cidrs": []}, "source_cidrs", ["127.0.0.0/8"], 400),
        (
            {"stream": "x", "consumer_cidrs": ["192.168.1.7"]},
            "consumer_cidrs",
            ["127.0.0.0/8"],
            403,
        ),
        ({"stream": "x", "mode": "l9"}, "mode", ["l4", "l7"], 400),
        (
            {"stream": "x", "source_control": "http://10.1.2.3:80"},
            "source_control",
            ["127.0.0.0/8"],
            403,
        ),
        (
            {"stream": "x", "source_control": "http://example.org:80"},
            "source_control",
            ["127.0.0.0/8"],
            400,
        ),
        (
            {"stream": "x", "source_control": "file:///etc/passwd"},
            "source_control",
            ["127.0.0.0/8"],
            400,
        ),
    ],
)
def test_out_of_template_refused_by_name_with_limit(
    default: Template, request_: dict, field: str, limit, status: int
) -> None:
    exc = violation(default, request_)
    assert (exc.field, exc.limit, exc.status) == (field, limit, status)
    assert field in exc.message
    body = exc.to_json()
    assert body["field"] == field and body["limit"] == limit and body["reason"]


def test_malformed_requests(default: Template) -> None:
    assert violation(default, []).field == "body"
    assert violation(default, {}).field == "stream"
    assert violation(default, {"stream": "../etc"}).field == "stream"
    unknown = violation(default, {"stream": "x", "buffer": 5})
    assert unknown.field == "buffer" and unknown.reason == "unknown_field"
    assert violation(default, {"stream": "x", "producer_keys": ["short"]}).field == "producer_keys"
    assert default.check({"stream": "x", "producer_keys": [KEY]}).producer_keys == (KEY,)
    no_credential = violation(default, {"stream": "x", "encryption": False})
    assert (no_credential.field, no_credential.reason) == ("encryption", "encryption_required")


def test_channel_count_bounded(default: Template) -> None:
    default.check({"stream": "x"}, active_channels=15)
    exc = violation(default, {"stream": "x"}, active_channels=16)
    assert (exc.field, exc.limit, exc.status, exc.reason) == ("channels", 16, 403, "max_channels")


def test_moderate_requires_encryption_and_l7(moderate: Template) -> None:
    keys = {"producer_keys": [KEY], "consumer_keys": [KEY]}
    exc = violation(moderate, {"stream": "x", "encryption": False})
    assert (exc.field, exc.status, exc.reason) == ("encryption", 403, "encryption_required")
    exc = violation(moderate, {"stream": "x", "encryption": True, "consumer_keys": [KEY]})
    assert (exc.field, exc.status) == ("producer_keys", 403)
    exc = violation(moderate, {"stream": "x", "mode": "l4", **keys})
    assert (exc.field, exc.status, exc.limit) == ("mode", 403, ["l7"])
    exc = violation(moderate, {"stream": "x", "max_rate_hz": 500, **keys})
    assert (exc.field, exc.limit) == ("max_rate_hz", 240.0)
    params = moderate.check({"stream": "x", **keys})  # encryption defaults to required
    assert params.encryption and params.producer_keys == (KEY,) and params.mode == "l7"
    # consumers are not known at creation: each registers her key later with her own token
    params = moderate.check({"stream": "x", "producer_keys": [KEY]})
    assert params.consumer_keys == ()
    assert params.max_rate_hz == 120.0 and params.hwm == 200


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"hwm": {"min": 5, "max": 2, "default": 3}}, "hwm"),
        ({"hwm": {"max": 10, "default": 11}}, "hwm.default"),
        ({"hwm": 7}, "hwm"),
        ({"modes": ["l5"]}, "modes"),
        ({"default_mode": "l4", "modes": ["l7"]}, "default_mode"),
        ({"source_cidrs": ["127.0.0.1/8"]}, "source_cidrs"),
        ({"consumer_cidrs": []}, "consumer_cidrs"),
        ({"encryption_required": "yes"}, "encryption_required"),
        ({"max_lifetime_s": 0}, "max_lifetime_s"),
        ({"max_channels_per_project": -1}, "max_channels_per_project"),
        ({"max_frame_bytes": {"max": "big"}}, "max_frame_bytes.max"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_template_names_the_field(tmp_path, patch: dict, names: str) -> None:
    import yaml

    data = yaml.safe_load((TEMPLATE_DIR / "default.yaml").read_text())
    data.update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TemplateError) as info:
        Template.load(path)
    assert names in str(info.value) and str(path) in str(info.value)


def test_unreadable_or_non_yaml_template(tmp_path) -> None:
    with pytest.raises(TemplateError, match="cannot read"):
        Template.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hwm: [unclosed")
    with pytest.raises(TemplateError, match="not valid YAML"):
        Template.load(bad)
