"""Signature changes: refused for functions an object analysed when they were registered
(FastAPI routes and dependencies, pydantic's validate_call), a warning for every other one.

The FastAPI apps run in-process and are called through httpx's ASGI transport: what a route
answers before and after each patch is what a client would get.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from swapd import patch
from tests.unit.patch_support import Mods, edit

ROOT = Path(__file__).resolve().parents[2]

FASTAPI_APP = """
import functools

from fastapi import Depends, FastAPI

app = FastAPI()


def page_size(per_page: int = 3) -> int:
    return per_page


def logged(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        return await fn(*args, **kwargs)
    return wrapper


@app.get("/slow")
async def slow(t: float = 1.0):
    return {"slept": t}


@app.get("/items")
async def items(size: int = Depends(page_size)):
    return list(range(10))[:size]


class Pager:
    def __init__(self, page: int = 1):
        self.page = page


@app.get("/paged")
async def paged(pager: Pager = Depends()):
    return {"page": pager.page}


@app.get("/wrapped")
@logged
async def wrapped(n: int = 1):
    return {"n": n}
"""


def get(app: Any, url: str) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(url)

    return asyncio.run(call())


def served(m: ModuleType) -> dict[str, Any]:
    """What the routes answer (each one called the way a client would)."""
    return {url: get(m.app, url).json()
            for url in ("/slow?t=0.5", "/slow", "/items?per_page=2", "/items?limit=2",
                        "/wrapped?n=4", "/paged?page=5")}


BEFORE = {"/slow?t=0.5": {"slept": 0.5}, "/slow": {"slept": 1.0}, "/items?per_page=2": [0, 1],
          "/items?limit=2": [0, 1, 2], "/wrapped?n=4": {"n": 4},
          "/paged?page=5": {"page": 5}}


def assert_refused(m: ModuleType, new: str, *texts: str) -> None:
    plan = patch.prepare(m, new)
    assert not plan.committable
    reasons = [str(r) for r in plan.refused]
    assert len(reasons) == 1 and all(t in reasons[0] for t in texts), reasons
    assert plan.to_dict()["refused"][0]["remedy"] == "needs a swap"
    with pytest.raises(patch.PatchRefused) as err:
        plan.commit()
    assert "needs a swap" in str(err.value) and "\n" not in str(err.value)
    assert served(m) == BEFORE, "a refused patch changes nothing"


def test_renamed_parameter_of_a_fastapi_route_is_refused(mods: Mods) -> None:
    m = mods.load(FASTAPI_APP)
    assert served(m) == BEFORE
    new = edit(FASTAPI_APP, ("async def slow(t: float = 1.0):\n    return {\"slept\": t}",
                             "async def slow(seconds: float = 1.0):\n"
                             "    return {\"slept\": seconds}"))
    # Committed, FastAPI would call slow(t=0.5): TypeError, a 500 on every request.
    assert_refused(m, new, f"{m.__name__}.py:", "def slow: its signature changes from "
                   "(t: float=1.0) to (seconds: float=1.0) and FastAPI route GET /slow "
                   "introspected the old one")
    # Looked for even when the plan is told not to scan the heap for functions.
    assert patch.prepare(m, new, scan_heap=False).refused == patch.prepare(m, new).refused


def test_added_parameter_of_a_fastapi_route_is_refused(mods: Mods) -> None:
    m = mods.load(FASTAPI_APP)
    new = edit(FASTAPI_APP, ("async def items(size: int = Depends(page_size)):\n"
                             "    return list(range(10))[:size]",
                             "async def items(size: int = Depends(page_size), limit: int = 9):\n"
                             "    return list(range(10))[:min(size, limit)]"))
    # Committed, ?limit=2 would never be filled from the query: 3 items.
    assert_refused(m, new, "def items: its signature changes", "limit: int=9)",
                   "FastAPI route GET /items")


@pytest.mark.parametrize(("old", "new", "texts"), [
    # a dependency: FastAPI would keep calling page_size(per_page=...)
    ("def page_size(per_page: int = 3) -> int:\n    return per_page",
     "def page_size(count: int = 3) -> int:\n    return count",
     ("def page_size", "a FastAPI dependency of /items")),
    # a default value: FastAPI would keep passing t=1.0 explicitly
    ("async def slow(t: float = 1.0):", "async def slow(t: float = 2.0):",
     ("from (t: float=1.0) to (t: float=2.0)", "FastAPI route GET /slow")),
    # an annotation: FastAPI would keep converting t to a float
    ("async def slow(t: float = 1.0):", "async def slow(t: str = 1.0):",
     ("(t: str=1.0)", "FastAPI route GET /slow")),
    # behind functools.wraps: FastAPI read the signature through __wrapped__
    ("async def wrapped(n: int = 1):\n    return {\"n\": n}",
     "async def wrapped(k: int = 1):\n    return {\"n\": k}",
     ("def wrapped", "FastAPI route GET /wrapped")),
    # a class dependency: FastAPI read the signature of its __init__
    ("    def __init__(self, page: int = 1):\n        self.page = page",
     "    def __init__(self, number: int = 1):\n        self.page = number",
     ("def Pager.__init__", "a FastAPI dependency of /paged")),
], ids=["dependency", "default-value", "annotation", "wrapped", "class-dependency"])
def test_every_part_of_a_signature_fastapi_read_is_refused(
        mods: Mods, old: str, new: str, texts: tuple[str, ...]) -> None:
    m = mods.load(FASTAPI_APP)
    assert_refused(m, edit(FASTAPI_APP, (old, new)), *texts)


def test_body_only_change_of_a_fastapi_route_is_committed_and_served(mods: Mods) -> None:
    m = mods.load(FASTAPI_APP)
    plan = patch.prepare(m, edit(FASTAPI_APP, ('return {"slept": t}',
                                               'return {"slept": t * 2}')))
    assert plan.committable and plan.refused == [] and plan.notes == []
    assert plan.changed == [("function", "slow", "code; 1 object(s)")]
    handle = plan.commit()
    assert get(m.app, "/slow?t=0.5").json() == {"slept": 1.0}
    assert get(m.app, "/items?per_page=2").json() == [0, 1]
    handle.rollback()
    assert served(m) == BEFORE


PLAIN = """
def price(amount, rate):
    return amount * rate


def annotated(x: int) -> int:
    return x


def fee(amount):
    return 1


def total(items):
    return sum(price(a, 2) for a in items)
"""


def test_plain_signature_change_commits_with_a_warning(mods: Mods) -> None:
    m = mods.load(PLAIN)
    held = m.price
    new = edit(PLAIN, ("def price(amount, rate):\n    return amount * rate",
                       "def price(amount, *, rate=3):\n    return amount * rate"),
               ("def annotated(x: int) -> int:", "def annotated(x: str) -> str:"),
               ("def fee(amount):\n    return 1",
                "def fee(amount, minimum=0):\n    return max(1, minimum)"))
    plan = patch.prepare(m, new)
    assert plan.committable and plan.refused == []
    warnings = [
        f"{m.__file__}:2: warning: signature of price changed from (amount, rate) to "
        "(amount, *, rate=3): callers that pass the old arguments break",
        f"{m.__file__}:10: warning: signature of fee changed from (amount) to "
        "(amount, minimum=0): calls written for the old one still bind the same way; what "
        "analysed the old one keeps it",
    ]
    assert sorted(plan.notes) == sorted(warnings), "for the parameters, not for annotations"
    assert sorted(plan.to_dict()["notes"]) == sorted(warnings)
    assert ("function", "price", "code, defaults (rate), signature; 1 object(s)") in plan.changed
    plan.commit()
    assert held(2) == 6 and m.fee(5) == 1
    with pytest.raises(TypeError):
        m.total([1])  # the old call, as the warning says


def test_pydantic_validate_call_is_an_introspector(mods: Mods) -> None:
    source = """
from pydantic import validate_call


@validate_call
def scale(x: int, factor: int = 2) -> int:
    return x * factor
"""
    m = mods.load(source)
    plan = patch.prepare(m, edit(source, ("factor: int = 2) -> int:\n    return x * factor",
                                          "by: int = 2) -> int:\n    return x * by")))
    assert [r.reason for r in plan.refused] == [
        "its signature changes from (x: int, factor: int=2) -> int to (x: int, by: int=2) -> int "
        "and pydantic's validate_call introspected the old one: it would keep calling it with "
        "the old arguments and ignore new parameters, defaults and annotations"]
    plan = patch.prepare(m, edit(source, ("return x * factor", "return x * factor + 1")))
    plan.commit()
    assert m.scale("3") == 7


def test_flask_views_keep_no_signature_so_they_get_the_warning(mods: Mods) -> None:
    source = """
from flask import Flask

app = Flask(__name__)


@app.get("/hi/<name>")
def hi(name):
    return f"hi {name}"
"""
    m = mods.load(source)
    plan = patch.prepare(m, edit(source, ("def hi(name):", "def hi(name, greeting='hello'):"),
                                 ('return f"hi {name}"', 'return f"{greeting} {name}"')))
    assert plan.committable
    assert [n for n in plan.notes if "warning: signature of hi changed" in n]
    plan.commit()
    assert m.app.test_client().get("/hi/bob").text == "hello bob"


def test_no_framework_is_imported_to_look_for_introspectors(tmp_path: Path) -> None:
    """A process that never imported FastAPI or pydantic: the engine does not import them to
    check a signature change (and warns as for any plain function)."""
    (tmp_path / "plainmod.py").write_text(PLAIN)
    script = """
import sys
from swapd import patch
patch.record_sources(["plainmod"])
import plainmod
source = open("plainmod.py").read()
plan = patch.prepare("plainmod", source.replace("(amount, rate)", "(amount, rate, tax=0)"))
assert plan.committable, plan.refused
print(plan.notes)
print(sorted(m for m in ("fastapi", "pydantic", "starlette") if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    notes, imported = out.stdout.splitlines()
    assert "warning: signature of price changed" in notes
    assert imported == "[]"
