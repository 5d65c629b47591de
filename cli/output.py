"""How the CLI prints: aligned tables of escaped text, typed `--json` (and NDJSON for `--watch --json`),
times, sizes, and the variants table of a version.

Commands build rows of raw, typed values (numbers as numbers, bytes as integers, times as RFC 3339 UTC,
`None` for unset); `Column`s say how a table shows them. Text that came from devices (names, reasons,
log lines) may carry terminal control sequences: every table cell goes through `escape`, while JSON keeps
the exact text (JSON's own escaping makes it safe on a terminal).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from edgefleet.variant_metrics import VariantMetrics

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with every character Python deems unprintable (ESC, C0/C1 controls, DEL, bidi overrides,
    zero widths, separators other than the space) written as a visible escape (`\\x1b`, `\\n`, `\\u202e`), so a table shows it instead of the
    terminal obeying it."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
            )
    return "".join(out)


def plain(value: Any) -> str:
    """A raw value as a table cell: None as "-", booleans and numbers as Python writes them."""
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class Column:
    """One table column: its header, the row key it shows (default: the header) and how it shows it."""

    header: str
    key: str = ""
    show: Callable[[Any], str] = plain
    whole_row: bool = False  # `show` reads the whole row (a cell derived from several fields)

    def cell(self, row: dict[str, Any]) -> str:
        value = row if self.whole_row else row.get(self.key or self.header)
        return escape(self.show(value))


def columns(*specs: str | Column) -> list[Column]:
    return [c if isinstance(c, Column) else Column(c) for c in specs]


def print_table(rows: list[dict[str, Any]], cols: list[Column], empty: str = "(none)") -> None:
    if not rows:
        print(empty)
        return
    cells = [[c.cell(r) for c in cols] for r in rows]
    widths = [max(len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.header.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def print_json(value: Any) -> None:
    """One JSON document. ensure_ascii keeps device text exact yet writes ESC as `\\u001b`, never raw."""
    print(json.dumps(value, indent=2, sort_keys=True))


def print_json_line(value: Any) -> None:
    """One JSON object on one line (NDJSON), flushed, for `--watch --json`."""
    print(json.dumps(value, sort_keys=True, separators=(",", ":")), flush=True)


def emit(
    args: argparse.Namespace, rows: list[dict[str, Any]], cols: list[Column], empty: str = "(none)"
) -> None:
    """The rows as typed JSON under `--json` (every field), else as a table of `cols` (`empty` says what
    an empty table means)."""
    if wants_json(args):
        print_json(rows)
    else:
        print_table(rows, cols, escape(empty))


def rfc3339(ms: int) -> str | None:
    """Milliseconds since the epoch as RFC 3339 UTC ("2026-12-01T10:00:00Z", ".123" when not whole); 0 is
    unset (None)."""
    if not ms:
        return None
    at = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    text = at.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{ms % 1000:03d}Z" if ms % 1000 else f"{text}Z"


def when(stamp: str | None) -> str:
    """An RFC 3339 time from `rfc3339` in the operator's local time, as the tables show it."""
    if not stamp:
        return "-"
    at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ref_value(ref: Any) -> dict[str, str] | None:
    """A ModelRef message as typed JSON, or None when unset."""
    if not ref.target_path:
        return None
    return {
        "target_path": ref.target_path,
        "model": ref.model_name,
        "version": ref.version,
        "variant": ref.variant,
    }


def ref_text(ref: dict[str, str] | None) -> str:
    return f"{ref['model']} {ref['version']} ({ref['variant']})" if ref else "-"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
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
    print_table(
        table, columns("variant", "size", "wire", "accuracy", "latency_ms", "correct_on", "assignable")
    )
