"""The example's live table and the standalone server's admin page, driven in a real browser.

Debian's headless Chromium through ``chromium-driver`` and Selenium (never a downloaded browser or
driver), against real servers: ``python examples/app.py`` and ``tornado-rt serve --dev`` as
subprocesses. Waits are explicit conditions (``WebDriverWait``), never sleeps.

Screenshots for the README: ``SCREENSHOTS=docs/img python -m pytest tests/test_browser.py``
writes ``live-table.png`` (two users side by side) and ``admin.png``.
"""
import base64
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from websockets.sync.client import connect as ws_connect

from standalone import ServeProcess, clean_env, make_token
from tools import need

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "app.py"
SECRET = "browser-test-secret-long-enough-for-hs256"
WAIT = 15  # seconds any one condition may take
SHOTS = os.environ.get("SCREENSHOTS")


# --- the browser ------------------------------------------------------------------------------------

@pytest.fixture
def browsers():
    """A factory of fresh headless Chromium sessions (each its own profile: its own session
    storage, so two sessions can be two users); all are quit at the end."""
    chromium = need("chromium", "chromium")
    driver_path = need("chromedriver", "chromium-driver")
    made = []

    def make(width=1100, height=640):
        profile = tempfile.mkdtemp(prefix="tornado-rt-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-extensions",
                    "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        made.append((driver, profile))
        # The page's own size, exactly (the window size includes the headless window's frame).
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return driver

    yield make
    for driver, profile in made:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, message):
    return WebDriverWait(driver, WAIT, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message)


def text(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def state(driver):
    return driver.find_element(By.ID, "state").get_attribute("data-state")


def row_names(driver):
    return driver.execute_script("return [...document.querySelectorAll('#rows tbody td.name')].map(td => td.textContent)")


def viewers(driver):
    return sorted(driver.execute_script(
        "return [...document.querySelectorAll('#viewers li[data-user]')].map(li => li.dataset.user)"))


def png_size(shot):
    """(width, height) of a base64 PNG, from its IHDR chunk."""
    head = base64.b64decode(shot[:44])
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def side_by_side(browsers, shots, path, gap=12):
    """Compose PNG screenshots side by side in the browser itself (no image library) and save."""
    sizes = [png_size(s) for s in shots]
    width = sum(w for w, _ in sizes) + gap * (len(shots) - 1)
    height = max(h for _, h in sizes)
    driver = browsers(width, height)
    images = "".join(f'<img src="data:image/png;base64,{s}">' for s in shots)
    driver.get("about:blank")
    driver.execute_script(
        "document.body.style.cssText = arguments[0]; document.body.innerHTML = arguments[1];",
        f"margin:0;background:#cfd4dd;display:flex;gap:{gap}px;align-items:flex-start", images)
    wait(driver, lambda d: d.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth)"),
         "the screenshots did not load")
    save(driver, path)


def save(driver, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


# --- the example app as a subprocess -------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Example:
    """``python examples/app.py`` on a fixed port (so a restart comes back at the same address)."""

    ADDRESS = re.compile(r"^example app: (http://\S+)")

    def __init__(self, data_dir):
        self.data_dir = str(data_dir)
        self.port = free_port()
        self.proc = None
        self.url = None

    def start(self):
        env = clean_env(EXAMPLE_PORT=str(self.port), EXAMPLE_JWT_SECRET=SECRET, EXAMPLE_DATA_DIR=self.data_dir)
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        lines = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                lines.append(line)
                match = self.ADDRESS.match(line)
                if match:
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        assert found.wait(30) and self.url, "the example printed no address:\n" + "".join(lines)
        assert self.url == f"http://127.0.0.1:{self.port}/"

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def example(tmp_path):
    app = Example(tmp_path)
    app.start()
    yield app
    app.stop()


def sign_in(driver, url, name):
    driver.get(url)
    field = wait(driver, lambda d: d.find_element(By.ID, "name"), "no sign-in form")
    wait(driver, lambda d: field.is_displayed(), "sign-in form hidden")
    field.send_keys(name)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    wait(driver, lambda d: state(d) == "connected", f"{name} never connected")
    wait(driver, lambda d: text(d, "#me") == name, "not signed in")
    driver.execute_script("window.notReloaded = true")


def assert_no_overflow(driver):
    width, inner = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"the page is {width} px wide in a {inner} px window"


def add_row(driver, name, notes=""):
    driver.find_element(By.ID, "add-name").send_keys(name)
    if notes:
        driver.find_element(By.ID, "add-notes").send_keys(notes)
    driver.find_element(By.CSS_SELECTOR, "#add button[type=submit]").click()


def row(driver, name):
    for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr"):
        if tr.find_elements(By.CSS_SELECTOR, "td.name") and tr.find_element(By.CSS_SELECTOR, "td.name").text == name:
            return tr
    raise AssertionError(f"no row {name!r}")


def click_in_row(driver, name, css):
    """Click ``css`` in the row named ``name``. The table is redrawn when a live change arrives,
    which can replace the row between finding it and clicking it: the lookup and the click are
    retried together while the element went stale (never when the row or the button is missing)."""
    def attempt(d):
        row(d, name).find_element(By.CSS_SELECTOR, css).click()
        return True
    wait(driver, attempt, f"could not click {css} in row {name!r}")


def row_cell(driver, name, css):
    """The text of ``css`` in the row named ``name``, read again if the row was redrawn meanwhile."""
    return wait(driver, lambda d: (row(d, name).find_element(By.CSS_SELECTOR, css).text,), f"no {css} in {name!r}")[0]


# --- the tests ------------------------------------------------------------------------------------------

def test_two_users_see_each_others_changes_live(example, browsers):
    alice, bob = browsers(960, 430), browsers(960, 430)
    sign_in(alice, example.url, "alice")
    sign_in(bob, example.url, "bob")
    for driver in (alice, bob):
        wait(driver, lambda d: viewers(d) == ["alice", "bob"], "the viewer list does not show both users")

    # Added by alice: it appears in bob's table without a reload; alice drew it from the REST
    # answer and was not sent her own change (her activity shows it once, as hers).
    add_row(alice, "Write the release notes", "for 0.2")
    wait(bob, lambda d: "Write the release notes" in row_names(d), "bob never saw alice's new row")
    assert row_names(alice) == ["Write the release notes"]
    add_row(bob, "Fix the flaky test")
    wait(alice, lambda d: "Fix the flaky test" in row_names(d), "alice never saw bob's new row")

    # Edited by bob: alice sees the new values, and who changed it.
    click_in_row(bob, "Write the release notes", "button.edit")
    name = wait(bob, lambda d: d.find_element(By.CSS_SELECTOR, "#rows input.edit-name"), "no editor")
    name.clear()
    name.send_keys("Write the release notes (draft)")
    bob.find_element(By.CSS_SELECTOR, "#rows select").send_keys("doing")
    bob.find_element(By.CSS_SELECTOR, "#rows button.save").click()
    wait(alice, lambda d: "Write the release notes (draft)" in row_names(d), "alice never saw bob's edit")
    assert row_cell(alice, "Write the release notes (draft)", "td.by") == "bob"
    assert row_cell(alice, "Write the release notes (draft)", ".pill") == "doing"

    for driver in (alice, bob):
        assert_no_overflow(driver)
    if SHOTS:
        shots = [d.get_screenshot_as_base64() for d in (alice, bob)]
        side_by_side(browsers, shots, Path(SHOTS) / "live-table.png")

    # Deleted by alice: gone from bob's table.
    click_in_row(alice, "Fix the flaky test", "button.del")
    wait(bob, lambda d: row_names(d) == ["Write the release notes (draft)"], "bob still shows the deleted row")
    wait(alice, lambda d: row_names(d) == ["Write the release notes (draft)"], "alice still shows her deleted row")

    # Every change arrived live, and exactly once on the sender's side: "you added" once in alice's
    # activity and never "alice added" (what an echo of her own change would have logged).
    mine = [li.text for li in alice.find_elements(By.CSS_SELECTOR, "#activity li")]
    assert mine.count("you added “Write the release notes”") == 1
    assert not any(line.startswith("alice ") for line in mine), mine
    for driver in (alice, bob):
        assert driver.execute_script("return window.notReloaded === true"), "the page was reloaded"

    # Bob signs out: alice's viewer list shrinks.
    bob.find_element(By.ID, "sign-out").click()
    wait(alice, lambda d: viewers(d) == ["alice"], "bob is still listed after leaving")


def rows_fetches(driver):
    """How many requests the page made to the table's rows (GET and POST alike: Resource Timing
    records no method), from the browser's own record."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => new URL(e.name).pathname === '/api/tables/1/rows' && e.initiatorType === 'fetch').length")


def test_reconnects_and_refetches_after_the_server_drops(example, browsers):
    """A restart loses the process's history (a new epoch): the resubscription with ``since``
    gets ``recovered: false`` and the page falls back to refetching the rows."""
    page = browsers(420, 800)  # a phone-sized window
    sign_in(page, example.url, "carol")
    add_row(page, "Before the drop", "with notes long enough to need the whole width of a small screen")
    wait(page, lambda d: row_names(d) == ["Before the drop"], "row not added")
    assert_no_overflow(page)
    fetched = rows_fetches(page)

    example.stop()  # the server goes away: every socket is dropped
    wait(page, lambda d: state(d) == "reconnecting", "the page does not show that it is reconnecting")
    # A change the page cannot hear about: made while it is disconnected.
    with sqlite3.connect(os.path.join(example.data_dir, "example.sqlite3")) as db:
        db.execute("INSERT INTO rows (table_id, name, updated_by) VALUES (1, 'Added while you were away', 'dave')")
    example.start()
    wait(page, lambda d: state(d) == "connected", "the page never reconnected")
    wait(page, lambda d: row_names(d) == ["Before the drop", "Added while you were away"],
         "the page did not refetch after reconnecting")
    assert rows_fetches(page) == fetched + 1  # the fallback refetch
    wait(page, lambda d: viewers(d) == ["carol"], "the page did not subscribe again")
    assert page.execute_script("return window.notReloaded === true"), "the page was reloaded"

    # Subscribed again: live changes flow once more.
    other = browsers()
    sign_in(other, example.url, "dave")
    add_row(other, "After the drop")
    wait(page, lambda d: "After the drop" in row_names(d), "no live change after the reconnect")


# Makes the page's sockets droppable from the test, as a network drop would: ``__dropSockets()``
# closes every open one and, while ``__offline`` is true, new ones go to a closed port (refused).
DROPPABLE_SOCKETS = """
(() => {
  const Real = window.WebSocket, open = [];
  window.__offline = false;
  window.__dropSockets = () => { window.__offline = true; for (const s of open.splice(0)) s.close(); };
  window.WebSocket = class extends Real {
    constructor(url, ...rest) {
      super(window.__offline ? "ws://127.0.0.1:9/" : url, ...rest);
      open.push(this);
    }
  };
})();
"""


def test_recovers_the_changes_missed_while_the_socket_was_down(example, browsers):
    """Only the socket drops (the server keeps running): the page resubscribes with ``since`` and
    the row added meanwhile arrives as a replayed ``rows_created`` (logged as bob's, like a live
    change), without refetching the rows."""
    page = browsers(700, 500)
    page.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DROPPABLE_SOCKETS})
    sign_in(page, example.url, "erin")
    bob = browsers()
    sign_in(bob, example.url, "bob")
    add_row(bob, "Seen live")
    wait(page, lambda d: row_names(d) == ["Seen live"], "erin never saw bob's row")

    fetched = rows_fetches(page)
    page.execute_script("window.__dropSockets()")
    wait(page, lambda d: state(d) == "reconnecting", "the page does not show that it is reconnecting")
    add_row(bob, "Added while erin was away")  # through the running example's REST API
    wait(bob, lambda d: row_names(d) == ["Seen live", "Added while erin was away"], "bob's row not added")
    page.execute_script("window.__offline = false")  # the network is back
    wait(page, lambda d: state(d) == "connected", "the page never reconnected")
    wait(page, lambda d: row_names(d) == ["Seen live", "Added while erin was away"],
         "the page did not recover the missed row")
    assert rows_fetches(page) == fetched  # recovered, not refetched
    activity = [li.text for li in page.find_elements(By.CSS_SELECTOR, "#activity li")]
    assert "bob added “Added while erin was away”" in activity, activity
    wait(page, lambda d: viewers(d) == ["bob", "erin"], "the viewer list is wrong after the reconnect")
    assert page.execute_script("return window.notReloaded === true"), "the page was reloaded"


def publish(base, key, message):
    request = urllib.request.Request(base + "api/publish", data=json.dumps({"message": message}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_admin_page_shows_connections_and_the_rate_chart(browsers):
    proc = ServeProcess(["serve", "--dev", "--port", "0", "--jwt-secret", SECRET])
    try:
        out = proc.stdout()
        admin = re.search(r"Admin page.*: (http://\S+/admin)$", out, re.M)
        assert admin, out  # --dev prints where to look
        key = re.search(r"API key \(generated\): +(\S+)", out).group(1)
        assert admin.group(1) == proc.base + "admin"

        page = browsers(1200, 780)
        page.get(admin.group(1))
        field = wait(page, lambda d: d.find_element(By.ID, "key"), "no key form")
        field.send_keys("not-the-key")
        page.find_element(By.CSS_SELECTOR, "#login button").click()
        wait(page, lambda d: "refused" in text(d, "#login-error"), "a wrong key is not reported")

        page.find_element(By.ID, "key").send_keys(key)
        page.find_element(By.CSS_SELECTOR, "#login button").click()
        wait(page, lambda d: d.find_element(By.ID, "dash").is_displayed(), "the dashboard did not open")
        assert_no_overflow(page)
        assert page.execute_script("return localStorage.length") == 0
        assert page.execute_script("return sessionStorage.getItem('tornado-rt-admin-key')") == key
        assert text(page, "#connections") == "0"

        # Traffic: one subscriber of table 1, messages published to it until the chart shows them.
        with ws_connect(f"{proc.ws_url}?jwt_token={make_token(1, secret=SECRET)}") as ws:
            assert json.loads(ws.recv(timeout=10))["success"] is True
            ws.send(json.dumps({"page": "table", "table_id": 1}))
            assert json.loads(ws.recv(timeout=10))["type"] == "page_add"
            wait(page, lambda d: text(d, "#connections") == "1", "the connection count never showed 1")
            wait(page, lambda d: text(d, "#authenticated_users") == "1", "no authenticated user shown")
            assert "table" in text(page, "#types") and "table_id=1" in text(page, "#busiest")
            sent = 0

            def chart_shows_traffic(d):
                nonlocal sent
                publish(proc.base, key, {"type": "rows_created", "table_id": 1, "rows": [{"id": sent}],
                                         "metadata": {}, "before_row_id": None})
                sent += 1
                peak = d.find_element(By.ID, "chart").get_attribute("data-peak")
                return int(peak or 0) > 0 and d.find_elements(By.CSS_SELECTOR, "#chart #delivered-line")

            wait(page, chart_shows_traffic, "the chart never showed the traffic")
            for _ in range(sent):
                assert json.loads(ws.recv(timeout=10))["type"] == "rows_created"
            assert "connected" in text(page, "#broker")
            if SHOTS:
                save(page, Path(SHOTS) / "admin.png")
        wait(page, lambda d: text(d, "#connections") == "0", "the closed connection is still counted")
        wait(page, lambda d: re.search(r"^client 1$", text(d, "#closed"), re.M), "the close is not listed by reason")
    finally:
        proc.stop()
