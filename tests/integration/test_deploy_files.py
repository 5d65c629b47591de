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

import fnmatch
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgefleet.agent
from edgefleet.agent.exits import EXIT_CONFIG_CANNOT_WORK, EXIT_REVOKED  # after these, a restart cannot help
from edgefleet.devtools.localfleet import LocalFleet
from edgefleet.devtools.modelgen import DigitsData
from edgefleet.devtools.seccomp import libseccomp

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CONTAINER = DEPLOY / "container"
UNITS = ("edgefleet-agent.service", "edgefleet-server.service")


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
    from edgefleet.devtools.seccomp import load_unit_seccomp_filters
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
@pytest.mark.skipif(libseccomp() is None, reason="libseccomp is not installed")
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
    from edgefleet.devtools.seccomp import load_unit_seccomp_filters
    load_unit_seccomp_filters({allowed!r})

    from edgefleet.server.compression import build_variants, load_eval_npz
    eval_set = load_eval_npz(Path({eval!r}).read_bytes())
    variants = build_variants(Path({model!r}).read_bytes(), eval_set, calibration=eval_set.x[:50])
    print(" ".join(v.name for v in variants))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux's")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.skipif(libseccomp() is None, reason="libseccomp is not installed")
def test_the_server_quantizes_and_measures_variants_under_its_units_memory_and_system_call_filters(
    digits_files: dict[str, Path],
) -> None:
    code = _FILTERED_VARIANTS.format(
        allowed=allowed_system_calls("edgefleet-server.service"),
        model=str(digits_files["v1"]),
        eval=str(digits_files["eval"]),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = done.stdout.split()
    # ai-edge-quantizer wrote them and both runtimes measured them in their own processes, all under the filters.
    assert {"float32", "float16", "int8-dynamic-pt", "int8-static", "int4-dynamic"} <= set(built), built


# --- the Containerfiles -----------------------------------------------------------------------------------

CONTAINERFILES = ("Containerfile.server", "Containerfile.agent")


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Containerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def copied_sources(path: Path) -> list[str]:
    sources = []
    for word, rest in instructions(path):
        if word in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            assert "--from" not in rest, "a multi-stage COPY: teach this test about stages"
            sources += parts[:-1]
    return sources


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out `relative`, by .dockerignore's rules: the last pattern that
    matches the path or one of its parent folders decides, and `!` lets a path back in."""
    result = False
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        keep = pattern.startswith("!")
        bare = pattern.removeprefix("!").strip("/")
        if any(
            fnmatch.fnmatchcase(c, bare) or fnmatch.fnmatchcase(c, bare.replace("**/", ""))
            for c in candidates
        ):
            result = not keep
    return result


def ignore_patterns(containerfile: str) -> list[str]:
    text = (CONTAINER / f"{containerfile}.dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("containerfile", CONTAINERFILES)
def test_every_file_a_containerfile_copies_exists_and_is_in_its_build_context(containerfile: str) -> None:
    sources = copied_sources(CONTAINER / containerfile)
    assert sources
    patterns = ignore_patterns(containerfile)
    for source in sources:
        assert (ROOT / source).exists(), f"{containerfile} copies {source}, which the repository lacks"
        assert not ignored(source, patterns), f"{containerfile}.dockerignore leaves out {source}"
    # The context stays small: the virtualenv, git and caches are not sent to the builder.
    for heavy in (".venv", ".git", "demo-run", "tests"):
        assert ignored(heavy, patterns), heavy


@pytest.mark.parametrize("containerfile", CONTAINERFILES)
def test_the_image_runs_as_a_user_other_than_root(containerfile: str) -> None:
    users = [rest for word, rest in instructions(CONTAINER / containerfile) if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    words = [word for word, _ in instructions(CONTAINER / containerfile)]
    assert words.index("USER") < words.index("ENTRYPOINT")


@pytest.mark.parametrize("containerfile", CONTAINERFILES)
def test_a_containerfile_installs_only_extras_the_package_declares(containerfile: str) -> None:
    declared = set(importlib.metadata.metadata("edgefleet").get_all("Provides-Extra") or [])
    installs = [
        rest
        for word, rest in instructions(CONTAINER / containerfile)
        if word == "RUN" and "pip install" in rest
    ]
    (install,) = installs
    match = re.search(r'"/src\[([a-z,]+)\]"', install)
    assert match, install
    assert set(match[1].split(",")) <= declared, (match[1], declared)


def test_the_server_image_publishes_both_ports_and_keeps_data_and_keys_in_volumes() -> None:
    steps = instructions(CONTAINER / "Containerfile.server")
    exposed = {port for word, rest in steps if word == "EXPOSE" for port in rest.split()}
    assert exposed == {"7443", "7444"}
    volumes = {v for word, rest in steps if word == "VOLUME" for v in json.loads(rest)}
    assert volumes == {"/var/lib/edgefleet-server", "/etc/edgefleet/keys"}
    entrypoint = json.loads(next(rest for word, rest in steps if word == "ENTRYPOINT"))
    assert entrypoint[entrypoint.index("--data-dir") + 1] == "/var/lib/edgefleet-server"
    assert entrypoint[entrypoint.index("--trust-root") + 1] == "/etc/edgefleet/keys/root.json"
    assert entrypoint[entrypoint.index("--listen") + 1] == "0.0.0.0:7443"


def test_the_files_a_containerfile_copies_are_enough_to_build_the_package(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for source in copied_sources(CONTAINER / "Containerfile.server"):
        if source.startswith("deploy/"):
            continue  # copied beside the package, not into /src
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, context / source)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("edgefleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("edgefleet", "edgefleet/v1", "edgefleet/server", "edgefleet/agent"):
        assert f"{package}/__init__.py" in names, package


def test_the_server_images_health_check_answers_serving_and_fails_without_a_server(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    steps = instructions(CONTAINER / "Containerfile.server")
    check = json.loads(next(rest for word, rest in steps if word == "HEALTHCHECK").split(" CMD ", 1)[1])
    copied = next(rest.split() for word, rest in steps if word == "COPY" and "healthcheck.py" in rest)
    assert check[1] == copied[-1], "HEALTHCHECK runs the file the image copies"
    script = CONTAINER / "healthcheck.py"
    up = subprocess.run(
        [
            sys.executable,
            str(script),
            "--data-dir",
            str(fleet.data_dir),
            "--address",
            f"localhost:{fleet.port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (up.returncode, up.stdout.strip()) == (0, "SERVING"), up.stdout + up.stderr
    fleet.stop_server()
    down = subprocess.run(
        [
            sys.executable,
            str(script),
            "--data-dir",
            str(fleet.data_dir),
            "--address",
            f"localhost:{fleet.port}",
            "--timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1, down.stdout + down.stderr
    first_start = subprocess.run(
        [sys.executable, str(script), "--data-dir", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first_start.returncode == 1 and "no operator certificate yet" in first_start.stdout
