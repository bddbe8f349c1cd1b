"""Verify thorn deliveries in a Django view: Hook-HMAC and webhook-signature.

Add `thorn_webhook` to your urls.py. To try it alone (the test suite does):
    THORN_SECRET=... THORN_DIGEST=sha256 PORT=8000 python3 django_view.py
"""
import base64
import hashlib
import hmac
import os
import time

from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

SECRET = os.environ["THORN_SECRET"]                # the subscriber's hmac_secret
DIGEST = os.environ.get("THORN_DIGEST", "sha256")  # its hmac_digest
TOLERANCE = 5 * 60                                 # seconds either way


def hook_hmac_ok(body: bytes, header: str) -> bool:
    mac = hmac.new(SECRET.encode(), body, getattr(hashlib, DIGEST)).digest()
    return hmac.compare_digest(base64.b64encode(mac), header.encode())


def webhook_signature_ok(body: bytes, msg_id: str, timestamp: str, header: str) -> bool:
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE:
        return False  # stale or replayed
    key = base64.b64decode(SECRET[6:]) if SECRET.startswith("whsec_") else SECRET.encode()
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = b"v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    return any(hmac.compare_digest(expected, sig.encode()) for sig in header.split())


@csrf_exempt
@require_POST
def thorn_webhook(request):
    h = request.headers
    if not (hook_hmac_ok(request.body, h.get("Hook-HMAC", ""))
            and webhook_signature_ok(request.body, h.get("webhook-id", ""),
                                     h.get("webhook-timestamp", ""),
                                     h.get("webhook-signature", ""))):
        return HttpResponse(status=401)
    # Deliveries are at-least-once: skip a webhook-id you have already seen.
    # payload = json.loads(request.body)  (or request.POST for form-encoded)
    return HttpResponse(status=204)


if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    from django.conf import settings
    from django.core.wsgi import get_wsgi_application
    from django.urls import re_path

    settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="demo-only")
    urlpatterns = [re_path(r"", thorn_webhook)]
    make_server("127.0.0.1", int(os.environ.get("PORT", "8000")),
                get_wsgi_application()).serve_forever()
