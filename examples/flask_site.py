"""A small Flask site that collects its own analytics with fp-collect.

Run it (from any directory)::

    python examples/flask_site.py        # http://127.0.0.1:5000, or set PORT

The home page sends a ``page`` event to ``/collect/v1/p`` on this same site as it
loads, the way analytics.js does, and its form sends a ``track`` event. See what
arrived with::

    fp-collect events --storage sqlite:///$PWD/examples/example.db

Configuration: ``FP_COLLECT_STORAGE`` (default ``examples/example.db``),
``FP_COLLECT_WRITE_KEY`` (default ``example-write-key``) and ``PORT``.
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, render_template_string

from fp_collect import Source
from fp_collect.adapters.wsgi import init_app

WRITE_KEY = os.environ.get("FP_COLLECT_WRITE_KEY") or "example-write-key"
STORAGE = os.environ.get("FP_COLLECT_STORAGE") or (
    f"sqlite:///{Path(__file__).resolve().with_name('example.db')}"
)

app = Flask(__name__)

# The whole integration: /collect/v1/... is answered by the collector, the rest by Flask.
collector = init_app(
    app,
    prefix="/collect",
    sources=[Source(write_key=WRITE_KEY, id="flask-site")],
    storage=STORAGE,
)

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>fp-collect on Flask</title>
  <style>
    body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; }
    code { background: #f3f3f3; padding: 0 .25em; }
  </style>
</head>
<body>
  <h1>A Flask site with first-party analytics</h1>
  <p>As this page loaded it sent a <code>page</code> event to
     <code>/collect/v1/p</code> on this same site: no third-party script, no other domain.</p>
  <form id="signup">
    <label>Plan
      <select name="plan"><option>free</option><option>pro</option></select>
    </label>
    <button type="submit">Sign up</button>
  </form>
  <p id="status" role="status"></p>
  <p>See what arrived: <code>fp-collect events --storage {{ storage }}</code></p>
  <script>
  (() => {
    const WRITE_KEY = {{ write_key|tojson }};
    const ENDPOINT = "/collect/v1/";

    const uuid = () =>
      crypto.randomUUID
        ? crypto.randomUUID()
        : String(Date.now()) + Math.random().toString(16).slice(2);
    const anonymousId = () => {
      try {
        let id = localStorage.getItem("fp_anonymous_id");
        if (!id) localStorage.setItem("fp_anonymous_id", (id = uuid()));
        return id;
      } catch (_) {
        return uuid();  // storage blocked: one id per page view
      }
    };

    // What analytics.js does: the write key in the body and Content-Type text/plain,
    // a "simple" request that needs no CORS preflight.
    const send = (path, message) => {
      const now = new Date().toISOString();
      const body = {
        ...message,
        writeKey: WRITE_KEY,
        anonymousId: anonymousId(),
        messageId: uuid(),
        timestamp: now,
        sentAt: now,
        context: {
          page: {
            path: location.pathname,
            url: location.href,
            title: document.title,
            referrer: document.referrer,
          },
          library: { name: "fp-collect-example", version: "1.0" },
        },
      };
      return fetch(ENDPOINT + path, {
        method: "POST",
        headers: { "Content-Type": "text/plain" },
        body: JSON.stringify(body),
        keepalive: true,
      });
    };

    send("p", { name: "Home", properties: { path: location.pathname, title: document.title } });

    const form = document.getElementById("signup");
    const status = document.getElementById("status");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      send("t", { event: "Signed Up", properties: { plan: form.elements.plan.value } }).then(
        (response) => {
          status.textContent = response.ok
            ? "Thanks! A track event was stored."
            : "The collector answered " + response.status;
        },
        () => { status.textContent = "Could not reach the collector."; },
      );
    });
  })();
  </script>
</body>
</html>
"""


@app.get("/")
def home() -> str:
    # tojson makes the key safe inside <script>.
    return render_template_string(PAGE, write_key=WRITE_KEY, storage=STORAGE)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
