"""Profiling reports (`edgecpm profile`): speed, memory, energy, phases and the roofline of bundles on this machine.

    report = profile_bundles(["bundles/a", "bundles/b"], ProfileSettings(prompt_lengths=(128, 1024)))
    summarize(report)                     # medians, percentiles, roofline, comparison (in place)
    write_report(report, "out/")          # report.json (+ its schema), report.md, report.html

Measurements run in child processes (edgecpm.report.worker); this package imports nothing heavy at import time.
"""

from edgecpm.report.runner import ProfileError, ProfileSettings, parse_lengths, profile_bundles
from edgecpm.report.schema import SCHEMA, SCHEMA_VERSION, validate
from edgecpm.report.summary import summarize


def write_report(report, directory):
    from edgecpm.report.render import write_report as write

    return write(report, directory)


__all__ = ["SCHEMA", "SCHEMA_VERSION", "ProfileError", "ProfileSettings", "parse_lengths", "profile_bundles", "summarize",
           "validate", "write_report"]
