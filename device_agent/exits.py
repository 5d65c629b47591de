"""The agent's exit codes, in one place: what `edgefleet-agent` returns and what a service manager does with it.

    0   stopped (SIGTERM / SIGINT)
    2   usage: a flag is wrong (argparse's own code)
    77  revoked: the fleet revoked this device; restarting cannot help (systemd: RestartPreventExitStatus)
    78  configuration that cannot work: a missing or wrong trust root, missing files, another agent on the
        same state dir; restarting cannot help until someone fixes it

`AgentExit` carries one of them from deep inside the agent to `__main__`, with the one line to print.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError

EXIT_STOPPED = 0
EXIT_USAGE = 2
EXIT_REVOKED = 77
EXIT_CONFIG_CANNOT_WORK = 78

HELP = (
    "exit codes: 0 stopped, 2 usage, 77 revoked by the fleet (do not restart), "
    "78 configuration that cannot work (wrong or missing trust root or files, another agent on the state dir)"
)


class AgentExit(EdgefleetError):
    """The agent must stop with `code`; its message is the one line that says why."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class DeviceRevokedError(AgentExit):
    """The server refused this device as revoked: stop, and do not come back."""

    def __init__(self, message: str = "this device was revoked by the fleet; stopping"):
        super().__init__(EXIT_REVOKED, message)


class ConfigCannotWorkError(AgentExit):
    """Something only a person can fix (a file, a flag, another agent): stop without a restart loop."""

    def __init__(self, message: str):
        super().__init__(EXIT_CONFIG_CANNOT_WORK, message)
