"""Serving tests' shared hooks: a skipped browser test is reported loudly at the end of the run, never silently."""

BROWSER_SKIP_PREFIX = "browser test needs"
INSTALL_HINT = ("install the browser with `sudo bash .ci/install-browser` (Debian's chromium) and the driver with "
                "`pip install -e '.[dev]'` (playwright), or run `make test` as root")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Name every playground browser test that was skipped for a missing browser or driver, and how to fix it."""
    skipped = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if BROWSER_SKIP_PREFIX in reason:
            skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))
    if not skipped:
        return
    terminalreporter.write_sep("!", f"{len(skipped)} BROWSER TESTS WERE SKIPPED: the playground is untested",
                               red=True, bold=True)
    for nodeid, reason in skipped:
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}", red=True)
    terminalreporter.write_line(f"To run them: {INSTALL_HINT}.", red=True, bold=True)
