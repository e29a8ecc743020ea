"""Loaded beside the addon by a test: makes the failover step raise for marked requests,
to prove one request's internal error neither kills the proxy nor hangs the client."""

from __future__ import annotations

import sys
from typing import Any


class ForceCrash:
    def running(self) -> None:
        failover = next(
            m for name, m in sys.modules.items() if name.endswith(".failover") and hasattr(m, "Failover")
        )
        original = failover.Failover.run

        async def run(self: Any, request: Any) -> Any:
            if any(name.lower() == "x-test-crash" for name, _ in request.headers):
                raise RuntimeError("forced crash for a test")
            return await original(self, request)

        failover.Failover.run = run


addons = [ForceCrash()]
