"""`edgefleet server` refuses to start where it would share by accident: one data folder, one port.

Both attacks come from outside: a second real `edgefleet server` process started next to a running one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.devtools.localfleet import LocalFleet
from edgefleet.server.main import build_parser, config_from


def test_second_server_on_the_same_data_folder_exits_with_the_first_ones_pid(fleet: LocalFleet) -> None:
    second = LocalFleet(fleet.root)  # same keys, same data folder, other (free) ports
    with pytest.raises(RuntimeError) as refused:
        second.start_server()
    assert fleet.server is not None
    assert "exited with 1" in str(refused.value)
    assert f"pid {fleet.server.pid}" in str(refused.value), str(refused.value)[-2000:]
    assert "Traceback" not in second.server_log().split("exited")[-1]
    assert fleet.server.poll() is None
    fleet.cli("devices")  # the first one still serves


def test_second_server_on_another_folder_cannot_share_the_port(fleet: LocalFleet, tmp_path: Path) -> None:
    other = LocalFleet(tmp_path / "other", port=fleet.port, enroll_port=fleet.enroll_port)
    other.init_keys()
    with pytest.raises(RuntimeError) as refused:
        other.start_server()
    assert f"cannot listen on 127.0.0.1:{fleet.port}" in str(refused.value), str(refused.value)[-2000:]
    assert fleet.server is not None and fleet.server.poll() is None


def test_enrollment_listens_on_the_port_after_listen_unless_told() -> None:
    assert (
        config_from(build_parser().parse_args(["--listen", "0.0.0.0:9000"])).enroll_listen == "0.0.0.0:9001"
    )
    assert config_from(build_parser().parse_args(["--listen", "[::]:7443"])).enroll_listen == "[::]:7444"
    told = build_parser().parse_args(["--listen", "0.0.0.0:9000", "--enroll-listen", "0.0.0.0:7000"])
    assert config_from(told).enroll_listen == "0.0.0.0:7000"
    assert not config_from(told).reuse_port
