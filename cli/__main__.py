"""`python -m edgefleet.cli`: the same as the `edgefleet` command."""

from edgefleet.cli.main import main

main()
