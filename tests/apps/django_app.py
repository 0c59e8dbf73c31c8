"""A one-file Django project for gunicorn (`django_app:application`); its release's behaviour
comes from servers_app ($BEHAVIOR): an import error, or an exception while Django starts
(an installed app whose AppConfig.ready() raises, as a broken app's ready() would)."""

# ruff: noqa: E402  (the clock starts before the imports it measures)
import time

_T0 = time.perf_counter()

import servers_app
from django.apps import AppConfig
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path


class BrokenConfig(AppConfig):
    name = "django_app"
    label = "django_app_broken"

    def ready(self) -> None:
        raise RuntimeError("simulated failure in AppConfig.ready()")


settings.configure(
    DEBUG=False,
    SECRET_KEY="swapd-test-only",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=["django_app.BrokenConfig"] if servers_app.STARTUP_ERROR else [],
)


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(servers_app.body(), content_type="text/plain")


urlpatterns = [path("", index)]

from django.core.wsgi import get_wsgi_application  # after settings

application = get_wsgi_application()
servers_app.log_import(_T0)  # the whole import, Django's setup included
