"""The agent's configuration: a frozen dataclass with safe defaults (units in the names).

Parsed from flags and environment only in edgefleet.agent.__main__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AgentConfig:
    server: str = "127.0.0.1:7443"  # mutual TLS
    enroll_server: str = ""  # "" = the server's host, its port + 1 (server-authenticated TLS, Enroll only)
    ca_cert: Path | None = None  # the fleet CA certificate to pin at first start (from the server's data/ca/)
    insecure_plaintext: bool = False  # only for a server run as a plaintext local demo; never falls back
    state_dir: Path = Path("edgefleet-agent")
    name: str = "device"
    enroll_token: str = ""
    trust_root: Path | None = None  # root.json to pin at first start; later starts use the pinned copy
    reset_trust_root: bool = False  # replace the pinned root with trust_root and clear the metadata cache
    runtime: str = ""  # "" = the default runtime installed here
    local_socket: str = ""  # "" = <state_dir>/agent.sock; "-" = no local gRPC service
    local_port: int = 0  # also serve local inference on 127.0.0.1:PORT when set
    telemetry_interval_s: float = 10.0
    certificate_check_interval_s: float = 86_400.0  # and at start; the server says when renewal is due
    check_interval_s: float = 60.0
    probation_s: float = 5.0  # a new model is "healthy" after this long without errors
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    rpc_timeout_s: float = 15.0
    stall_timeout_s: float = 30.0  # a download that receives nothing for this long is restarted
    candidate_timeout_s: float = 60.0  # loading and testing a candidate model
    inference_timeout_s: float = 10.0
    worker_memory_limit_bytes: int = 0  # 0 = none; the address-space limit of model worker processes
    num_threads: int = 1
    telemetry_queue_size: int = 256  # reports kept while disconnected; the oldest are dropped first
    # Capabilities that cannot be discovered: declared by whoever provisions the device.
    hardware_class: str = ""
    accelerators: tuple[str, ...] = ()
    latency_budget_ms: float = 0.0
    memory_available_override_bytes: int = 0  # report less memory than the OS sees (a shared device)
    extra_labels: dict[str, str] = field(default_factory=dict)
    timezone: str = ""  # IANA name reported for maintenance windows; "" = discover it (TZ, /etc/timezone)
    # A shadow candidate (edgefleet.agent.shadow): what it may take from the served path.
    shadow_share: float = 1.0  # of served calls considered for the candidate
    shadow_max_per_s: float = 10.0  # candidate calls per second, at most
    shadow_cpu_budget: float = 0.2  # candidate busy seconds per wall second, at most
    # Install deferral asked by an application (local API DeferUpdates); a rollback is never deferred.
    max_deferral_s: int = 3600  # per request
    max_deferral_total_s: int = 4 * 3600  # per assignment: the sum of what is granted before it installs

    @property
    def enroll_address(self) -> str:
        """Where to enroll: `enroll_server`, else the server's host on the port after its own (the server's
        `--enroll-listen` default is its `--listen` port + 1 too, so the defaults meet at 7443 / 7444)."""
        if self.enroll_server:
            return self.enroll_server
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit():
            return f"{self.server}:7444"
        return f"{host}:{int(port) + 1}"

    @property
    def socket_path(self) -> str:
        if self.local_socket == "-":
            return ""
        return self.local_socket or str(self.state_dir / "agent.sock")
