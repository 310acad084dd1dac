"""Finds the ComfyUI host for tests/host; says loudly when there is none.

A host is ``$COMFYUI_PATH`` (default ``~/ComfyUI``) holding ``comfy/samplers.py``, in an interpreter where
``import torch`` works. Without one, tests/host is not collected (its modules import comfy) and the run
ends with one SKIPPED line, so a green run without a host can never be mistaken for tested nodes.
tests/core runs either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HOST_TESTS_DIR = Path(__file__).parent / "host"


def _host_missing_reason() -> str | None:
    host = Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser()
    if not (host / "comfy" / "samplers.py").is_file():
        return f"no ComfyUI found at {host} (set COMFYUI_PATH)"
    try:
        import torch  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return f"ComfyUI found at {host} but `import torch` fails in this interpreter ({error})"
    return None


HOST_MISSING_REASON = _host_missing_reason()
_skipped_host_paths: list[Path] = []


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if HOST_MISSING_REASON is None:
        return None
    if collection_path == HOST_TESTS_DIR or HOST_TESTS_DIR in collection_path.parents:
        _skipped_host_paths.append(collection_path)
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test file named on the command line is collected even when ignore_collect said no.
    if HOST_MISSING_REASON is None:
        return
    for item in items:
        if HOST_TESTS_DIR in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=f"host tests: {HOST_MISSING_REASON}"))
            _skipped_host_paths.append(item.path)


# A test module whose whole purpose needs a tool that may be missing (tests/host/test_browser.py: Playwright
# and Chromium) skips itself with a reason starting with one of these; the run ends with that reason, loudly.
LOUD_SKIP_PREFIXES = ("browser tests:",)


def _loud_skip_reasons(terminalreporter) -> list[str]:
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(LOUD_SKIP_PREFIXES) and reason not in reasons:
            reasons.append(reason)
    return reasons


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _loud_lines(terminalreporter) -> list[str]:
    lines = []
    if _skipped_host_paths:
        lines.append(f"SKIPPED host tests: {HOST_MISSING_REASON} — nodes were NOT tested")
    return lines + [f"SKIPPED {reason}" for reason in _loud_skip_reasons(terminalreporter)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Under CI=true a skipped host or browser test fails the run: a green CI must mean the nodes were tested in
    # a real ComfyUI and a real browser. (The terminal reporter prints its summary after this hook.)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _in_ci() and reporter is not None and _loud_lines(reporter) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = _loud_lines(terminalreporter)
    for line in lines:
        terminalreporter.write_sep("!", line, yellow=True, bold=True)
    if lines and _in_ci():
        terminalreporter.write_sep("!", "CI=true: host or browser tests were skipped, so this run fails", red=True)
