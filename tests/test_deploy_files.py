"""The files that run edgefleet on real machines (deploy/): systemd units and container definitions.

What is checked here, and how:
- `systemd-analyze verify` accepts each unit (skipped where systemd-analyze is missing);
- the properties that matter are parsed out of the units: a revoked device (exit 77) or a configuration that
  cannot work (exit 78) is never restarted, the state directory, the user, the hardening;
- the hardening does not break inference: the agent's model worker loads and runs a model on each runtime
  under the seccomp rules that `MemoryDenyWriteExecute=yes` and the unit's `SystemCallFilter=` install
  (built here with libseccomp, as systemd 252 builds them);
- the Containerfiles copy only what exists, run as a user other than root, and their health check answers
  SERVING against a real server (no container engine runs here, so the images themselves are not built).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import edgefleet.agent
import numpy as np
import pytest

from edgefleet.modelgen import DigitsData

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CONTAINER = DEPLOY / "container"
UNITS = ("edgefleet-agent.service", "edgefleet-server.service")
# The agent's exit codes after which a restart cannot help (edgefleet.agent.__main__).
EXIT_REVOKED = 77
EXIT_CONFIG_CANNOT_WORK = 78


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value given, in order (systemd's keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    return parse_unit(SYSTEMD / name)["Service"]


def last(settings: dict[str, list[str]], key: str) -> str:
    assert key in settings, f"{key}= is not set"
    return settings[key][-1]


# --- systemd-analyze verify --------------------------------------------------------------------------------


def _verify_root(tmp_path: Path, unit: str) -> Path:
    """A root for `systemd-analyze verify --root`: the system's own units (for the targets ours name), ours,
    and a stand-in for the program ExecStart names (verify refuses a unit whose program is missing)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(SYSTEMD / unit, root / "etc/systemd/system" / unit)
    program = Path(last(service(unit), "ExecStart").split()[0].lstrip("-@:+!"))
    stand_in = root / program.relative_to("/")
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.skipif(not Path("/usr/lib/systemd/system").is_dir(), reason="no /usr/lib/systemd/system")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(unit: str, tmp_path: Path) -> None:
    root = _verify_root(tmp_path, unit)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on an unknown key or a value it cannot parse, and only says so: any output is a failure.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


# --- what the units say --------------------------------------------------------------------------------


def test_a_revoked_agent_or_one_whose_configuration_cannot_work_is_not_restarted() -> None:
    agent = service("edgefleet-agent.service")
    assert last(agent, "Restart") == "on-failure"
    prevented = {int(code) for value in agent["RestartPreventExitStatus"] for code in value.split()}
    assert {EXIT_REVOKED, EXIT_CONFIG_CANNOT_WORK} <= prevented


def test_an_agent_that_fails_for_another_reason_keeps_retrying_without_hitting_the_start_limit() -> None:
    agent = service("edgefleet-agent.service")
    unit = parse_unit(SYSTEMD / "edgefleet-agent.service")["Unit"]
    # systemd's default start limit is 5 starts within 10 s; a restart delay of over 2 s never reaches it.
    assert "StartLimitBurst" not in unit and "StartLimitIntervalSec" not in unit
    assert _seconds(last(agent, "RestartSec")) > 2


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[match[2]]


def test_the_agent_keeps_its_state_in_var_lib_edgefleet_as_the_user_edgefleet() -> None:
    agent = service("edgefleet-agent.service")
    assert last(agent, "StateDirectory") == "edgefleet"
    assert last(agent, "StateDirectoryMode") == "0700", "the state directory holds the device's private key"
    assert last(agent, "User") == "edgefleet" and last(agent, "Group") == "edgefleet"
    command = last(agent, "ExecStart").split()
    assert command[command.index("--state-dir") + 1] == "%S/edgefleet"  # %S = /var/lib for a system unit
    assert command[command.index("--local-socket") + 1] == "%t/edgefleet/agent.sock"  # %t = /run
    assert last(agent, "RuntimeDirectory") == "edgefleet"
    assert last(agent, "RuntimeDirectoryMode") == "0750", "the group edgefleet reaches the socket"


def test_the_user_edgefleet_is_declared_for_systemd_sysusers() -> None:
    lines = [
        line.split()
        for line in (SYSTEMD / "edgefleet.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert any(fields[:2] == ["u", "edgefleet"] for fields in lines), lines


def test_the_server_keeps_its_state_in_var_lib_and_reads_its_keys_as_credentials() -> None:
    server = service("edgefleet-server.service")
    assert last(server, "StateDirectory") == "edgefleet-server"
    assert last(server, "DynamicUser") == "yes"
    command = last(server, "ExecStart").split()
    assert command[1] == "server"
    assert command[command.index("--data-dir") + 1] == "%S/edgefleet-server"
    credentials = {value.split(":", 1)[0] for value in server["LoadCredential"]}
    assert credentials == {"root.json", "online.key"}
    for flag, name in (("--trust-root", "root.json"), ("--online-key", "online.key")):
        assert command[command.index(flag) + 1] == f"/run/credentials/%n/{name}"


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_is_hardened(unit: str) -> None:
    settings = service(unit)
    wrong = {
        key: settings.get(key) for key, value in HARDENING.items() if settings.get(key, [None])[-1] != value
    }
    assert not wrong, wrong
    assert settings["SystemCallFilter"][0] == "@system-service"


@pytest.mark.parametrize("unit", UNITS)
def test_the_environment_file_is_optional_and_its_example_names_only_variables_that_are_read(
    unit: str,
) -> None:
    settings = service(unit)
    (environment_file,) = settings["EnvironmentFile"]
    assert environment_file.startswith("-/etc/edgefleet/"), "a missing file must not stop the service"
    example = SYSTEMD / (Path(environment_file).stem + ".env.example")
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example.read_text(), flags=re.MULTILINE)
    assert names
    command = last(settings, "ExecStart")
    source = "\n".join(p.read_text() for p in Path(edgefleet.agent.__file__).parent.rglob("*.py"))
    # libpq reads PG* itself; every other variable is one the unit's command line or the agent reads.
    unread = [
        n
        for n in names
        if not n.startswith("PG")
        and f"${n}" not in command
        and f"${{{n}}}" not in command
        and f'"{n}"' not in source
    ]
    assert not unread, unread


# --- the hardening does not break inference -------------------------------------------------------------

# Run in a fresh interpreter: load the filters, then start the agent's model worker (a further process) and
# run the model once. Filters survive exec, so the worker runs under them as it would under systemd.
_FILTERED_INFERENCE = textwrap.dedent(
    """
    import ctypes, json, mmap, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_deploy_files import load_unit_seccomp_filters
    load_unit_seccomp_filters({allowed!r})

    # The filters are live: writable and executable memory is refused.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    wx = libc.mmap(None, 4096, mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert wx in (None, ctypes.c_void_p(-1).value), "the MemoryDenyWriteExecute rule did not load"

    from edgefleet.agent.serving import ModelWorker
    worker = ModelWorker({model!r}, {runtime!r}, memory_limit_bytes=1 << 30, low_priority=True)
    try:
        worker.start(timeout=60)
        x = np.load({inputs!r})
        print(json.dumps(worker.call([x], timeout=30)[0].tolist()))
    finally:
        worker.kill()
    """
)


def _libseccomp() -> ctypes.CDLL | None:
    found = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(found) if found else None


class _ArgCompare(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def load_unit_seccomp_filters(allowed: list[str]) -> None:
    """Load into this process what systemd 252 loads for `MemoryDenyWriteExecute=yes` (seccomp-util.c:
    refuse mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC) and
    for `SystemCallFilter=` (every system call not in `allowed` fails with EPERM)."""
    lib = _libseccomp()
    assert lib is not None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCompare),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    allow, refuse = 0x7FFF0000, 0x00050000 | 1  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    masked_eq = 7  # SCMP_CMP_MASKED_EQ
    prot_write, prot_exec, shm_exec = 0x2, 0x4, 0o100000

    def rule(ctx: int, action: int, name: str, *compares: tuple[int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call on this architecture
        array = (_ArgCompare * max(1, len(compares)))(
            *(_ArgCompare(a, masked_eq, m, v) for a, m, v in compares)
        )
        assert lib.seccomp_rule_add_array(ctx, action, number, len(compares), array) == 0, name

    memory = lib.seccomp_init(allow)
    rule(memory, refuse, "mmap", (2, prot_write | prot_exec, prot_write | prot_exec))
    rule(memory, refuse, "mmap2", (2, prot_write | prot_exec, prot_write | prot_exec))
    rule(memory, refuse, "mprotect", (2, prot_exec, prot_exec))
    rule(memory, refuse, "pkey_mprotect", (2, prot_exec, prot_exec))
    rule(memory, refuse, "shmat", (2, shm_exec, shm_exec))
    assert lib.seccomp_load(memory) == 0

    calls = lib.seccomp_init(refuse)
    for name in allowed:
        rule(calls, allow, name)
    assert lib.seccomp_load(calls) == 0


def _syscall_groups() -> dict[str, list[str]]:
    """Every group `systemd-analyze syscall-filter` knows, as written (members may name other groups)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True)
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
        elif not line.strip():
            current = None
    return groups


def _expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(_expand(member, groups) for member in groups[name]))


def allowed_system_calls(unit: str) -> list[str]:
    """The system calls a unit's SystemCallFilter= lines leave allowed: the first line's allow-list minus
    every later line's deny-list (lines starting with ~), as systemd combines them."""
    groups = _syscall_groups()
    lines = service(unit)["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first filter line is an allow-list"
    allowed = set().union(*(_expand(n, groups) for n in lines[0].split()))
    for line in lines[1:]:
        names = line.removeprefix("~").split()
        chosen = set().union(*(_expand(n, groups) for n in names))
        allowed = allowed - chosen if line.startswith("~") else allowed | chosen
    return sorted(allowed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux's")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.skipif(_libseccomp() is None, reason="libseccomp is not installed")
def test_the_model_worker_runs_inference_under_the_agent_units_memory_and_system_call_filters(
    runtime: str, digits_files: dict[str, Path], digits: tuple[bytes, bytes, DigitsData], tmp_path: Path
) -> None:
    x = digits[2].x_test[:1].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    from edgefleet.runtime import make_interpreter

    bare = make_interpreter(runtime, model_path=str(digits_files["v1"]))
    bare.set_tensor(bare.get_input_details()[0]["index"], x)
    bare.invoke()
    expected = bare.get_tensor(bare.get_output_details()[0]["index"])

    code = _FILTERED_INFERENCE.format(
        tests=str(Path(__file__).parent),
        allowed=allowed_system_calls("edgefleet-agent.service"),
        model=str(digits_files["v1"]),
        runtime=runtime,
        inputs=str(tmp_path / "x.npy"),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(
        np.array(json.loads(done.stdout.splitlines()[-1]), dtype=np.float32), expected
    )


_FILTERED_VARIANTS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_deploy_files import load_unit_seccomp_filters
    load_unit_seccomp_filters({allowed!r})

    from edgefleet.server.compression import build_variants, load_eval_npz
    eval_set = load_eval_npz(Path({eval!r}).read_bytes())
    variants = build_variants(Path({model!r}).read_bytes(), eval_set, calibration=eval_set.x[:50])
    print(" ".join(v.name for v in variants))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux's")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.skipif(_libseccomp() is None, reason="libseccomp is not installed")
def test_the_server_quantizes_and_measures_variants_under_its_units_memory_and_system_call_filters(
    digits_files: dict[str, Path],
) -> None:
    code = _FILTERED_VARIANTS.format(
        tests=str(Path(__file__).parent),
        allowed=allowed_system_calls("edgefleet-server.service"),
        model=str(digits_files["v1"]),
        eval=str(digits_files["eval"]),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = done.stdout.split()
    # ai-edge-quantizer wrote them and both runtimes measured them in their own processes, all under the filters.
    assert {"float32", "float16", "int8-dynamic-pt", "int8-static", "int4-dynamic"} <= set(built), built
