"""`swapd patch` on a served FastAPI app: a change to a route's signature is refused on every
worker (FastAPI would keep passing the old arguments), a plain function's commits with the
warning printed."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.supervised import ROOT, supervised

APPS = ROOT / "tests" / "apps"


@pytest.mark.slow
def test_route_signature_refused_plain_signature_warned(tmp_path: Path) -> None:
    source = (APPS / "fastapi_app.py").read_text()
    with supervised(tmp_path, [], args=["--app", "fastapi_app:app", "--cwd", str(APPS),
                                        "--workers", "2"]) as s:
        url = "http://{}:{}/slow".format(*s.address())
        assert httpx.get(url, params={"t": 0.5}, timeout=10).json() == {"slept": 0.5}

        renamed = tmp_path / "renamed.py"
        renamed.write_text(source.replace("async def slow(t: float = 1.0)",
                                          "async def slow(seconds: float = 1.0)")
                           .replace("scale(t)", "scale(seconds)"))
        out = s.cli("patch", str(renamed), "--module", "fastapi_app")
        assert out.returncode == 1, out.stdout + out.stderr
        text = out.stdout + out.stderr
        assert "def slow: its signature changes from (t: float=1.0) -> dict[str, float] to " \
               "(seconds: float=1.0) -> dict[str, float] and FastAPI route GET /slow " \
               "introspected the old one" in text, text
        assert "needs a swap" in text and s.status()["patches"] == []
        for _ in range(4):  # both workers still answer the old way
            assert httpx.get(url, params={"t": 0.5}, timeout=10).json() == {"slept": 0.5}

        helper = tmp_path / "helper.py"
        helper.write_text(source.replace("def scale(x: float, factor: float = 1.0)",
                                         "def scale(x: float, *, factor: float = 2.0)"))
        out = s.cli("patch", str(helper), "--module", "fastapi_app")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "in force on 2 worker(s)" in out.stdout
        assert "warning: signature of scale changed from (x: float, factor: float=1.0) -> " \
               "float to (x: float, *, factor: float=2.0) -> float: callers that pass the " \
               "old arguments break" in out.stdout, out.stdout
        for _ in range(4):
            assert httpx.get(url, params={"t": 0.5}, timeout=10).json() == {"slept": 1.0}
