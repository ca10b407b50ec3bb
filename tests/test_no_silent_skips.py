"""The suite's skip guard (tests/conftest.py): pytest runs on generated test files, with a copy of the conftest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def _pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pytest -q ARGS test_probe.py`` in a fresh folder that holds the suite's conftest.py and ``source``."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: heavy tests\n")
    (tmp_path / "test_probe.py").write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_probe.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_skipped_or_xfailed_test_fails_the_run_and_is_named(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "import pytest\n\n"
                          "def test_runs():\n    assert True\n\n"
                          "def test_needs_an_oracle():\n    pytest.skip('oracle not installed')\n\n"
                          "@pytest.mark.xfail(reason='known bug')\ndef test_known_bug():\n    assert False\n")
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, r.stdout + r.stderr
    assert "test_probe.py::test_needs_an_oracle: Skipped: oracle not installed" in r.stdout, r.stdout
    assert "test_probe.py::test_known_bug: xfailed: known bug" in r.stdout, r.stdout
    assert "2 test(s) or module(s) did not run" in r.stdout, r.stdout


def test_a_module_skipped_at_collection_fails_the_run(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "import pytest\n\nnot_there = pytest.importorskip('sumie_no_such_oracle')\n\n"
                          "def test_never_collected():\n    assert True\n")
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, r.stdout + r.stderr
    assert "SKIPPED test_probe.py: Skipped: could not import 'sumie_no_such_oracle'" in r.stdout, r.stdout


def test_deselection_is_not_a_skip(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "import pytest\n\n"
                          "def test_runs():\n    assert True\n\n"
                          "@pytest.mark.slow\ndef test_heavy():\n    assert True\n", "-m", "not slow")
    assert r.returncode == pytest.ExitCode.OK, r.stdout + r.stderr
    assert "1 passed, 1 deselected" in r.stdout and "did not run" not in r.stdout, r.stdout
