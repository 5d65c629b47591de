"""How long does `edgefleet deploy --to all` take on a large fleet, and what does it cost per device?

A real server (edgefleet.devtools.inprocess: `server.app.start_server`, SQLite under a temp folder) in this
process; the devices are rows
written straight into its database (enrolling 20,000 devices through the RPC would take a minute and is
measured by `fleet_load.py`), none of them connected. For each fleet size, `Deployments.deploy` to all, as the
CreateDeployment RPC calls it: the wall time, the time per device, and whether every device's record then
points at the new deployment. Then a second deployment to all (each device is taken over from the first).

The CLI waits 30 s for CreateDeployment: that is the budget a deployment to the whole fleet must fit in.

Run: .venv/bin/python bench/deploy_scale.py [--sizes 1000,5000,20000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from edgefleet.devtools.inprocess import running_server
from edgefleet.server.repository import target_path
from edgefleet.server.storage.records import ModelRecord, now_ms

CLI_TIMEOUT_S = 30


def add_devices(fleet: object, count: int) -> None:
    engine = fleet.store.engine  # type: ignore[attr-defined]
    devices = sa.Table("devices", sa.MetaData(), autoload_with=engine)
    now = now_ms()
    rows = [
        {
            "id": f"dev-{i:06d}",
            "name": f"sim-{i}",
            "group_name": "default",
            "token_hash": secrets.token_hex(32),
            "enrolled_ms": now,
            "last_seen_ms": now,
            "current": None,
            "previous": None,
            "desired_target": "",
            "desired_deployment": "",
            "capabilities": {},
            "bad_targets": [],
            "last_stage": "",
            "last_reason": "",
            "rollback_command": "",
            "revoked": False,
            "status_sequence": 0,
            "clock_skew_ms": 0,
        }
        for i in range(count)
    ]
    with engine.begin() as conn:
        conn.execute(devices.insert(), rows)


def add_model(fleet: object, version: str) -> None:
    store = fleet.store  # type: ignore[attr-defined]
    record = ModelRecord(
        target_path("demo", version), "demo", version, "float32", "0" * 64, 1, {}, now_ms(), signed=True
    )
    store.add_model(record)
    store.mark_signed([record.target_path])


async def run(size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with running_server(Path(tmp)) as server:
            fleet = server.fleet
            await asyncio.to_thread(add_devices, fleet, size)
            for version in ("1", "2"):
                await asyncio.to_thread(add_model, fleet, version)
            for version in ("1", "2"):
                started = time.perf_counter()
                status = await fleet.deployments.deploy("demo", version, "all")
                seconds = time.perf_counter() - started
                devices = await fleet.devices.list_devices()
                pointing = sum(d.desired_deployment == status.deployment.id for d in devices)
                verdict = "within" if seconds < CLI_TIMEOUT_S else "OVER"
                print(
                    f"{size:>7} devices  deploy v{version}: {seconds:7.2f} s  "
                    f"{seconds / size * 1e6:7.0f} us/device  targeted {status.targeted}, "
                    f"records pointing at it {pointing}  ({verdict} the CLI's {CLI_TIMEOUT_S} s)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run: does it still run")
    parser.add_argument("--sizes", default="1000,5000,20000")
    args = parser.parse_args()
    if args.quick:
        args.sizes = "200"
    for size in (int(s) for s in args.sizes.split(",")):
        asyncio.run(run(size))


if __name__ == "__main__":
    main()
