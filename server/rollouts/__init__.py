"""Staged rollouts: the engine (`engine`, a state machine over the database), operator actions (`actions`),
who steers a device (`claims`), the orders a rollout sends (`orders`, `send_back`), maintenance windows
(`windows`), and the gates: pure statistics and verdicts that decide whether a rollout wave may advance.

README: how a verdict is reached
--------------------------------
While a wave soaks, a matched control cohort of devices stays on the incumbent model over the same window.

1. **Aggregate.** Per-device telemetry over the window (`cohorts.DeviceWindow`: inference and error counts,
   the latency histogram over `LATENCY_BOUNDS_MS`, device-hours, crashes, worker restarts, top-class and
   top-score histograms, shadow agreement, the install outcome) is stacked into columns once
   (`FleetColumns.from_windows`) and summed per cohort (`aggregate`), vectorised with numpy.
2. **Evaluate.** Each gate (`gates`) compares the canary cohort with the control cohort and returns a
   `Verdict`: pass, fail or inconclusive, with `Evidence` (sample sizes and their unit on both sides, the
   statistic's name and value, the threshold, the p-value or confidence bound, and one line in words).
   Below a gate's sample floor, or without data, the verdict is inconclusive: a gate never passes by default.
   The statistics and their assumptions are in `statistics`' docstring; the gates and their defaults in
   `gates`' docstring.
3. **Judge.** `judge(gates, canary, control)` keeps every verdict. The wave fails if any gate fails; it is
   inconclusive (the wave waits for more data) if any gate is inconclusive and none fails, or if there are
   no gates; otherwise it passes.

The gates and statistics are pure: no I/O, no clock, no asyncio, no database. The rollout engine fetches
telemetry, calls `judge` and acts on (and records) the judgement.
"""
