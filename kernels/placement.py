"""Former name of :mod:`beamhub.kernels.backends` (the backend factory); import that instead.

Kept only while ``hub/gateway/service.py`` still imports ``SchedulerConfig`` from here (its import
is wrapped in ``except ImportError``, so removing this module would silently turn the gateway's
beamtime reservations off). Delete this module once that import names ``backends``.
"""

from beamhub.kernels.backends import SchedulerConfig

__all__ = ["SchedulerConfig"]
