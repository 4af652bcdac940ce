"""``python -m vlgate_cli``."""

from vlgate_cli.cli import main

main()
