"""The CLI's commands, one module per area; each `cmd_*` takes the parsed arguments and prints its result."""
