"""`edgefleet-agent`: run the device agent.

    edgefleet-agent --server HOST:PORT --state-dir DIR --name NAME \
        --enroll-token TOKEN --trust-root root.json      # first start; later starts need only --state-dir
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import zoneinfo
from pathlib import Path

from edgefleet import names
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.exits import EXIT_CONFIG_CANNOT_WORK, EXIT_STOPPED, HELP, AgentExit
from edgefleet.errors import EdgefleetError
from edgefleet.logs import FORMATS, setup_logging


def known_zone(name: str) -> bool:
    """Whether `name` is a time zone zoneinfo can load (the server would read an unknown one as UTC)."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="edgefleet-agent", description="The edgefleet device agent.", epilog=HELP
    )
    p.add_argument(
        "--server", default=env("EDGEFLEET_SERVER", "127.0.0.1:7443"), help="fleet server HOST:PORT"
    )
    p.add_argument(
        "--enroll-server", default="", help="enrollment HOST:PORT (default: the --server host, its port + 1)"
    )
    p.add_argument("--ca-cert", type=Path, default=None, help="the fleet CA certificate; first start only")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="talk to a server run as a plaintext local demo (no TLS)",
    )
    p.add_argument("--state-dir", type=Path, default=Path(env("EDGEFLEET_AGENT_DIR", "edgefleet-agent")))
    p.add_argument(
        "--name",
        type=names.argument("device name"),
        default=env("EDGEFLEET_DEVICE_NAME", os.uname().nodename),
    )
    p.add_argument("--enroll-token", default=env("EDGEFLEET_ENROLL_TOKEN", ""), help="first start only")
    p.add_argument(
        "--trust-root",
        type=Path,
        default=None,
        help="the fleet's root.json; pinned at first start (until enrollment succeeds), then ignored",
    )
    p.add_argument(
        "--reset-trust-root",
        action="store_true",
        help="replace the pinned root.json with --trust-root and clear the cached metadata; for a device "
        "pinned to the wrong root, or after the fleet's root was replaced without a signed rotation",
    )
    p.add_argument("--runtime", default=env("EDGEFLEET_RUNTIME", ""), help="ai-edge-litert or tflite-runtime")
    p.add_argument("--local-socket", default="", help="Unix socket for local inference ('-' for none)")
    p.add_argument("--local-port", type=int, default=0, help="also serve local inference on 127.0.0.1:PORT")
    p.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    p.add_argument("--check-interval", type=float, default=60.0, help="seconds between fallback checks")
    p.add_argument("--probation", type=float, default=5.0, help="seconds a new model must run cleanly")
    p.add_argument("--stall-timeout", type=float, default=30.0, help="seconds without download progress")
    p.add_argument(
        "--candidate-timeout", type=float, default=60.0, help="seconds to load and test a new model"
    )
    p.add_argument("--hardware-class", default="")
    p.add_argument("--accelerator", action="append", default=[], help="declared accelerator/delegate name")
    p.add_argument("--latency-budget-ms", type=float, default=0.0)
    p.add_argument(
        "--memory-limit-mb",
        type=int,
        default=0,
        help="memory models may use (reported instead of the OS's figure)",
    )
    p.add_argument(
        "--timezone",
        default=env("EDGEFLEET_TIMEZONE", ""),
        help="the device's IANA time zone for maintenance windows (default: TZ, /etc/timezone, /etc/localtime)",
    )
    p.add_argument(
        "--shadow-max-per-s", type=float, default=10.0, help="shadow candidate calls per second, at most"
    )
    p.add_argument(
        "--shadow-cpu-budget",
        type=float,
        default=0.2,
        help="shadow candidate busy seconds per wall second, at most (1.0 = one core)",
    )
    p.add_argument(
        "--max-deferral",
        type=int,
        default=3600,
        help="seconds an application may defer installs, per request",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines, and the libraries' own INFO lines"
    )
    p.add_argument("--log-format", choices=FORMATS, default=env("EDGEFLEET_LOG_FORMAT", "text"))
    a = p.parse_args(argv)
    if not 0 < a.shadow_max_per_s <= 1000 or not 0 < a.shadow_cpu_budget <= 1:
        p.error("--shadow-max-per-s must be in (0, 1000] and --shadow-cpu-budget in (0, 1]")
    if not 0 <= a.max_deferral <= 86_400:
        p.error("--max-deferral must be 0 to 86400 seconds (0 = applications cannot defer installs)")
    if a.timezone and not known_zone(a.timezone):
        p.error(
            f"--timezone {a.timezone[:80]!r} is not an IANA time zone this machine knows: write one such as "
            "Europe/Berlin (see /usr/share/zoneinfo), or leave it out to use the system's"
        )
    if a.reset_trust_root and a.trust_root is None:
        p.error("--reset-trust-root needs --trust-root (the root.json to pin instead)")
    setup_logging(a.verbose, a.log_format)
    return AgentConfig(
        server=a.server,
        enroll_server=a.enroll_server,
        ca_cert=a.ca_cert,
        insecure_plaintext=a.insecure_plaintext,
        state_dir=a.state_dir,
        name=a.name,
        enroll_token=a.enroll_token,
        trust_root=a.trust_root,
        reset_trust_root=a.reset_trust_root,
        runtime=a.runtime,
        local_socket=a.local_socket,
        local_port=a.local_port,
        telemetry_interval_s=a.telemetry_interval,
        check_interval_s=a.check_interval,
        probation_s=a.probation,
        stall_timeout_s=a.stall_timeout,
        candidate_timeout_s=a.candidate_timeout,
        hardware_class=a.hardware_class,
        accelerators=tuple(a.accelerator),
        latency_budget_ms=a.latency_budget_ms,
        memory_available_override_bytes=a.memory_limit_mb * 2**20,
        timezone=a.timezone,
        shadow_max_per_s=a.shadow_max_per_s,
        shadow_cpu_budget=a.shadow_cpu_budget,
        max_deferral_s=a.max_deferral,
    )


async def _run(config: AgentConfig) -> None:
    # The handlers go in before anything else, so SIGTERM / SIGINT stop the agent in every state.
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    agent = Agent(config)
    stop_requested_task = asyncio.ensure_future(stop_requested.wait())
    stop_requested_task.add_done_callback(lambda _: agent.stop())
    try:
        await agent.run()
    finally:
        stop_requested_task.cancel()


def main(argv: list[str] | None = None) -> None:
    """Runs the agent; exits with one of `edgefleet.agent.exits`' codes and, on failure, one line saying why."""
    config = parse_args(argv)
    try:
        asyncio.run(_run(config))
    except AgentExit as e:
        logging.getLogger("edgefleet.agent").error("%s", e)
        sys.exit(e.code)
    except EdgefleetError as e:
        # Whatever stops the agent before it runs (a refused enrollment, missing credentials) needs a person.
        logging.getLogger("edgefleet.agent").error("%s", e)
        sys.exit(EXIT_CONFIG_CANNOT_WORK)
    sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()
