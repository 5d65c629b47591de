"""`edgefleet`: the operator's command line, a client of the server's operator service.

    main.py       the parser, every command's flags and examples; settings resolved after parsing
    exits.py      the exit codes (listed in --help) and the CliError kinds that carry them
    config.py     named contexts in $XDG_CONFIG_HOME/edgefleet/config.toml; flag > env > context > default
    client.py     the channel (mutual TLS or a demo's bearer token), `Operator`, gRPC errors explained
    publish.py    push a model, sign targets metadata, publish it, authorize rollbacks
    output.py     escaped tables, typed JSON and NDJSON, times, the variants table
    commands/     one module per area: keys, server, tokens, models, deployments, devices, config,
                  completion

Names are checked before any request with the server's own rules (`edgefleet.names`).

The CLI signs targets metadata itself with the operator's key, so the server never holds that key. It never
imports the server's internals: `edgefleet server` reaches the server through one lazy import of its entry
module (`edgefleet.server.main`).
"""
