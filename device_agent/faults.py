"""Fault injection for tests: kill, fail, hang or fill the disk at a named step of an update.

Inert unless BOTH are set in the agent's environment (a test-only setting, never a flag or config field):
    EDGEFLEET_ALLOW_TEST_FAULTS=1
    EDGEFLEET_TEST_FAULTS=step:action[,step:action...]

Steps:   downloaded  verified  written  sealed (a local copy read and checked, not yet loaded)  activated
         committed  rolling_back
Actions: kill (SIGKILL itself)  error (a transport error)  hang (forever)  enospc (disk full)
         stop (SIGSTOP itself: the test does something to the files, then sends SIGCONT)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time

from edgefleet.errors import InvalidRequestError, TransportError

log = logging.getLogger("edgefleet.agent")

STEPS = ("downloaded", "verified", "written", "sealed", "activated", "committed", "rolling_back")
ACTIONS = ("kill", "error", "hang", "enospc", "stop")


class Faults:
    def __init__(self, plan: dict[str, str] | None = None):
        self.plan = plan or {}

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get("EDGEFLEET_TEST_FAULTS", "")
        if not spec or os.environ.get("EDGEFLEET_ALLOW_TEST_FAULTS") != "1":
            return cls()
        plan = {}
        for item in spec.split(","):
            step, _, action = item.partition(":")
            if step not in STEPS or action not in ACTIONS:
                raise InvalidRequestError(f"bad test fault {item!r}: steps {STEPS}, actions {ACTIONS}")
            plan[step] = action
        log.warning("TEST FAULTS ARMED: %s", plan)
        return cls(plan)

    def _fire(self, step: str) -> str:
        action = self.plan.get(step, "")
        if not action:
            return ""
        log.warning("test fault: %s at %s", action, step)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        if action == "error":
            raise TransportError(f"injected error at {step}")
        if action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {step})")
        return action

    def at(self, step: str) -> None:
        """For blocking code running in a worker thread."""
        if self._fire(step) == "hang":
            time.sleep(10**6)

    async def at_async(self, step: str) -> None:
        """For the event loop: a hang blocks the update, not the agent."""
        if self._fire(step) == "hang":
            await asyncio.sleep(10**6)
