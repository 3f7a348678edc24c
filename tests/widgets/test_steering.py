"""SteeringPanel against a real in-process DSN, a simulated detector and real HTTP: controls from
the schema, changes that reach the source with rev/first frame/round trip shown, view-only tokens,
bounds and DSN refusals shown in the panel (never raised)."""

from __future__ import annotations

import time

import ipywidgets as w
import pytest

from beamhub.bench.steer_stack import SteerStack
from beamhub.streaming.analysis import Analyzer
from beamhub.streaming.consumer import StreamConsumer
from beamhub.widgets.liveview import LiveView
from beamhub.widgets.steering import VIEW_ONLY_NOTE, SteeringPanel, _control_for, control_label

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def stack():
    with SteerStack(shape=(128, 128), rate_hz=50.0) as running:
        yield running


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)
    return value


def source_values(stack: SteerStack) -> dict:
    return stack.runner.status()["values"]


def test_one_control_per_schema_parameter_with_bounds_and_units(stack: SteerStack) -> None:
    panel = SteeringPanel(stack.dsn_url, "det", stack.token())
    try:
        schema = {p["name"]: p for p in stack.runner.schema()}
        assert panel.channel_id == stack.channel_id and panel.can_steer and panel.user == "alice"
        assert set(panel.controls) == set(schema)
        for name, control in panel.controls.items():
            spec = schema[name]
            assert isinstance(control, w.FloatSlider if spec["type"] == "float" else w.IntSlider)
            assert (control.min, control.max, control.step) == (
                spec["min"],
                spec["max"],
                spec["step"],
            )
            assert control.description == control_label(name, spec["units"])
            assert not control.continuous_update and not control.disabled
            assert control.value == source_values(stack)[name]
        assert VIEW_ONLY_NOTE not in panel.note.value
    finally:
        panel.close()


def test_labels_are_written_for_people() -> None:
    assert control_label("sample_position_um", "um") == "sample position (µm)"
    assert control_label("detector_distance_mm", "mm") == "detector distance (mm)"
    assert control_label("gain", "") == "gain"


def test_choice_and_bool_parameters_get_a_dropdown_and_a_toggle() -> None:
    mode = _control_for(
        {"name": "mode", "type": "choice", "choices": ["a", "b"], "units": "", "description": "d"},
        "b",
    )
    loop = _control_for({"name": "loop", "type": "bool", "units": "", "description": "d"}, True)
    assert isinstance(mode, w.Dropdown) and mode.options == ("a", "b") and mode.value == "b"
    assert isinstance(loop, w.ToggleButton) and loop.value is True
    with pytest.raises(ValueError, match="unsupported type"):
        _control_for({"name": "x", "type": "complex"}, 1)


def test_slider_change_steers_and_shows_rev_first_frame_and_round_trip(stack) -> None:
    token = stack.token()
    consumer = StreamConsumer.from_dsn(stack.dsn_url, stack.channel_id, token, exclusive=True)
    view = LiveView.from_consumer(consumer, Analyzer())
    panel = SteeringPanel(stack.dsn_url, stack.channel_id, token, live_view=view)
    try:
        wait_for(lambda: view.results_seen > 3, what="analysed frames")
        before = stack.runner.status()["rev"]
        panel.controls["sample_position_um"].value = 40.0  # what moving the slider does
        assert panel.wait_idle(10)
        answer = panel.last_answer
        assert answer["name"] == "sample_position_um" and answer["value"] == 40.0
        assert answer["rev"] == before + 1 and answer["first_seq"] >= 0
        assert source_values(stack)["sample_position_um"] == 40.0  # the source itself changed
        assert f"rev {answer['rev']}" in panel.status.value
        change = panel.changes[0]
        wait_for(lambda: change["round_trip_ms"] is not None, what="first frame with new rev")
        assert change["seen_seq"] >= answer["first_seq"]
        assert 0 < change["round_trip_ms"] < 5000
        assert "round trip" in panel.status.value
        assert (
            "alice" in panel.table.value
            and f"{change['round_trip_ms']:.0f} ms" in panel.table.value
        )
    finally:
        panel.close()
        view.close()


def test_viewer_gets_disabled_controls_and_cannot_change_the_source(stack) -> None:
    panel = SteeringPanel(stack.dsn_url, "det", stack.token("stream.read", sub="bob"))
    try:
        before = stack.runner.status()
        assert not panel.can_steer and panel.user == "bob"
        assert all(c.disabled for c in panel.controls.values())
        assert panel.start_button.disabled and panel.stop_button.disabled
        assert VIEW_ONLY_NOTE in panel.note.value
        panel.controls["hit_fraction"].value = 0.9  # even if a value is forced
        assert panel.wait_idle(2)
        assert VIEW_ONLY_NOTE in panel.status.value
        assert panel.controls["hit_fraction"].value == before["values"]["hit_fraction"]
        assert panel.set("hit_fraction", 0.9) is None
        panel.stop_button.click()
        after = stack.runner.status()
        assert after["rev"] == before["rev"] and after["values"] == before["values"]
        assert after["running"] is True
    finally:
        panel.close()


def test_out_of_bounds_is_clamped_by_the_widget_and_a_dsn_400_is_shown(stack) -> None:
    panel = SteeringPanel(stack.dsn_url, "det", stack.token())
    try:
        panel.controls["sample_position_um"].value = 1e6
        assert panel.wait_idle(10)
        assert panel.last_answer["value"] == 500.0  # the slider's maximum was sent, not 1e6
        assert source_values(stack)["sample_position_um"] == 500.0
        rev = stack.runner.status()["rev"]
        assert panel.set("sample_position_um", 1e6) is None  # past the widget: the DSN says no
        assert "HTTP 400" in panel.status.value and "maximum 500" in panel.status.value
        assert stack.runner.status()["rev"] == rev
        assert panel.controls["sample_position_um"].value == 500.0
    finally:
        panel.close()


def test_a_token_that_loses_steer_gets_the_dsn_403_shown(stack) -> None:
    tokens = {"now": stack.token()}
    panel = SteeringPanel(stack.dsn_url, "det", lambda: tokens["now"])
    try:
        value = source_values(stack)["beam_intensity"]
        tokens["now"] = stack.token("stream.read")  # refreshed after the role was lowered
        panel.controls["beam_intensity"].value = 2.0
        assert panel.wait_idle(10)
        assert "HTTP 403" in panel.status.value and "steer" in panel.status.value
        assert source_values(stack)["beam_intensity"] == value
        assert panel.controls["beam_intensity"].value == value  # put back to the source's value
    finally:
        panel.close()


def test_unreachable_or_foreign_channel_is_shown_not_raised(stack) -> None:
    other = SteeringPanel(stack.dsn_url, "det", stack.token(project="p2"))
    assert "no channel streams 'det'" in other.last_error and not other.controls
    assert other.last_error.split(": ", 1)[1] in other.status.value.replace("&#x27;", "'")
    other.close()
    foreign = SteeringPanel(stack.dsn_url, stack.channel_id, stack.token(project="p2"))
    assert "HTTP 403" in foreign.last_error and "project" in foreign.last_error
    foreign.close()
    dead = SteeringPanel("http://127.0.0.1:9", "ch-0123", stack.token(), timeout=2)
    assert "cannot reach the DSN" in dead.last_error and "cannot reach" in dead.status.value
    dead.close()


def test_a_burst_of_slider_moves_sends_only_the_last_value(stack) -> None:
    panel = SteeringPanel(stack.dsn_url, "det", stack.token(), debounce_s=0.3)
    try:
        rev = stack.runner.status()["rev"]
        for value in range(1, 11):  # ten moves within the debounce window
            panel.controls["sample_position_um"].value = float(value)
        assert panel.wait_idle(10)
        assert stack.runner.status()["rev"] == rev + 1  # one change reached the source
        assert source_values(stack)["sample_position_um"] == 10.0
        assert len(panel.changes) == 1 and panel.changes[0]["value"] == 10.0
    finally:
        panel.close()


def test_recent_changes_name_who_and_notice_another_client(stack) -> None:
    alice = SteeringPanel(stack.dsn_url, "det", stack.token(sub="alice"))
    carol = SteeringPanel(stack.dsn_url, "det", stack.token(sub="carol"))
    try:
        assert alice.set("peaks_per_hit", 31)["value"] == 31
        assert carol.set("peaks_per_hit", 32)["rev"] == alice.rev + 1
        assert "carol" in carol.table.value and "alice" not in carol.table.value
        alice.refresh()  # alice's panel learns the source moved on without her
        assert alice.controls["peaks_per_hit"].value == 32
        assert alice.changes[0]["user"] == "(another client)"
        assert "(another client)" in alice.table.value and "alice" in alice.table.value
    finally:
        alice.close()
        carol.close()


def test_float_slider_values_are_sent_at_the_step_precision(stack) -> None:
    panel = SteeringPanel(stack.dsn_url, "det", stack.token())
    try:
        panel.controls["hit_fraction"].value = 0.7 + 0.1  # 0.7999999999999999 in binary
        assert panel.wait_idle(10)
        assert panel.last_answer["value"] == 0.8 and source_values(stack)["hit_fraction"] == 0.8
    finally:
        panel.close()
