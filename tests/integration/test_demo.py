"""`swapd demo` is the first thing a newcomer runs: it must work and tell the truth."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.supervised import ROOT, SWAPD

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["stateful", "stateless"])
def test_demo(mode: str) -> None:
    proc = subprocess.run([*SWAPD, "demo", "--swaps", "2", "--json", "--mode", mode],
                          capture_output=True, text=True, timeout=180, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    swaps = [x["swap"] for x in lines if "swap" in x]
    assert len(swaps) == 2 and all(s["ok"] for s in swaps)
    requests = next(x["message"] for x in lines if x["message"].startswith("requests:"))
    assert requests.endswith("0 failed") or ", 0 failed (" in requests, requests
    state = next(x["message"] for x in lines if x["message"].startswith("state:"))
    if mode == "stateful":
        assert state.endswith("nothing lost"), state
        assert all(s["pause"] is not None for s in swaps)
    else:
        assert "lost" in state and "stateless swaps start every worker from zero" in state
