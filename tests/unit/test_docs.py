"""The README against the code: every log event the worker emits is in the
README's list under its level, and `make help` tells the same times as the
README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.harness import REPO

README = (REPO / "README.md").read_text()
LEVELS = ("debug", "info", "warning", "error", "exception", "critical")
# `log.info("event", ...)`, over line breaks too; events built at run time
# (f"run_{status}") are listed by hand in the README and not checked here.
CALL = re.compile(r"\.(" + "|".join(LEVELS) + r')\(\s*"([a-z][a-z0-9_]+)"')


def code_events() -> dict[str, set[str]]:
    events: dict[str, set[str]] = {}
    for path in sorted(Path(REPO / "syncworker").rglob("*.py")):
        for level, event in CALL.findall(path.read_text()):
            events.setdefault(event, set()).add("error" if level == "exception" else level)
    return events


def readme_events() -> dict[str, set[str]]:
    start = README.index("Events by level:")
    section = README[start : README.index("Your steps add their own events", start)]
    events: dict[str, set[str]] = {}
    for item in re.split(r"\n- ", section)[1:]:
        head, _, body = item.partition(":")
        level = head.strip("* ")
        for event in re.findall(r"`([a-z][a-z0-9_]+)`", body):
            events.setdefault(event, set()).add(level)
    return events


def test_every_log_event_in_the_code_is_in_the_readme_under_its_level() -> None:
    documented = readme_events()
    found = code_events()
    assert len(found) > 30, found  # the scan itself works
    missing = sorted(event for event in found if event not in documented)
    assert not missing, f"log events missing from the README's list: {missing}"
    wrong = {
        e: (sorted(lv), sorted(documented[e])) for e, lv in found.items() if not lv & documented[e]
    }
    assert not wrong, f"log events listed under another level (code, README): {wrong}"


def test_make_help_and_the_readme_tell_the_same_bench_time() -> None:
    shown = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [bench] = [line for line in shown.splitlines() if line.startswith("make bench ")]
    full, quick = re.findall(r"~\s*(\d+)\s*min", bench)
    text = " ".join(README.split())  # wherever the README wraps its lines
    assert f"`make bench` (about {full} minutes" in text, bench
    assert quick == "1" and "`make bench QUICK=1` is a one-minute" in text, bench
