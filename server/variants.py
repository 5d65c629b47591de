"""Which variant of a model version a device gets: the resource rule.

Each variant carries measured figures (`ModelRecord.details`, produced by `server.compression` and signed
with the variant): which runtimes compute it correctly, its accuracy loss against the float model, its peak
interpreter memory and latency on each runtime, and its bytes on the wire. For one device the rule is:

1. drop variants the operator's tolerance excluded, that the device already refused (bad), and that its
   runtime is not measured to compute correctly;
2. drop variants whose memory on the device's runtime (beyond the runtime's own fixed cost, which every
   variant shares) exceeds its memory budget (half its available memory), or whose latency on its runtime
   exceeds its latency budget when it declares one;
3. of the rest, take the most accurate (the smallest accuracy loss; within 0.1 point counts as a tie), and
   among those the fewest bytes on the wire.

A deployment can pin one variant; it is still refused for a device whose runtime computes it wrongly or
that it does not fit. With no variant that fits, the device gets nothing and the deployment says why.
"""

from __future__ import annotations

from typing import Any

from edgefleet.server.storage.records import ModelRecord

MEMORY_BUDGET_FRACTION = 0.5
ACCURACY_TIE_POINTS = 0.1
MIB = 2**20


def fits(record: ModelRecord, capabilities: dict[str, Any]) -> str:
    """Why `record` does not fit this device, or "" when it does."""
    metrics = record.metrics
    if metrics.excluded:
        return f"excluded: {metrics.excluded}"
    runtime = capabilities.get("runtime", "")
    if metrics.runtimes_ok is not None and runtime not in metrics.runtimes_ok:
        return f"not computed correctly by {runtime or 'an unknown runtime'}"
    # The memory the model needs beyond the runtime's own fixed cost (the same for every variant).
    needed = metrics.memory_on(runtime)
    available = int(capabilities.get("memory_available_bytes", 0))
    budget = available * MEMORY_BUDGET_FRACTION
    if needed and available and needed > budget:
        return f"needs {needed / MIB:.1f} MiB, over the device's {budget / MIB:.1f} MiB budget"
    latency_budget = float(capabilities.get("latency_budget_ms", 0) or 0)
    latency = metrics.latency_on(runtime)
    if latency_budget and latency > latency_budget:
        return f"takes {latency:.3f} ms on {runtime}, over the device's {latency_budget} ms budget"
    return ""


def _loss(record: ModelRecord) -> float:
    """Accuracy points lost against the float model (or the relative error without labels)."""
    return record.metrics.points_lost


def _wire(record: ModelRecord) -> int:
    return record.metrics.wire_bytes


def choose(
    variants: list[ModelRecord], capabilities: dict[str, Any], bad_targets: list[str], pinned: str = ""
) -> tuple[ModelRecord | None, str]:
    """The variant this device should run (or None), and a sentence saying why."""
    refused = {v.variant: fits(v, capabilities) for v in variants}
    for v in variants:
        if v.target_path in bad_targets:
            refused[v.variant] = "this device refused it before"
    if pinned:
        refused = {
            name: why or ("" if name == pinned else "not the pinned variant") for name, why in refused.items()
        }
    candidates = [v for v in variants if not refused[v.variant]]
    if not candidates:
        reasons = "; ".join(f"{name}: {why}" for name, why in refused.items() if why)
        return None, f"no variant fits ({reasons})"
    best = min(_loss(v) for v in candidates)
    close = [v for v in candidates if _loss(v) - best <= ACCURACY_TIE_POINTS]
    chosen = min(close, key=lambda v: (_wire(v), v.target_path))
    loss = _loss(chosen)
    if abs(loss) < 0.005:
        accuracy = "as accurate as float32"
    else:
        accuracy = f"{abs(loss):.2f} points {'below' if loss > 0 else 'above'} float32"
    why = (
        "pinned by the deployment"
        if pinned
        else (f"the most accurate that fits ({accuracy}), then the smallest transfer ({_wire(chosen)} bytes)")
    )
    skipped = [
        f"{name} ({reason})"
        for name, reason in refused.items()
        if reason and not reason.startswith("not the pinned")
    ]
    if skipped:
        why += "; not: " + ", ".join(skipped)
    return chosen, why


def choose_target(
    variants: list[ModelRecord], capabilities: dict[str, Any], bad_targets: list[str], pinned: str = ""
) -> str:
    """The target path this device should run, or "" when no variant fits."""
    chosen, _ = choose(variants, capabilities, bad_targets, pinned)
    return chosen.target_path if chosen else ""
