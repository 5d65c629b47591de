"""The CLI as scripts use it: refusals before any request, exit codes, contexts, --version, help and
completion; the CLI runs as a subprocess where the exit code or the bytes printed are the point."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet import pki
from edgefleet.cli import config, exits
from edgefleet.cli.commands.completion import command_tree, script
from edgefleet.cli.main import build_parser, parse_args
from edgefleet.devtools.raw_rpc import call, rpc
from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.server.storage.records import now_ms
from edgefleet.v1 import common_pb2, device_pb2, operator_pb2

CONNECT = rpc("/edgefleet.v1.DeviceService/Connect")


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=60,
        errors="surrogateescape",
    )


def test_the_cli_refuses_a_bad_name_before_any_request() -> None:
    undecodable = os.fsdecode(b"\xffdigits")
    done = run_cli("--server", "127.0.0.1:1", "model", "show", undecodable, "1")
    assert (
        done.returncode == exits.USAGE and "not valid UTF-8" in done.stderr and "Traceback" not in done.stderr
    )
    done = run_cli("--server", "127.0.0.1:1", "telemetry", "c" * 200)
    assert done.returncode == exits.FAILED and "bad device" in done.stderr and "Traceback" not in done.stderr
    done = run_cli(
        "--server", "127.0.0.1:1", "--insecure-plaintext", "rollback", "--to", "all", "--reason", undecodable
    )
    assert done.returncode == exits.USAGE and "reason" in done.stderr and "Traceback" not in done.stderr


# ---- exit codes ----------------------------------------------------------------------------------------------


def test_exit_codes_are_listed_in_help_and_mean_something(tmp_path: Path) -> None:
    helped = run_cli("--help")
    assert helped.returncode == 0
    for line in exits.HELP.splitlines()[1:]:
        assert line in helped.stdout
    assert "EDGEFLEET_SERVER" in helped.stdout and "EDGEFLEET_CONTEXT" in helped.stdout
    assert run_cli("devices", "--bogus").returncode == exits.USAGE
    plaintext = ["--insecure-plaintext", "--token-file", str(tmp_path / "t")]
    (tmp_path / "t").write_text("x")
    nobody = run_cli("--server", "127.0.0.1:1", *plaintext, "devices")
    assert nobody.returncode == exits.UNREACHABLE, nobody.stderr
    assert "unreachable" in nobody.stderr and "Traceback" not in nobody.stderr


def test_every_command_has_help_with_examples() -> None:
    tree = command_tree(build_parser())
    leaves = [
        path for path, (subcommands, _) in tree.items() if path and not subcommands and path != "server"
    ]
    assert len(leaves) >= 17
    # One through the real entry point (a process of its own); the rest in this process, through the same
    # parser, for speed: a Python start-up per command cost more than the whole check.
    helped = run_cli(*leaves[0].split(), "--help")
    assert helped.returncode == 0 and "examples:\n  edgefleet" in helped.stdout, leaves[0]
    for path in leaves:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            parse_args([*path.split(), "--help"])
        assert exited.value.code == 0 and "examples:\n  edgefleet" in out.getvalue(), path


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"edgefleet {version('edgefleet')}"


def test_completion_scripts_cover_every_command_and_option() -> None:
    bash = run_cli("completion", "bash")
    assert bash.returncode == 0 and "complete -o filenames -F _edgefleet edgefleet" in bash.stdout
    for word in ("'model push'", "--watch", "set-context", "--targets-key"):
        assert word in bash.stdout
    assert subprocess.run(["bash", "-n"], input=bash.stdout, text=True).returncode == 0
    assert script(build_parser(), "zsh").startswith("# edgefleet completion for zsh")


# ---- contexts ------------------------------------------------------------------------------------------------


def test_settings_resolve_flag_over_environment_over_context_over_default(tmp_path: Path) -> None:
    path = tmp_path / "edgefleet" / "config.toml"
    cfg = config.set_context(config.CliConfig(path), "lab", server="lab:7443", tls_dir=str(tmp_path / "tls"))
    config.save(cfg)
    loaded = config.load(path)
    assert loaded.current_context == "lab" and loaded.contexts["lab"].server == "lab:7443"
    flags = {"server": None, "tls_dir": None, "keys_dir": None}
    got = config.resolve(loaded, flags, None, {})
    assert (got.server, got.tls_dir, got.keys_dir) == ("lab:7443", str(tmp_path / "tls"), "edgefleet-keys")
    got = config.resolve(loaded, flags, None, {"EDGEFLEET_SERVER": "env:1"})
    assert got.server == "env:1" and got.sources["server"] == "$EDGEFLEET_SERVER"
    got = config.resolve(loaded, {**flags, "server": "flag:1"}, None, {"EDGEFLEET_SERVER": "env:1"})
    assert got.server == "flag:1"
    with pytest.raises(exits.UsageError, match="no context 'prod'"):
        config.resolve(loaded, flags, "prod", {})
    with pytest.raises(exits.UsageError):
        config.resolve(loaded, flags, None, {"EDGEFLEET_CONTEXT": "prod"})


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "edgefleet" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('current_context = "x"\n[contexts.x]\nserver = "h:1"\ntls_dir = "operator"\n')
    got = config.resolve(config.load(path), {}, None, {})
    assert got.tls_dir == str(path.parent / "operator")


def test_a_broken_config_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "edgefleet").mkdir()
    (tmp_path / "edgefleet" / "config.toml").write_text("current_context = [")
    done = run_cli("devices", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert done.returncode == exits.FAILED and "config.toml" in done.stderr and "Traceback" not in done.stderr


def test_contexts_work_from_any_folder_through_the_cli(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    (tmp_path / "ops").mkdir()
    done = run_cli(
        "config", "set-context", "lab", "--server", "lab:7443", "--tls-dir", "ops", env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    view = json.loads(run_cli("config", "view", "--json", env=env, cwd=elsewhere).stdout)
    assert view["server"] == "lab:7443" and view["tls_dir"] == str(tmp_path / "ops")
    assert view["sources"]["server"] == "context lab"
    run_cli("config", "set-context", "prod", "--server", "prod:7443", env=env)
    assert run_cli("config", "use-context", "prod", env=env).returncode == 0
    rows = json.loads(run_cli("config", "get-contexts", "--json", env=env).stdout)
    assert [r["name"] for r in rows if r["current"]] == ["prod"]
    assert run_cli("config", "use-context", "nope", env=env).returncode == exits.USAGE
    args = parse_args(["--server", "flag:1", "devices"])
    assert isinstance(args, argparse.Namespace) and args.server == "flag:1"


# ---- deployments --watch -------------------------------------------------------------------------------------


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path) as h:
        yield h


async def test_deployments_watch_exits_3_when_devices_failed_and_streams_ndjson(
    harness: Harness, tmp_path: Path
) -> None:
    device = await harness.enroll("cam-1")
    model = await harness.publish_model("digits", "1")
    await harness.operator_stub.CreateDeployment(
        operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector="all"), timeout=10
    )
    failed = device_pb2.DeviceMessage(
        event=device_pb2.UpdateEvent(
            target_path=model.target_path,
            stage=common_pb2.UPDATE_STAGE_FAILED,
            reason="does not load",
            at_unix_ms=now_ms(),
            sequence=1,  # devices order what they send; an unordered event is ignored as a replay
            target_sha256=model.sha256,  # an event counts only for the bytes it was assigned
        )
    )
    await call(device.channel, CONNECT, [failed.SerializeToString()])
    tls = ["--server", harness.address, "--tls-dir", str(harness.data_dir / "operator")]
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}

    def watch(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*tls, "deployments", "--watch", "--interval", "0.1", *extra, env=env)

    for _ in range(50):
        done = await asyncio.to_thread(watch, "--json")
        if done.returncode != 0:
            break
        await asyncio.sleep(0.1)
    assert done.returncode == exits.DEVICES_FAILED, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    rows = [json.loads(line) for line in lines]  # NDJSON: one object per line
    last = rows[-1]
    assert (last["failed"], last["pending"], last["targeted"]) == (1, 0, 1)
    assert isinstance(last["created"], str) and last["created"].endswith("Z")
    assert last["model"] == "digits" and last["version"] == "1" and last["variant"] is None
    assert "1 of 1 device(s) failed" in done.stderr
    table = await asyncio.to_thread(watch)
    assert table.returncode == exits.DEVICES_FAILED and "FAILED" in table.stdout.splitlines()[0]
    listed = await asyncio.to_thread(run_cli, *tls, "deployments", env=env)
    assert listed.returncode == 0  # without --watch a listing is a success whatever it lists


async def test_the_enrollment_port_and_a_foreign_ca_are_explained(harness: Harness, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    operator = harness.data_dir / "operator"
    wrong_port = await asyncio.to_thread(
        run_cli, "--server", harness.enroll_address, "--tls-dir", str(operator), "devices", env=env
    )
    assert wrong_port.returncode == exits.FAILED
    assert "enrollment port" in wrong_port.stderr and "Method not found" not in wrong_port.stderr

    # A TLS folder whose CA is another fleet's: the handshake fails, and the CLI says so.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    other = pki.CertificateAuthority.create("edgefleet fleet CA")
    key = pki.new_key()
    files = pki.TlsFiles(foreign)
    files.write(key, other.issue(key.public_key(), "operator", pki.OPERATOR, days=1), other.cert)
    mismatch = await asyncio.to_thread(
        run_cli, "--server", harness.address, "--tls-dir", str(foreign), "devices", env=env
    )
    assert mismatch.returncode == exits.UNREACHABLE, mismatch.stderr
    assert "TLS handshake" in mismatch.stderr and str(foreign) in mismatch.stderr

    # A folder that mixes two fleets' files is caught before connecting; a missing file is named.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("tls.key", "tls.crt"):
        (mixed / name).write_bytes((foreign / name).read_bytes())
    (mixed / "ca.crt").write_bytes((operator / "ca.crt").read_bytes())
    done = await asyncio.to_thread(
        run_cli, "--server", harness.address, "--tls-dir", str(mixed), "devices", env=env
    )
    assert done.returncode == exits.FAILED and "not issued by" in done.stderr
    (mixed / "tls.key").unlink()
    done = await asyncio.to_thread(
        run_cli, "--server", harness.address, "--tls-dir", str(mixed), "devices", env=env
    )
    assert done.returncode == exits.FAILED and "has no tls.key" in done.stderr


def test_global_flags_work_after_the_command_and_a_portless_server_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("x")
    plaintext = ["--insecure-plaintext", "--token-file", str(token)]
    after = run_cli("devices", "--server", "127.0.0.1:1", *plaintext)
    assert after.returncode == exits.UNREACHABLE and "127.0.0.1:1" in after.stderr
    portless = run_cli("devices", "--server", "fleet.example", *plaintext)
    assert portless.returncode == exits.USAGE and "has no port" in portless.stderr
    negative = run_cli("deployments", "--watch", "--interval", "-1")
    assert negative.returncode == exits.USAGE and "Traceback" not in negative.stderr
