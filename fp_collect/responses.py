"""Building responses: JSON bodies, the tracking pixel, and their headers."""

from __future__ import annotations

import base64
from http import HTTPStatus

from fp_collect.decoding import dumps_lenient
from fp_collect.http import HeaderList, Response

JSON_HEADERS: HeaderList = [("content-type", "application/json")]

# A 1x1 transparent GIF, the smallest image every mail client and browser renders.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PIXEL_HEADERS: HeaderList = [
    ("content-type", "image/gif"),
    # A cached pixel is a lost event: forbid every cache on the way.
    ("cache-control", "no-cache, no-store, must-revalidate, private, max-age=0"),
    ("pragma", "no-cache"),
    ("expires", "0"),
]

SUCCESS_BODY = b'{"success":true}'


def json_response(
    status: HTTPStatus, body: object, extra_headers: HeaderList | None = None
) -> Response:
    encoded = SUCCESS_BODY if body is _SUCCESS else dumps_lenient(body).encode()
    headers = list(JSON_HEADERS)
    if extra_headers:
        headers.extend(extra_headers)
    return Response(status, headers, encoded)


def success(extra_headers: HeaderList | None = None) -> Response:
    return json_response(HTTPStatus.OK, _SUCCESS, extra_headers)


def pixel(status: HTTPStatus = HTTPStatus.OK, extra_headers: HeaderList | None = None) -> Response:
    headers = list(PIXEL_HEADERS)
    if extra_headers:
        headers.extend(extra_headers)
    return Response(status, headers, PIXEL_GIF)


def error_object(status: HTTPStatus, message: str, details: str = "") -> dict[str, object]:
    """The HTTP Tracking API's error object: ``{"Error", "Message", "Details"}``."""
    return {"Error": status.phrase, "Message": message, "Details": details}


def single_error(
    status: HTTPStatus, reason: str, message: str, details: str = ""
) -> dict[str, object]:
    """A single-call error body. ``code``/``message`` are added because the Segment-spec
    SDKs read them (rudder-sdk-python retries a 4xx whose body has no ``code``)."""
    body = error_object(status, message, details)
    body["code"] = reason
    body["message"] = message
    return body


_SUCCESS = object()


def unreadable_body(reason: str) -> Response:
    """The adapters' answer to a body they could not read whole: broken framing, or a
    client gone before its end. Nothing of such a request is processed or recorded."""
    body = single_error(
        HTTPStatus.BAD_REQUEST, "invalid_body", "The request body could not be read", reason
    )
    return json_response(HTTPStatus.BAD_REQUEST, body)
