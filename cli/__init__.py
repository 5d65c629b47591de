"""`edgefleet`: the operator's command line, a client of the server's operator service.

    main.py       the parser, every command's flags, exit codes
    client.py     the channel (mutual TLS or a demo's bearer token), `Operator`, gRPC errors explained
    publish.py    push a model, sign targets metadata, publish it, authorize rollbacks
    output.py     tables, JSON, the variants table
    commands/     one module per area: keys, server, tokens, models, deployments, devices

The CLI signs targets metadata itself with the operator's key, so the server never holds that key. It never
imports the server's internals: `edgefleet server` reaches the server through one lazy import of its entry
module (`edgefleet.server.main`).
"""
