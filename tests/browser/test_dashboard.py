"""The dashboard in a real Chromium against a live worker: what it shows,
and Run now / Pause / Resume / Cancel with a token, seen arriving live
(no reload). Screenshots go to the test's tmp dir; with
SYNCWORKER_UPDATE_SCREENSHOT=1 the last one also becomes docs/dashboard.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from syncworker.embedded import free_port
from tests.harness import REPO, query, release, wait_until, write_config
from tests.webclient import call

TOKEN = "dashboard-token-0123456789"
JOBS = """
[jobs.orders]
schedule = "*/15 * * * *"
timezone = "America/Chicago"
scopes = ["EU", "US", "BAD"]
steps = ["sw_testjobs:progress"]

[jobs.invoices]
schedule = "30 2 * * *"
timezone = "Europe/Paris"
scopes = ["EU", "BAD"]
steps = ["sw_testjobs:record", "sw_testjobs:second"]

[jobs.export]
steps = ["sw_testjobs:wait_release"]

[jobs.weekly_report]
schedule = "0 9 * * 1-5"
steps = ["sw_testjobs:record"]
"""


def wait(driver: Any, check: Any, what: str, timeout: float = 15.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: check(d), message=f"the page never showed {what}"
    )


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver: Any, selector: str) -> Any:
    found = css(driver, selector)
    return found[0] if found else None


def text_of(driver: Any, selector: str) -> str:
    """What a user reads there, read in one go: the page redraws rows as
    events arrive, and an element held across two calls may be gone."""
    return str(
        driver.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.innerText : '';",
            selector,
        )
    )


def click(driver: Any, selector: str) -> None:
    """Press a button as a user would, again if a redraw replaced it first."""
    from selenium.common.exceptions import StaleElementReferenceException

    def press(d: Any) -> bool:
        node = one(d, selector)
        if node is None:
            return False
        try:
            node.click()
        except StaleElementReferenceException:
            return False
        return True

    wait(driver, press, f"a button at {selector}")


def choose(driver: Any, selector: str, value: str) -> None:
    """Pick an option as a user would, again if a redraw replaced the
    select first (the job rows are redrawn as events arrive)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import Select

    def pick(d: Any) -> bool:
        node = one(d, selector)
        if node is None:
            return False
        try:
            Select(node).select_by_value(value)
        except StaleElementReferenceException:
            return False
        return True

    wait(driver, pick, f"an option {value!r} at {selector}")


def share(driver: Any) -> int | None:
    """The first progress bar's percentage, read in one go (the cards are
    redrawn at each progress event, so a held element goes stale)."""
    value = driver.execute_script(
        "const b = document.querySelector('.progress-card .bar');"
        " return b ? b.getAttribute('aria-valuenow') : null;"
    )
    return int(value) if value is not None else None


def run_status(driver: Any, run_id: int) -> str:
    return text_of(driver, f'#runs tr[data-run="{run_id}"] .pill').strip()


def severe_console_lines(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def worker(database_url, tmp_path, start):  # type: ignore[no-untyped-def]
    port = free_port()
    config = write_config(
        tmp_path / "c.toml",
        database_url,
        JOBS,
        http=f"127.0.0.1:{port}",
        http_token=TOKEN,
        concurrency=3,  # a blocked export must not hold up the others
    )
    daemon = start(config)
    daemon.port = port
    return daemon


def test_the_dashboard_shows_the_worker_and_acts_live(
    worker, database_url, browser, tmp_path: Path
) -> None:
    port = worker.port
    # Some history first: a success, a failure.
    call(port, "POST", "/api/jobs/invoices/trigger", {}, token=TOKEN)
    wait_until(
        lambda: (
            query(
                database_url, "SELECT count(*) FROM syncworker.runs WHERE finished_at IS NOT NULL"
            )
            == [(2,)]
        ),
        what="two finished runs",
    )
    browser.get(f"http://127.0.0.1:{port}/")
    wait(browser, lambda d: text_of(d, "#live") == "live", "the live stream connected")
    wait(browser, lambda d: len(css(d, "#jobs tbody tr[data-job]")) == 4, "four jobs")
    browser.execute_script("window.__notReloaded = true")

    # What it shows: jobs with schedules in words and their zones, workers, runs.
    orders = text_of(browser, '#jobs tr[data-job="orders"]')
    assert "every 15 minutes" in orders and "America/Chicago" in orders
    assert "daily at 02:30" in text_of(browser, '#jobs tr[data-job="invoices"]')
    assert "Mon-Fri at 09:00" in text_of(browser, '#jobs tr[data-job="weekly_report"]')
    assert "on trigger only" in text_of(browser, '#jobs tr[data-job="export"]')
    (worker_id,) = query(database_url, "SELECT id FROM syncworker.workers")[0]
    assert "idle" in text_of(browser, f'#workers tr[data-worker="{worker_id}"]')
    (failed_id,) = query(database_url, "SELECT id FROM syncworker.runs WHERE status = 'failed'")[0]
    wait(browser, lambda d: run_status(d, failed_id) == "failed", "the failed run")
    failed_row = text_of(browser, f'#runs tr[data-run="{failed_id}"]')
    assert "scope BAD is broken" in failed_row and "BAD" in failed_row
    assert "Nothing running" in text_of(browser, "#running")
    browser.save_screenshot(str(tmp_path / "1-loaded.png"))

    # Without a token, a button says what to do and writes nothing.
    click(browser, '#jobs tr[data-job="export"] button[data-action="run"]')
    wait(browser, lambda d: "Enter the API token" in text_of(d, "#toasts"), "the token hint")
    assert query(database_url, "SELECT count(*) FROM syncworker.runs WHERE job = 'export'") == [
        (0,)
    ]

    # The token, typed once.
    one(browser, "#token").send_keys(TOKEN)
    click(browser, "#token-save")
    assert "token set" in text_of(browser, "#token-state")
    assert browser.execute_script("return sessionStorage.getItem('syncworker.token')") == TOKEN

    # Run now (one scope) with live progress.
    choose(browser, 'select[data-scope-for="orders"]', "US")
    click(browser, '#jobs tr[data-job="orders"] button[data-action="run"]')
    wait(browser, lambda d: "orders / US" in text_of(d, ".progress-card"), "a progress card")
    shares = set()
    wait(
        browser,
        lambda d: shares.add(share(d)) or len(shares - {None}) >= 2,
        "the bar moving",
    )
    (us_run,) = query(database_url, "SELECT id FROM syncworker.runs WHERE scope = 'US'")[0]
    assert run_status(browser, us_run) == "running"
    browser.save_screenshot(str(tmp_path / "2-progress.png"))
    wait(browser, lambda d: run_status(d, us_run) == "succeeded", "the run succeeded", 30)

    # Pause a scope, with a reason written as markup: shown as text.
    click(browser, '#jobs tr[data-job="orders"] button[data-action="pause"]')
    choose(browser, "#pause-scope", "EU")
    one(browser, "#pause-reason").send_keys("vendor <img src=x onerror=alert(1)> upgrade")
    click(browser, "#pause-ok")
    wait(
        browser,
        lambda d: "EU paused" in text_of(d, '#jobs tr[data-job="orders"]'),
        "the scope paused",
    )
    row = text_of(browser, '#jobs tr[data-job="orders"]')
    assert "vendor <img src=x onerror=alert(1)> upgrade" in row and "by http" in row
    assert not css(browser, "#jobs img")
    (paused,) = query(database_url, "SELECT reason FROM syncworker.pauses WHERE scope = 'EU'")[0]
    assert paused.startswith("vendor <img")

    # Resume it.
    click(browser, '#jobs tr[data-job="orders"] button[data-action="resume"]')
    wait(
        browser,
        lambda d: "EU paused" not in text_of(d, '#jobs tr[data-job="orders"]'),
        "the scope resumed",
    )
    assert query(database_url, "SELECT count(*) FROM syncworker.pauses WHERE scope = 'EU'") == [
        (0,)
    ]

    # Cancel a running run.
    click(browser, '#jobs tr[data-job="export"] button[data-action="run"]')
    (export_run,) = wait_until(
        lambda: query(
            database_url,
            "SELECT id FROM syncworker.runs WHERE job = 'export' AND status = 'running'",
        ),
        what="export running",
    )[0]
    wait(browser, lambda d: run_status(d, export_run) == "running", "the export running")
    click(browser, f'#runs tr[data-run="{export_run}"] button[data-action="cancel"]')
    wait(browser, lambda d: run_status(d, export_run) == "cancelled", "the run cancelled", 20)
    (error,) = query(database_url, f"SELECT error FROM syncworker.runs WHERE id = {export_run}")[0]
    assert "http" in error
    release(database_url)

    # A run's detail with its steps.
    (inv_run,) = query(
        database_url, "SELECT id FROM syncworker.runs WHERE job = 'invoices' AND scope = 'EU'"
    )[0]
    click(browser, f'#runs tr[data-run="{inv_run}"]')
    wait(browser, lambda d: "sw_testjobs:second" in text_of(d, "#detail"), "the run's steps")
    assert f"Run #{inv_run}" in text_of(browser, "#detail-title")
    detail = text_of(browser, "#detail-body")
    assert "triggered by\nhttp" in detail and "attempt\n1 of 1" in detail, detail
    # Nothing anywhere drawn as an object instead of its text.
    assert "[object" not in text_of(browser, "body")
    browser.save_screenshot(str(tmp_path / "3-detail.png"))

    # Everything above arrived without a reload, and nothing broke the CSP.
    assert browser.execute_script("return window.__notReloaded") is True
    assert severe_console_lines(browser) == []


def test_the_screenshot(worker, database_url, browser, tmp_path: Path) -> None:
    """A busy moment for the README: runs of every kind, one in progress, a
    paused scope. Written to docs/dashboard.png when asked."""
    port = worker.port
    call(port, "POST", "/api/jobs/invoices/trigger", {}, token=TOKEN)
    call(port, "POST", "/api/jobs/weekly_report/trigger", {}, token=TOKEN)
    call(
        port,
        "POST",
        "/api/jobs/orders/trigger",
        {"scope": "BAD", "payload": {"chunks": 1, "pause": 0}},
        token=TOKEN,
    )
    wait_until(
        lambda: (
            query(
                database_url, "SELECT count(*) FROM syncworker.runs WHERE finished_at IS NOT NULL"
            )
            == [(4,)]
        ),
        what="the first runs",
    )
    call(port, "POST", "/api/jobs/export/trigger", {}, token=TOKEN)
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM syncworker.runs WHERE job = 'export' AND status = 'running'",
        ),
        what="export running",
    )
    call(
        port,
        "POST",
        "/api/jobs/orders/trigger",
        {"scope": "EU", "payload": {"chunks": 40, "size": 2500, "pause": 0.5}},
        token=TOKEN,
    )
    call(
        port,
        "POST",
        "/api/jobs/invoices/pause",
        {"scope": "BAD", "reason": "vendor API down", "until": "2099-01-01T00:00:00Z"},
        token=TOKEN,
    )
    browser.set_window_size(1440, 1180)
    browser.get(f"http://127.0.0.1:{port}/")
    wait(browser, lambda d: text_of(d, "#live") == "live", "the live stream")
    wait(browser, lambda d: len(css(d, ".progress-card")) >= 1, "a progress card", 20)
    wait(
        browser,
        lambda d: (share(d) or 0) >= 20,
        "some progress",
        40,
    )
    path = tmp_path / "dashboard.png"
    browser.save_screenshot(str(path))
    assert severe_console_lines(browser) == []
    if os.environ.get("SYNCWORKER_UPDATE_SCREENSHOT"):
        shutil.copy(path, REPO / "docs" / "dashboard.png")
    release(database_url)
