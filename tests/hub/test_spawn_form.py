"""The server options form on a real `beamhub up`: what it offers, what it refuses, time left.

Every request goes through the real proxy and JupyterHub with a real OIDC login; the form is
posted as a browser posts it (multipart, with the page's _xsrf), and each refusal must leave the
user without a server.
"""

from __future__ import annotations

import html
import re
import time

import requests

from beamhub.hub.login_client import spawn_form_action
from tests.hub.hubstack import RunningStack, login, server_env, spawn


def _without_server(stack: RunningStack, user: str) -> None:
    """The session's stack is shared: an earlier test may have left her server running."""
    url = f"{stack.hub}api/users/{user}/server"
    requests.delete(url, headers=stack.admin, timeout=30)
    deadline = time.monotonic() + 30
    while _servers(stack, user):
        assert time.monotonic() < deadline, f"{user}'s server did not stop"
        time.sleep(0.25)


def _form(stack: RunningStack, session: requests.Session) -> requests.Response:
    page = session.get(stack.hub + "spawn", timeout=30)
    assert page.status_code == 200, (page.status_code, page.url)
    assert spawn_form_action(page) is not None, page.text[-2000:]
    return page


def _post(session: requests.Session, page: requests.Response, **fields: str) -> requests.Response:
    return session.post(spawn_form_action(page), files={k: (None, v) for k, v in fields.items()})


def _error(answer: requests.Response) -> str:
    match = re.search(r'class="spawn-error-msg[^"]*">(.*?)</p>', answer.text, re.S)
    assert match, answer.text[-2000:]
    return html.unescape(match.group(1)).strip()


def _servers(stack: RunningStack, user: str) -> dict:
    r = requests.get(f"{stack.hub}api/users/{user}", headers=stack.admin, timeout=10)
    if r.status_code == 404:  # she never signed in during this session: no server either
        return {}
    return r.json()["servers"]


def test_form_offers_her_projects_and_usable_tiers_with_reasons(dev_stack: RunningStack) -> None:
    _without_server(dev_stack, "oscar")
    session, _ = login(dev_stack, "oscar", "oscar-dev")
    page = _form(dev_stack, session)
    text = page.text
    assert '<option value="p-1001" selected>p-1001 (operator)</option>' in text
    assert "p-2002" not in text  # carol's project: oscar has no role there
    # interactive is the default tier now; beamtime is shown, disabled, with the reason
    assert re.search(r'value="interactive" checked>', text), text
    assert re.search(r'value="beamtime" disabled>', text), text
    assert "not now: no approved beamtime window open for p-1001 now" in html.unescape(text)
    # the inputs carry the tier's limits: 8 h and 1 node at interactive, 8 Dask workers
    assert 'name="walltime" min="0.25" step="0.25" max="8"' in text
    assert 'name="nodes" min="1" max="1"' in text
    assert 'name="dask_workers" min="0" max="8"' in text


def test_each_field_is_refused_by_name_with_its_limit(dev_stack: RunningStack) -> None:
    """The browser's min/max are a convenience: the hub checks every field of the POST."""
    _without_server(dev_stack, "bob")
    session, _ = login(dev_stack, "bob", "bob-dev")
    page = _form(dev_stack, session)
    cases = [
        (
            {"walltime": "12"},
            400,
            "walltime: 12 h is over tier 'interactive''s limit of 8 h",
        ),
        ({"walltime": "soon"}, 400, "walltime: 'soon' is not a number of hours"),
        (
            {"tier": "beamtime"},
            403,
            "tier: you may not use 'beamtime' now: no approved beamtime window open for p-1001",
        ),
        ({"tier": "gold"}, 400, "tier: unknown tier 'gold'"),
        (
            {"project": "p-2002"},
            403,
            "project: you hold no role in project 'p-2002' that may run a server (yours: p-1001)",
        ),
        ({"nodes": "2"}, 400, "nodes: 2 is over tier 'interactive''s limit of 1 node(s)"),
        ({"nodes": "0"}, 400, "nodes: 0 is under the minimum of 1 node"),
        (
            {"dask_workers": "99"},
            400,
            "dask_workers: 99 Dask workers is over the limit of 8 per server",
        ),
    ]
    for fields, status, message in cases:
        answer = _post(session, page, **fields)
        assert answer.status_code == status, (fields, answer.status_code)
        assert _error(answer).startswith(f"Error: {message}"), (fields, _error(answer))
        assert 'id="spawn_form"' in answer.text  # the form again, to correct the field
        assert _servers(dev_stack, "bob") == {}, fields


def test_viewer_is_sent_to_the_dashboard_not_a_form(dev_stack: RunningStack) -> None:
    session, _ = login(dev_stack, "vera", "vera-dev")
    page = session.get(dev_stack.hub + "spawn", timeout=30)
    assert page.status_code == 403
    assert 'id="spawn_form"' not in page.text
    assert "As a viewer of p-1001 you watch the experiment on the shared dashboard" in page.text
    assert 'href="/services/dashboard/">Open the dashboard</a>' in page.text
    # nor can she post the form directly
    token = session.cookies.get("_xsrf")
    answer = session.post(
        dev_stack.hub + "spawn", files={"project": (None, "p-1001")}, params={"_xsrf": token}
    )
    assert answer.status_code == 403, answer.status_code
    assert _servers(dev_stack, "vera") == {}


def test_chosen_options_reach_the_job_and_home_warns_of_walltime(dev_stack: RunningStack) -> None:
    """A 15 min walltime: the job gets it, and the home page warns at once (warning: 15 min)."""
    _without_server(dev_stack, "oscar")
    session, _ = login(dev_stack, "oscar", "oscar-dev")
    try:
        server = spawn(
            dev_stack, session, "oscar", options={"walltime": "0.25", "dask_workers": "3"}
        )
        assert server["user_options"] == {
            "project": "p-1001",
            "tier": "interactive",
            "walltime_s": 900,
            "nodes": 1,
            "dask_workers": 3,
        }
        env = server_env(dev_stack, "oscar")
        assert (env["BEAMHUB_WALLTIME_S"], env["BEAMHUB_DASK_WORKERS"]) == ("900", "3")
        home = session.get(dev_stack.hub + "home", timeout=30)
        assert home.status_code == 200
        box = re.search(r'<div id="beamhub-time-left".*?</div>', home.text, re.S)
        assert box, home.text[-3000:]
        left = re.search(r'class="beamhub-left">(\d+) min<', box.group(0))
        assert left, box.group(0)
        assert 13 <= int(left.group(1)) <= 15, left.group(1)  # 15 min from the job's start
        assert "alert-warning" in box.group(0)
        assert "Your server stops soon:" in box.group(0)
        assert "p-1001, tier interactive" in box.group(0)
    finally:
        requests.delete(
            f"{dev_stack.hub}api/users/oscar/server", headers=dev_stack.admin, timeout=30
        )
