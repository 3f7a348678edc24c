"""A Jupyter Server extension that keeps the server's delegated project token fresh.

Refresh rotates: an expired token may be refreshed only within a short grace. A notebook opened
an hour after its server started would find only an expired token if nothing refreshed it in
between — so the server itself runs one :class:`~beamhub.auth.token_client.TokenRefresher` for
its whole life, sharing the newest token through the token file that every notebook's
``TokenRefresher.from_env()`` reads. Enabled by the spawner
(``--ServerApp.jpserver_extensions``); outside a beamhub server it does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from beamhub.auth.token_client import RefreshError, TokenRefresher

__all__ = ["_jupyter_server_extension_points", "_load_jupyter_server_extension"]

log = logging.getLogger("beamhub.auth.server_refresher")


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "beamhub.auth.server_refresher"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    try:
        refresher = TokenRefresher.from_env().start()
    except RefreshError as exc:  # not spawned by beamhub: nothing to keep fresh
        serverapp.log.info("beamhub token refresher off: %s", exc)
        return
    serverapp.log.info(
        "beamhub: keeping the project token fresh in %s (next refresh in %.0f s)",
        refresher.token_file,
        refresher.seconds_until_refresh(),
    )
    serverapp.beamhub_token_refresher = refresher  # stopped with the process (daemon thread)
