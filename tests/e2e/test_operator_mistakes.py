"""What a careless operator runs into, on a real server over mutual TLS: a push interrupted before it was
signed, a server whose disk fills during an upload, a CLI aimed where no server listens. Each one ends
with one line that says what happened and what to do, and a state the next command can recover from."""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import v1_running

from edgefleet import signing
from edgefleet.cli.client import CliError, Operator
from edgefleet.cli.exits import INTERRUPTED, UNREACHABLE, Interrupted
from edgefleet.cli.publish import push_model
from edgefleet.devtools.localfleet import LocalFleet, wait_for
from edgefleet.devtools.modelgen import build_large_mlp


def _operator(fleet: LocalFleet) -> Operator:
    return Operator(
        argparse.Namespace(
            server=fleet.address,
            tls_dir=str(fleet.data_dir / "operator"),
            insecure_plaintext=False,
            token_file="",
        )
    )


def _signed(fleet: LocalFleet, name: str, version: str) -> list[bool]:
    return [
        m["signed"] for m in fleet.cli_json("model", "list") if (m["name"], m["version"]) == (name, version)
    ]


def test_a_push_interrupted_before_it_is_signed_says_so_and_the_same_push_again_signs_it(
    fleet: LocalFleet, digits_files: dict[str, Path]
) -> None:
    def ctrl_c(_path: str, _custom: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # the operator's Ctrl-C, after the upload, while the CLI signs

    with pytest.raises(Interrupted) as interrupted:
        push_model(
            _operator(fleet), digits_files["v1"].read_bytes(), "digits", "1",
            signing.load_signer(fleet.keys / "targets.key"), edit_custom=ctrl_c,
        )  # fmt: skip
    assert interrupted.value.exit_code == INTERRUPTED
    assert "run the same `edgefleet model push` again" in str(interrupted.value)
    assert _signed(fleet, "digits", "1") == [False]
    with pytest.raises(CliError, match="uploaded but not signed; run `edgefleet model push` again"):
        fleet.cli("deploy", "digits", "1", "--to", "all", "--allow-empty")

    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    assert _signed(fleet, "digits", "1") == [True]
    fleet.cli("deploy", "digits", "1", "--to", "all", "--allow-empty")


def test_a_deploy_with_a_typo_in_the_model_or_version_says_what_there_is(
    fleet: LocalFleet, digits_files: dict[str, Path]
) -> None:
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    with pytest.raises(CliError, match=r"no model digts 1; .*; did you mean digits\?$"):
        fleet.cli("deploy", "digts", "1", "--to", "all")
    with pytest.raises(CliError, match=r"no model digits 2; .*; digits has version\(s\) 1$"):
        fleet.cli("deploy", "digits", "2", "--to", "all")
    with pytest.raises(
        CliError, match=r"no model zzz 1; push it first \(`edgefleet model push`\) \(not_found\)$"
    ):
        fleet.cli("deploy", "zzz", "1", "--to", "all")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk. Needs root (CI and developer machines here run as root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_server_whose_disk_fills_during_an_upload_says_so_records_nothing_and_takes_the_push_later(
    fleet: LocalFleet, tmp_path: Path, small_disk: Path
) -> None:
    fleet.stop_server()
    blobs = fleet.data_dir / "blobs"
    shutil.rmtree(blobs)
    blobs.symlink_to(small_disk)  # the server's model files land on the small disk
    fleet.start_server()
    big = tmp_path / "big.tflite"
    big.write_bytes(build_large_mlp(4 * 2**20))

    with pytest.raises(CliError) as refused:
        fleet.cli("model", "push", str(big), "--name", "big", "--version", "1")
    assert "out of disk space" in str(refused.value) and "resource_exhausted" in str(refused.value)
    assert "internal error" not in str(refused.value)
    assert _signed(fleet, "big", "1") == []
    assert not list((small_disk / "tmp").iterdir()), "the partial upload was left behind"
    assert "Traceback" not in fleet.server_log()

    fleet.stop_server()
    blobs.unlink()  # room again
    fleet.start_server()
    fleet.cli("model", "push", str(big), "--name", "big", "--version", "1")
    assert _signed(fleet, "big", "1") == [True]


def test_a_cli_aimed_where_no_server_listens_says_unreachable_not_a_busy_database(fleet: LocalFleet) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{s.getsockname()[1]}"
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "--server", nowhere, "--tls-dir", str(fleet.data_dir / "operator"),
         "devices"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == UNREACHABLE, done.stderr
    assert f"{nowhere} is unreachable" in done.stderr and "database" not in done.stderr, done.stderr


def test_an_agent_given_the_enrollment_port_as_its_server_is_told_to_use_the_main_port(
    fleet: LocalFleet,
) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    agent.stop()
    agent = fleet.start_agent("cam", "", "--server", f"127.0.0.1:{fleet.enroll_port}", wait=False)
    wait_for(lambda: "serves only Enroll" in agent.log(), 30, "the agent to say which port is wrong")
    assert "give the agent the main port as --server" in agent.log()
    assert "Traceback" not in agent.log()


def test_a_second_rollback_does_not_send_devices_forward_to_the_version_they_left(
    fleet: LocalFleet, digits_files: dict[str, Path]
) -> None:
    agent = v1_running(fleet, digits_files)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, "digits/2/float32.tflite")
    fleet.cli("rollback", "--to", "all")
    fleet.wait_running(agent, "digits/1/float32.tflite")

    with pytest.raises(CliError) as refused:  # the same command again, from the shell's history
        fleet.cli("rollback", "--to", "all")
    assert "already went back" in str(refused.value) and "from digits/2/float32.tflite" in str(refused.value)
    assert "deploy it" in str(refused.value)
    time.sleep(2)  # a device told anything would have acted by now
    assert fleet.device(agent)["running"]["target_path"] == "digits/1/float32.tflite"
    fleet.cli("deploy", "digits", "2", "--to", "all")  # what an operator who wants v2 back does
    fleet.wait_running(agent, "digits/2/float32.tflite")
