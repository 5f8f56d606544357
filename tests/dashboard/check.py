#!/usr/bin/env python3
"""Loads the dashboard in a real browser (Debian's chromium, headless) and checks what it shows.

Run by the integration test `dashboard::dashboard_in_a_real_browser` (tests/it/dashboard.rs),
which starts the services, seeds known data and passes what the page must show:

    check.py --url http://127.0.0.1:PORT --command-url http://127.0.0.1:PORT \
             --expect expect.json --shots DIR [--problem LABEL | --empty]

It drives chromium over the DevTools protocol (a WebSocket; Python's standard library only)
and fails (exit 1, one line per problem) unless:
  * the page renders the expected rows, money and totals after its first refresh;
  * the hostile product name is text in the DOM: no <img> element, no dialog, no script error,
    no Content-Security-Policy violation in the console;
  * the page refreshes by itself (a new order placed through the API shows up);
  * it fits a 390x844 phone screen without horizontal scrolling;
  * with the API unreachable it says so, and recovers when the API is back.
Screenshots at 1280x800 and 390x844 go to DIR. With --problem LABEL it only checks that the
health card LABEL is red and that the status line says so. With --empty (before any event)
it only checks that the page is green with an empty chart whose order axis counts whole
orders (0 to 4), and that the page's icon loads.

Exit 2 when chromium is missing (.ci/run installs it: apt-get install -y chromium).
"""
import argparse
import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse

DEADLINE_S = 30
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*",
]


class Failed(Exception):
    pass


# ---- a minimal WebSocket client (RFC 6455): text frames, client-side masking ------------

class WebSocket:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=DEADLINE_S)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise Failed("DevTools closed the WebSocket handshake")
            head += chunk
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if b" 101 " not in head.split(b"\r\n")[0] or accept not in head:
            raise Failed(f"DevTools refused the WebSocket: {head!r}")

    def send(self, text):
        data = text.encode()
        header = bytes([0x81])
        n = len(data)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Failed("DevTools closed the WebSocket")
            buf += chunk
        return bytes(buf)

    def recv(self):
        message = bytearray()
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise Failed("DevTools closed the WebSocket")
            if opcode in (0x1, 0x0):
                message += payload
                if b0 & 0x80:
                    return message.decode()


# ---- the DevTools protocol ----------------------------------------------------------------

class Browser:
    def __init__(self):
        binary = shutil.which("chromium")
        if binary is None:
            print("chromium is not installed: `apt-get install -y chromium` (.ci/run installs it); "
                  "the dashboard test needs a real browser", file=sys.stderr)
            sys.exit(2)
        self.profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._devtools_port()
        targets = json.loads(http_get(f"http://127.0.0.1:{port}/json/list")[1])
        page = next(t for t in targets if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable")

    def _devtools_port(self):
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"chromium exited at start with status {self.proc.returncode}")
            try:
                with open(path) as f:
                    return int(f.readline())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        raise Failed("chromium did not open its DevTools port")

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise Failed(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.on_event(msg)

    def on_event(self, msg):
        method = msg.get("method")
        self.events.append(msg)
        if method == "Page.javascriptDialogOpening":
            self.ws.send(json.dumps({"id": 0, "method": "Page.handleJavaScriptDialog", "params": {"accept": False}}))
        elif method == "Fetch.requestPaused":
            # Only enabled to play "API unreachable": every /api/ request fails.
            params = {"requestId": msg["params"]["requestId"], "errorReason": "ConnectionRefused"}
            self.ws.send(json.dumps({"id": 0, "method": "Fetch.failRequest", "params": params}))

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise Failed(f"evaluating {expression[:60]!r}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait_for(self, what, expression):
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except Failed:
                value = None  # e.g. no document.body yet while the page loads
            if value:
                return value
            time.sleep(0.1)
        raise Failed(f"timed out after {DEADLINE_S} s waiting for {what}")

    def viewport(self, width, height, mobile):
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def http_get(url):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=DEADLINE_S)
    c.request("GET", u.path or "/")
    r = c.getresponse()
    return r.status, r.read().decode()


def http_post(base, path, body):
    u = urllib.parse.urlparse(base)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=DEADLINE_S)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode()
    if r.status != 201:
        raise Failed(f"POST {path} {body}: {r.status} {text}")
    return json.loads(text)


# ---- what the page shows ------------------------------------------------------------------

# Everything the checks read, as plain data: cell texts, card labels/values/states, counts.
SNAPSHOT_JS = """(() => {
  const rows = (id) => Array.from(document.querySelectorAll('#' + id + ' tbody tr'),
      (tr) => Array.from(tr.cells, (td) => td.textContent));
  return {
    state: document.body.dataset.state || null,
    refreshes: Number(document.body.dataset.refreshes || 0),
    status: document.getElementById('status').textContent,
    statusClass: document.getElementById('status').className,
    banner: document.getElementById('banner').hidden ? null : document.getElementById('banner').textContent,
    products: rows('products'), categories: rows('categories'), customers: rows('customers'),
    hourlyRows: rows('hourly-table').length,
    hourlyTotals: document.getElementById('hourly-totals').textContent,
    cards: Array.from(document.querySelectorAll('#health .card'), (c) => ({
      label: c.dataset.card, value: c.querySelector('.card-value').textContent,
      bad: c.classList.contains('card-bad')})),
    images: document.images.length,
    chartBars: document.querySelectorAll('#chart svg rect.bar').length,
    chartTitles: Array.from(document.querySelectorAll('#chart svg title'), (t) => t.textContent),
    orderTicks: Array.from(document.querySelectorAll('#chart svg text.tick-orders'), (t) => t.textContent),
    scrollWidth: document.documentElement.scrollWidth,
    width: window.innerWidth,
  };
})()"""


def expect_equal(problems, what, got, want):
    if got != want:
        problems.append(f"{what}: the page shows {got!r}, expected {want!r}")


def check_data(snap, expect, problems):
    expect_equal(problems, "state", snap["state"], "ok")
    for table in ("products", "categories", "customers"):
        expect_equal(problems, table, snap[table], expect[table])
    expect_equal(problems, "hourly totals", snap["hourlyTotals"], expect["hourlyTotals"])
    expect_equal(problems, "hourly table rows", snap["hourlyRows"], 48)
    expect_equal(problems, "chart bars", snap["chartBars"], 48)
    if expect["hourTitle"] not in snap["chartTitles"]:
        problems.append(f"no chart column titled {expect['hourTitle']!r}: {snap['chartTitles'][-3:]}")
    cards = {c["label"]: c for c in snap["cards"]}
    for label, value in expect["cards"].items():
        expect_equal(problems, f"health card {label!r}", cards.get(label, {}).get("value"), value)
    bad = [c["label"] for c in snap["cards"] if c["bad"]]
    expect_equal(problems, "red health cards", bad, [])
    if not snap["status"].startswith("Live") or "status-ok" not in snap["statusClass"]:
        problems.append(f"status line {snap['status']!r} ({snap['statusClass']}) is not green")


def check_hostile(expect, snap, problems):
    hostile = expect["hostile"]
    if not any(hostile in row for row in snap["products"]):
        problems.append(f"the hostile name {hostile!r} is not a product cell's text")
    expect_equal(problems, "<img> elements in the document", snap["images"], 0)


def check_console(browser, problems):
    dialogs = [e for e in browser.events if e.get("method") == "Page.javascriptDialogOpening"]
    expect_equal(problems, "dialogs opened", len(dialogs), 0)
    for e in browser.events:
        method = e.get("method")
        if method == "Runtime.exceptionThrown":
            problems.append(f"script error: {e['params']['exceptionDetails'].get('text')} "
                            f"{e['params']['exceptionDetails'].get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded":
            entry = e["params"]["entry"]
            text = entry.get("text", "")
            # Failed loads are "network" entries: the API's, failed on purpose, are not
            # problems; the icon's are. Anything else, such as a policy violation, is.
            if entry.get("level") != "error":
                continue
            if entry.get("source") != "network":
                problems.append(f"console {entry.get('source')}: {text}")
            elif "/api/" not in entry.get("url", ""):
                problems.append(f"failed load: {entry.get('url')}: {text}")


def check_empty(browser, problems):
    snap = browser.js(SNAPSHOT_JS)
    expect_equal(problems, "state", snap["state"], "ok")
    expect_equal(problems, "chart bars", snap["chartBars"], 48)
    expect_equal(problems, "order axis ticks", snap["orderTicks"], ["0", "1", "2", "3", "4"])
    if not snap["hourlyTotals"].startswith("0 orders"):
        problems.append(f"hourly totals of an empty read model: {snap['hourlyTotals']!r}")
    # The icon is asked for once the page has loaded; give it a moment to fail.
    time.sleep(0.5)
    check_console(browser, problems)


def check_refresh(browser, args, expect, problems):
    before = browser.js(SNAPSHOT_JS)["refreshes"]
    pid = http_post(args.command_url, "/api/products",
                    {"name": "Refresh Probe", "category": "Probe", "price": 99999.99, "stock": 5})["productId"]
    http_post(args.command_url, "/api/orders",
              {"customerId": 999999, "items": [{"productId": pid, "quantity": 1}]})
    browser.wait_for("the new order on the page (refresh every 2 s)",
                     "(() => { const c = document.querySelector('#products tbody tr td.name');"
                     " return c !== null && c.textContent === 'Refresh Probe'; })()")
    snap = browser.js(SNAPSHOT_JS)
    expect_equal(problems, "top product after the new order", snap["products"][0][1:], ["Refresh Probe", "Probe", "1", "1", "99,999.99"])
    expect_equal(problems, "top customer after the new order", snap["customers"][0][1:4], ["999999", "1", "99,999.99"])
    if snap["refreshes"] <= before:
        problems.append(f"refresh counter did not move: {before} -> {snap['refreshes']}")


def check_phone(browser, args, problems):
    browser.viewport(390, 844, True)
    count = browser.js(SNAPSHOT_JS)["refreshes"]
    browser.wait_for("a refresh at phone size", f"Number(document.body.dataset.refreshes) > {count}")
    snap = browser.js(SNAPSHOT_JS)
    if snap["scrollWidth"] > snap["width"]:
        problems.append(f"at 390x844 the page is {snap['scrollWidth']} px wide: it scrolls sideways")
    browser.js("window.scrollTo(0, 0)")
    browser.screenshot(os.path.join(args.shots, "dashboard-390x844.png"))


def check_unreachable(browser, args, problems):
    browser.call("Fetch.enable", patterns=[{"urlPattern": "*/api/*"}])
    browser.wait_for("the page to notice the API is unreachable",
                     "document.body.dataset.state === 'error'")
    snap = browser.js(SNAPSHOT_JS)
    if not snap["banner"] or "unreachable" not in snap["banner"]:
        problems.append(f"no clear message while the API is unreachable: banner {snap['banner']!r}")
    if "status-bad" not in snap["statusClass"]:
        problems.append(f"status line not red while the API is unreachable: {snap['status']!r}")
    if not snap["products"] or snap["products"][0][1] != "Refresh Probe":
        problems.append("the last figures disappeared while the API is unreachable")
    browser.screenshot(os.path.join(args.shots, "dashboard-unreachable-1280x800.png"))
    browser.call("Fetch.disable")
    browser.wait_for("the page to recover when the API is back", "document.body.dataset.state === 'ok'")


def check_problem(browser, label, problems):
    browser.wait_for(f"health card {label!r}",
                     f"document.querySelector('#health .card[data-card=\"{label}\"]') !== null")
    snap = browser.js(SNAPSHOT_JS)
    card = next(c for c in snap["cards"] if c["label"] == label)
    if not card["bad"]:
        problems.append(f"health card {label!r} ({card['value']}) is not red")
    if "status-bad" not in snap["statusClass"] or label not in snap["status"]:
        problems.append(f"status line does not name {label!r} in red: {snap['status']!r} ({snap['statusClass']})")


def run(args):
    expect = json.load(open(args.expect)) if args.expect else {}
    browser = Browser()
    problems = []
    try:
        browser.viewport(1280, 800, False)
        browser.call("Page.navigate", url=args.url + "/dashboard")
        browser.wait_for("the first refresh", "Number(document.body.dataset.refreshes) >= 1")
        if args.problem:
            check_problem(browser, args.problem, problems)
            return problems
        if args.empty:
            check_empty(browser, problems)
            return problems
        # Two refreshes: the numbers come from a refresh after the first, not only the first.
        browser.wait_for("the second refresh", "Number(document.body.dataset.refreshes) >= 2")
        snap = browser.js(SNAPSHOT_JS)
        check_data(snap, expect, problems)
        check_hostile(expect, snap, problems)
        browser.screenshot(os.path.join(args.shots, "dashboard-1280x800.png"))
        check_phone(browser, args, problems)
        browser.viewport(1280, 800, False)
        check_refresh(browser, args, expect, problems)
        check_unreachable(browser, args, problems)
        check_hostile(expect, browser.js(SNAPSHOT_JS), problems)
        check_console(browser, problems)
    finally:
        browser.close()
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the query service, e.g. http://127.0.0.1:8081")
    p.add_argument("--command-url", help="the command service (to place an order)")
    p.add_argument("--expect", help="JSON file: what the page must show")
    p.add_argument("--shots", default=".", help="directory for the screenshots")
    p.add_argument("--problem", help="only check that this health card is red")
    p.add_argument("--empty", action="store_true",
                   help="only check the page of an empty read model, and its icon")
    args = p.parse_args()
    try:
        problems = run(args)
    except Failed as e:
        problems = [str(e)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print("dashboard OK")


if __name__ == "__main__":
    main()
