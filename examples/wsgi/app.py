"""A stateless Flask app under swapd: drains that lose no request, swaps under load.

    pip install '.[serve]' flask
    cd examples/wsgi
    swapd run --workers 2 --bind http=127.0.0.1:8000 --app app:app -- --threads 8
    curl http://127.0.0.1:8000/                  # served by a pool thread of one worker
    swapd upgrade                                # new processes; no client sees an error

`swapd serve` detects WSGI by itself (a plain callable) and runs it on a bounded thread pool
(--threads per worker), PEP 3333. Keep-alive connections are closed only between two
requests and only after they stayed silent for the idle grace, so no request is lost to the
keep-alive race; in-flight requests always finish.
"""

from __future__ import annotations

import os

from flask import Flask, request

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    return f"hello from pid {os.getpid()}\n"


@app.post("/echo")
def echo() -> bytes:
    return request.get_data()


@app.get("/stream")
def stream() -> object:
    def chunks() -> object:
        for i in range(3):
            yield f"chunk {i}\n"
    return app.response_class(chunks(), mimetype="text/plain")
