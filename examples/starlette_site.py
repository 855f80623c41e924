"""A small Starlette site that collects its own analytics with fp-collect.

Run it (from any directory)::

    python examples/starlette_site.py    # http://127.0.0.1:8000, or set PORT

The home page sends a ``page`` event to ``/collect/v1/p`` on this same site as it
loads, the way analytics.js does, and its button sends a ``track`` event. See what
arrived with::

    fp-collect events --storage sqlite:///$PWD/examples/example.db

Configuration: ``FP_COLLECT_STORAGE`` (default ``examples/example.db``),
``FP_COLLECT_WRITE_KEY`` (default ``example-write-key``) and ``PORT``.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from fp_collect import Collector, Source
from fp_collect.adapters.asgi import CollectorMiddleware

WRITE_KEY = os.environ.get("FP_COLLECT_WRITE_KEY") or "example-write-key"
STORAGE = os.environ.get("FP_COLLECT_STORAGE") or (
    f"sqlite:///{Path(__file__).resolve().with_name('example.db')}"
)

collector = Collector(
    prefix="/collect",
    sources=[Source(write_key=WRITE_KEY, id="starlette-site")],
    storage=STORAGE,
)


def script_json(value: object) -> str:
    """JSON that is safe inside <script>: no "</script>" can end the block early."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>fp-collect on Starlette</title>
  <style>
    body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; }
    code { background: #f3f3f3; padding: 0 .25em; }
  </style>
</head>
<body>
  <h1>A Starlette site with first-party analytics</h1>
  <p>As this page loaded it sent a <code>page</code> event to
     <code>/collect/v1/p</code> on this same site: no third-party script, no other domain.</p>
  <p><button id="buy" type="button">Buy the T-shirt</button></p>
  <p id="status" role="status"></p>
  <p>See what arrived: <code>fp-collect events --storage __STORAGE__</code></p>
  <script>
  (() => {
    const WRITE_KEY = __WRITE_KEY__;
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

    const status = document.getElementById("status");
    document.getElementById("buy").addEventListener("click", () => {
      // An order id of its own: the confirmation restriction keeps one event per order.
      const order = {
        event: "Order Completed",
        properties: { order_id: "order-" + Date.now(), product: "T-shirt", price: 20 },
      };
      send("t", order).then(
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
HOME = PAGE.replace("__WRITE_KEY__", script_json(WRITE_KEY)).replace(
    "__STORAGE__", html.escape(STORAGE)
)


async def home(request: Request) -> HTMLResponse:
    return HTMLResponse(HOME)


app = Starlette(
    routes=[Route("/", home)],
    # The whole integration: /collect/v1/... is answered by the collector, the rest by
    # Starlette; the store is flushed and closed when the app shuts down.
    middleware=[Middleware(CollectorMiddleware, collector=collector)],
)

# Or mount only the collection routes under a path of their own (the collector then
# has no prefix, since Mount strips "/collect"; close it in your app's lifespan):
#
#     from starlette.routing import Mount
#     from fp_collect.adapters.asgi import collector_app
#
#     collector = Collector(sources=[...], storage=STORAGE)
#     app = Starlette(routes=[
#         Route("/", home),
#         Mount("/collect", app=collector_app(collector=collector)),
#     ])


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
