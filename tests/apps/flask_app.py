"""A Flask application factory for gunicorn (`flask_app:create_app()`); its release's
behaviour comes from servers_app ($BEHAVIOR): an import error, or a failing factory."""

import servers_app
from flask import Flask


def create_app() -> Flask:
    if servers_app.STARTUP_ERROR:
        raise RuntimeError("simulated failure in create_app()")
    app = Flask(__name__)

    @app.get("/")
    def index() -> tuple[bytes, int, dict[str, str]]:
        return servers_app.body(), 200, {"Content-Type": "text/plain"}

    return app
