"""Imports every command module so each registers itself on the app."""

from edgecpm.cli import chat_command, demo_command, devices_command, engine_command, export_command, inspect_command, profile_command, run_command, serve_command  # noqa: F401
