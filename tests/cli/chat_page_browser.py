#!/usr/bin/env python3
"""Drives the chat page of `kestrel serve` in headless Chromium over the DevTools protocol
(--remote-debugging-pipe: JSON messages ending in NUL on file descriptors 3 and 4, so no
WebSocket client is needed): types a message into the page, presses Enter, waits for the streamed
answer and prints it as JSON on stdout, with the number of distinct lengths the answer was seen
at while it streamed.

    chat_page_browser.py CHROMIUM URL MESSAGE [API_KEY]
"""
import json
import os
import subprocess
import sys
import tempfile
import time

TIMEOUT = 120


def fail(message):
    print("FAIL: " + message, file=sys.stderr, flush=True)
    sys.exit(1)


class Browser:
    def __init__(self, chromium, profile):
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        def wire():
            # The protocol pipe must be fd 3 (commands in) and fd 4 (responses out) in the
            # child. Fresh copies first, so that moving one pipe end cannot overwrite the other.
            commands, responses = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(commands, 3)
            os.dup2(responses, 4)

        # close_fds would close 3 and 4 again after wire(); the parent's other fds are the pipes'
        # far ends, which Chromium never touches.
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-dev-shm-usage", "--user-data-dir=" + profile, "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buffer = b""
        self.next_id = 0

    def call(self, method, params=None, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_child, json.dumps(message).encode() + b"\0")
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        fail(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            chunk = os.read(self.from_child, 65536)
            if not chunk:
                fail(f"chromium closed the protocol pipe during {method}")
            self.buffer += chunk
        fail(f"no answer to {method} in {TIMEOUT} s")

    def close(self):
        try:
            self.call("Browser.close")
        except (SystemExit, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main():
    chromium, url, message = sys.argv[1], sys.argv[2], sys.argv[3]
    key = sys.argv[4] if len(sys.argv) > 4 else ""
    with tempfile.TemporaryDirectory() as profile:
        browser = Browser(chromium, profile)
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget",
                                   {"targetId": target, "flatten": True})["sessionId"]

            def evaluate(expression):
                result = browser.call("Runtime.evaluate",
                                      {"expression": expression, "returnByValue": True},
                                      session)
                if "exceptionDetails" in result:
                    fail(f"page script failed: {result['exceptionDetails']}")
                return result["result"].get("value")

            def wait_for(what, expression):
                deadline = time.time() + TIMEOUT
                while time.time() < deadline:
                    value = evaluate(expression)
                    if value:
                        return value
                    time.sleep(0.02)
                fail("timed out waiting for " + what)

            browser.call("Page.enable", session=session)
            browser.call("Page.navigate", {"url": url}, session)
            wait_for("the page", "document.readyState === 'complete' && "
                     "!!document.getElementById('input')")
            # Greedy, short answers: the test compares with the API's own answer.
            evaluate("document.getElementById('temperature').value = '0';"
                     "document.getElementById('max-tokens').value = '24';"
                     f"document.getElementById('api-key').value = {json.dumps(key)}; true")
            evaluate("document.getElementById('input').focus(); true")
            browser.call("Input.insertText", {"text": message}, session)
            for kind in ("keyDown", "keyUp"):
                browser.call("Input.dispatchKeyEvent",
                             {"type": kind, "key": "Enter", "code": "Enter",
                              "windowsVirtualKeyCode": 13, "text": "\r" if kind == "keyDown"
                              else ""}, session)
            answer = "document.querySelector('.message[data-role=\"assistant\"]')"
            wait_for("the answer to start", "!!" + answer)
            lengths = set()
            deadline = time.time() + TIMEOUT
            while time.time() < deadline:
                state = evaluate(f"[{answer}.dataset.state, {answer}.textContent]")
                lengths.add(len(state[1]))
                if state[0] != "streaming":
                    break
                time.sleep(0.005)
            else:
                fail("the answer never finished")
            user = evaluate("document.querySelector('.message[data-role=\"user\"]').textContent")
            print(json.dumps({"state": state[0], "answer": state[1], "user": user,
                              "lengths_seen": len(lengths)}))
        finally:
            browser.close()


if __name__ == "__main__":
    main()
