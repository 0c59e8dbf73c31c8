"""A Flask application factory for gunicorn (`flask_app:create_app()`); its release's
behaviour comes from servers_app ($BEHAVIOR): an import error, or a failing factory."""

# ruff: noqa: E402  (the clock starts before the imports it measures)
import time

_T0 = time.perf_counter()

import servers_app
from flask import Flask


def create_app() -> Flask:
    if servers_app.STARTUP_ERROR:
        raise RuntimeError("simulated failure in create_app()")
    app = Flask(__name__)

    @app.get("/")
    def index() -> tuple[bytes, int, dict[str, str]]:
        return servers_app.body(), 200, {"Content-Type": "text/plain"}

    servers_app.log_import(_T0)  # the whole import, Flask and the factory included
    return app
