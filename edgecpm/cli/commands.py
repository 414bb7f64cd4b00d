"""Imports every command module so each registers itself on the app."""

from edgecpm.cli import demo_command, inspect_command  # noqa: F401
