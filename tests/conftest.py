"""Suite-wide settings: one torch thread count, and no silent skips.

Threads: the whole suite runs torch on ``TEST_THREADS`` intra-op threads, set once here (not per module) and passed
to the ``python -m sumie`` subprocesses some tests start (``OMP_NUM_THREADS``), so in-process and subprocess runs
use the same kernels. See ``TEST_THREADS`` for why 1.

Skips: every collected test must run. The test oracles (diffusers, transformers, k-diffusion, sd-mecha, PyYAML,
scipy, OpenCV, ...) are dev dependencies (``scripts/setup.sh --dev``) and are imported plainly, so a missing one is
an error, not a skip. As a second line, any skipped or xfailed test, and any module skipped at collection (e.g. a
``pytest.importorskip``), makes the run exit non-zero with a list of what did not run and why. Deselection
(``-m 'not slow'``, ``-k``) is not a skip and stays allowed.
"""

from __future__ import annotations

import os

import pytest
import torch

# 1, measured on the 2-core AVX2 AMD EPYC dev machine (shared with other jobs), wall seconds 1 vs 2 threads:
# test_engine 17.7 vs 16.0 (quiet) and 47 vs 141 (busy), test_unet 17.7 vs 191, test_vae 12.5 vs 27.6,
# test_pipeline_parity 18.5 vs 14.8. The tiny models gain little from a second thread, and when the cores are
# busy two threads wait on each other (up to 10x slower). 1 thread also gives one reduction order on any machine.
TEST_THREADS = 1


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(TEST_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)  # read by the `python -m sumie` subprocesses at start-up
    config.pluginmanager.register(NoSilentSkips(), "sumie-no-silent-skips")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The skip (or xfail) reason of a report, on one line."""
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return f"xfailed: {wasxfail}" if wasxfail else "xfailed"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr).strip().splitlines()[-1] if longrepr else "skipped"


class NoSilentSkips:
    """Records every skipped test or module; a run with any of them fails (exit status 1) and lists them."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.append((report.nodeid or str(report.fspath), _reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            self.skipped.append((report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skipped:
            return
        terminalreporter.section("skipped tests fail this suite (tests/conftest.py)", sep="!", red=True, bold=True)
        for nodeid, reason in self.skipped:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
        terminalreporter.line(f"{len(self.skipped)} test(s) or module(s) did not run; every test must run "
                              "(install the oracles with scripts/setup.sh --dev)", red=True)
