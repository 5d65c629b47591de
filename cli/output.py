"""How the CLI prints: aligned tables, `--json` listings, times, sizes, and the variants table of a version."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from edgefleet.variant_metrics import VariantMetrics


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """The rows as JSON under `--json` (every field), else as a table of `columns`."""
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print_table(rows, columns)


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def ref_text(ref: Any) -> str:
    return f"{ref.model_name} {ref.version} ({ref.variant})" if ref.target_path else "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def variant_row(variant: str, length: int, d: dict[str, Any]) -> dict[str, Any]:
    """One variant's row from the measured details the server keeps for it (`details_json`)."""
    m = VariantMetrics.from_details(d, length)
    return {
        "variant": variant,
        "size_bytes": length,
        "wire_bytes": m.wire_bytes,
        "wire_encoding": m.wire_encoding,
        "accuracy": m.accuracy,
        "accuracy_delta_points": m.accuracy_delta_points,
        "max_abs_error": m.max_abs_error,
        "latency_ms": m.latency_ms,
        "peak_memory_bytes": m.peak_memory_bytes or None,
        "runtimes_ok": list(m.runtimes_ok or ()),
        "runtimes_failed": m.runtimes_failed,
        "excluded": m.excluded,
        "limited_by": m.limited_by,
    }


def print_variants(rows: list[dict[str, Any]]) -> None:
    base = next(
        (r["size_bytes"] for r in rows if r["variant"] == "float32"), rows[0]["size_bytes"] if rows else 1
    )
    table = []
    for r in rows:
        latency = ", ".join(f"{k.split('-')[0]} {v:.3f}" for k, v in sorted(r["latency_ms"].items()))
        table.append(
            {
                "variant": r["variant"],
                "size": human_bytes(r["size_bytes"]),
                "wire": f"{human_bytes(r['wire_bytes'])} ({base / max(r['wire_bytes'], 1):.1f}x smaller)",
                "accuracy": f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-",
                "latency_ms": latency or "-",
                "correct_on": ", ".join(r["runtimes_ok"]) or "none",
                "assignable": "no: " + r["excluded"] if r["excluded"] else "yes",
            }
        )
    print_table(table, ["variant", "size", "wire", "accuracy", "latency_ms", "correct_on", "assignable"])
