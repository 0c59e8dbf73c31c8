"""shop: a service with a pricing bug, fixed in place by `swapd patch` (no restart).

    swapd run --bind http=127.0.0.1:8000 --workers 2 -- python examples/patching/shop.py
    curl 'http://127.0.0.1:8000/quote?qty=12'      # 300: wrong (10% of the price)
    swapd patch examples/patching/fix_rules.py --module rules
    curl 'http://127.0.0.1:8000/quote?qty=12'      # 2700: right
    curl 'http://127.0.0.1:8000/stats'             # the counters kept counting
    swapd patch --rollback                          # the old code again, counters still kept
    curl 'http://127.0.0.1:8000/total?qty=12'      # 360: price + 20% VAT
    swapd patch examples/patching/vat/taxes.py --module taxes \
                examples/patching/vat/rules.py --module rules      # one patch, two modules
    curl 'http://127.0.0.1:8000/total?qty=12'      # 330: 10% VAT, both modules changed at once

GET /quote?qty=N -> price in cents; GET /total?qty=N -> price with VAT; POST /order?qty=N ->
amount charged (400 if refused); GET /stats -> "pid=... quotes=... orders=... revenue=..."
for the worker that answers.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import parse_qs, urlsplit

from swapd import worker  # first: records the sources of the modules imported after it

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rules  # the module a patch replaces
from httpkit import Request, Response, serve_http


def _qty(target: str) -> int:
    values = parse_qs(urlsplit(target).query).get("qty", ["1"])
    return int(values[0])


async def app(request: Request) -> Response:
    path = urlsplit(request.target).path
    try:
        if path == "/quote":
            rules.count_quote()
            return Response(200, str(rules.price(_qty(request.target))).encode())
        if path == "/total":
            return Response(200, str(rules.total(_qty(request.target))).encode())
        if path == "/order" and request.method == "POST":
            return Response(200, str(rules.order(_qty(request.target))).encode())
    except ValueError as e:
        return Response(400, f"{e}\n".encode())
    if path == "/stats":
        s = rules.STATS
        return Response(200, f"pid={os.getpid()} quotes={rules.quotes_served()} "
                             f"orders={s['orders']} "
                             f"revenue={s['revenue']}".encode())
    return Response(404, b"not found\n")


async def main(w: worker.Worker) -> None:
    await w.serve("http", lambda conn: serve_http(conn, app))
    await w.ready()


if __name__ == "__main__":
    worker.run(main, default_binds={"http": "127.0.0.1:8000"})
