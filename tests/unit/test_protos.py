"""The checked-in stubs are exactly what scripts/gen-protos makes from proto/: edit the .proto, regenerate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        check=True, cwd=ROOT, capture_output=True, env={"PY": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )  # fmt: skip
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    checked_in = sorted(p.relative_to(ROOT) for p in (ROOT / "edgefleet" / "v1").glob("*_pb2*"))
    assert generated == checked_in
    drifted = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not drifted, f"run scripts/gen-protos: {drifted} differ from proto/"
