"""Support for the demo, the benchmarks and the tests, in one place they all import from.

    localfleet      a whole fleet on one machine: `edgefleet server` and `edgefleet-agent` processes
    inprocess       a real server started in this process on port 0 with fresh keys
    serverprocess   the server in a subprocess of its own, measured with psutil, restartable on its ports
    simdevices      simulated devices: really enrolled, mTLS channels, Connect streams with the agent's backoff
    fleetstats      figures of a simulated fleet: percentiles, bursts, restart figures, the loop's own stalls
    modelgen        the demo's digits model (trained here) and big untrained models for benchmarks
    hostile         models that hang, crash or exhaust the interpreter running them
    rolloutdemo     staged-rollout gate floors and camera-scene traffic for a three-device fleet (demo, tests)
    relay           between a plaintext server and real agents: sets rollout fields, or loses rollback orders

Nothing here ships to a device or runs in the server; it may import from every other edgefleet package,
and none of them imports it.
"""
