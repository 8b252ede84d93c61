"""Allows `python -m mailbridge`."""

from mailbridge.cli import main

main()
