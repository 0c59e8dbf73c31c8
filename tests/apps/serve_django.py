"""A one-module Django project for the `swapd serve` tests: `serve_django:asgi` and
`serve_django:wsgi` (Django's own handlers; ASGI has no lifespan, WSGI is sync)."""

from __future__ import annotations

import os

import django
from django.conf import settings

settings.configure(
    DEBUG=False, SECRET_KEY="swapd-serve-tests-" + "x" * 40, ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"], MIDDLEWARE=[], INSTALLED_APPS=[], USE_TZ=True,
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


def hello(request: HttpRequest, name: str = "") -> HttpResponse:
    return HttpResponse(f"django {os.getpid()} {request.path} {request.GET.get('q', '')}")


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


urlpatterns = [path("", hello), path("hello/<str:name>", hello), path("echo", echo)]
asgi = get_asgi_application()
wsgi = get_wsgi_application()
