"""Role on every write, in the DSN: a channel is changed only by its owner, an operator or the PI
of its project; a per-user quota inside the project's keeps a reserve for PI and operators.
Real tokens (scopes of each project role), a real DSN over HTTP."""

from __future__ import annotations

import pytest

from beamhub.auth.roles import scopes_for
from beamhub.streaming.template import Template
from tests.streaming.dsn_helpers import Tokens, api, running_dsn

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


def token(tokens: Tokens, user: str, role: str, project: str = "p1") -> str:
    """A real project token of ``user`` holding every scope of ``role``."""
    return tokens.issue(project, " ".join(scopes_for(role)), sub=user)


WRITES = [
    ("DELETE", "", None),
    ("POST", "/renew", {"ttl": 60}),
    ("PUT", "/source_control", {"source_control": "http://127.0.0.1:9"}),
    ("POST", "/credentials", {"face": "producer", "public_key": "x" * 40}),
]


async def test_only_owner_operator_or_pi_change_a_channel(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:
        detector = token(tokens, "beamhub-detector", "operator")
        code, det = await api(node.url, "POST", "/api/channels", detector, {"stream": "det"})
        assert code == 201, det
        bob = token(tokens, "bob", "member")
        code, bobs = await api(node.url, "POST", "/api/channels", bob, {"stream": "bob"})
        assert code == 201, bobs
        carol = token(tokens, "carol", "member")
        viewer = token(tokens, "vic", "viewer")
        outsider_pi = token(tokens, "olga", "pi", project="p2")

        # a member changes neither the detector channel nor another member's
        for who, cid in ((bob, det["id"]), (carol, bobs["id"])):
            for method, tail, body in WRITES:
                code, answer = await api(node.url, method, f"/api/channels/{cid}{tail}", who, body)
                assert (code, answer["reason"]) == (403, "not_owner"), (method, tail, answer)
                assert "only its owner, an operator or the PI" in answer["message"]
        # a viewer lacks stream.publish; another project's PI is not of this project
        code, answer = await api(node.url, "DELETE", f"/api/channels/{det['id']}", viewer)
        assert (code, answer["reason"]) == (403, "scope")
        code, answer = await api(node.url, "DELETE", f"/api/channels/{det['id']}", outsider_pi)
        assert (code, answer["reason"]) == (403, "project")
        assert set(node.channels) == {det["id"], bobs["id"]}

        # the owner renews and registers a producer key on her own channel
        code, answer = await api(node.url, "POST", f"/api/channels/{bobs['id']}/renew", bob, {})
        assert code == 200, answer
        # an operator and the PI manage every channel of the project
        operator = token(tokens, "otto", "operator")
        code, answer = await api(node.url, "POST", f"/api/channels/{det['id']}/renew", operator, {})
        assert code == 200, answer
        code, _ = await api(node.url, "DELETE", f"/api/channels/{bobs['id']}", operator)
        assert code == 204
        pi = token(tokens, "pia", "pi")
        code, _ = await api(node.url, "DELETE", f"/api/channels/{det['id']}", pi)
        assert code == 204
        assert node.channels == {}


async def test_per_user_quota_inside_the_project_keeps_a_reserve_for_the_pi(
    tokens: Tokens,
) -> None:
    template = Template.from_mapping(
        {
            "source_cidrs": ["127.0.0.0/8"],
            "consumer_cidrs": ["127.0.0.0/8"],
            "hwm": {"min": 1, "max": 100, "default": 10},
            "max_frame_bytes": {"max": 1 << 20, "default": 1 << 20},
            "max_channels_per_project": 4,
            "max_channels_per_user": 2,
            "manager_reserve": 1,
        }
    )
    async with running_dsn(tokens, template) as node:

        async def create(who: str, role: str) -> tuple[int, dict]:
            return await api(
                node.url, "POST", "/api/channels", token(tokens, who, role), {"stream": who}
            )

        assert (await create("bob", "member"))[0] == 201
        assert (await create("bob", "member"))[0] == 201
        code, answer = await create("bob", "member")
        assert (code, answer["reason"], answer["limit"]) == (403, "max_channels_per_user", 2)
        assert (await create("carol", "member"))[0] == 201
        code, answer = await create("dave", "member")  # 3 of 4: the last is the PI's reserve
        assert (code, answer["reason"]) == (403, "max_channels"), answer
        assert "kept for its PI and operators" in answer["message"]
        code, answer = await create("pia", "pi")
        assert code == 201, answer
        code, answer = await create("otto", "operator")  # the project's own quota still holds
        assert (code, answer["reason"]) == (403, "max_channels")
        code, described = await api(
            node.url, "GET", "/api/template", token(tokens, "bob", "member")
        )
        assert (described["max_channels_per_user"], described["manager_reserve"]) == (2, 1)
