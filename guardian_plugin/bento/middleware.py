"""The ASGI middleware of a guarded service: the request's admission before its body is read, and one
JSON error shape for every error answer of a guarded route."""

from __future__ import annotations

import json
import re
import typing as t

from guardian_plugin.responses import UNAVAILABLE, Denial

if t.TYPE_CHECKING:
    from guardian_plugin.bento.decorator import GuardSettings

# an input error raised by the guard's validators as ValueError("[Kind] message") (api.py)
_TAGGED = re.compile(r"\[([A-Za-z]+)\] (.*)", re.S)
_MAX_ERROR_BODY = 1 << 16
# the request's Admission, kept in the request's state (runtime.check_request): when an error answer has
# the status of its denial (a 429 or 403 raised inside BentoML's request handling), _ErrorBodies sends
# the denial's own body and headers (Retry-After)
STATE_ADMISSION = "guardian_admission"


def input_error(kind: str, message: str) -> ValueError:
    """The ValueError a validator raises for a bad input: BentoML answers 400, and the middleware turns
    its body into the guard's ``{"code", "type", "message"}``."""
    return ValueError(f"[{kind}] {message}")


def denial_exception(denial):
    """A denial raised inside BentoML's request handling, answered with the denial's status. BentoML
    replaces the message of 401/403/5xx exceptions; the middleware restores the body (error_body)."""
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException

    class _Denied(BentoMLException):
        error_code = HTTPStatus(denial.status)

    return _Denied(f"[{denial.kind}] {denial.message}")


def error_body(status: int, raw: bytes) -> dict:
    """BentoML's own error body (validation errors, exceptions) in the guard's shape. Inside a guarded
    route a 503 comes only from the guard (the store is down: BentoML's own overload answers come from
    its outer middleware), so it gets the guard's LedgerUnavailable body."""
    if status == UNAVAILABLE.status:
        return UNAVAILABLE.body()
    kind = {400: "BadInput", 404: "NotFound", 413: "TooLarge", 415: "UnsupportedMediaType"}.get(
        status, "ServerError" if status >= 500 else "BadRequest")
    message = raw.decode("utf-8", "replace")[:2000]
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        message = str(data.get("error") or message)
        for err in data.get("detail") or []:
            msg = str(err.get("msg", "")) if isinstance(err, dict) else ""
            m = _TAGGED.search(msg)
            if m:
                return {"code": status, "type": m.group(1), "message": m.group(2)}
            if msg:
                loc = ".".join(str(x) for x in err.get("loc", ()))
                message = f"{loc}: {msg}" if loc else msg
    m = _TAGGED.search(message)
    if m:
        kind, message = m.group(1), m.group(2)
    return {"code": status, "type": kind, "message": message}


class GuardianMiddleware:
    """ASGI middleware on a guarded service's API routes: ``Guardian.admit`` before the request body is
    read (401/400 identity, 403 refused, 503 store down, each with the guard's JSON body), and every
    error answer of those routes rewritten to the same ``{"code", "type", "message"}`` shape that the
    TorchServe adapter sends."""

    def __init__(self, app, settings: GuardSettings, paths: t.Mapping[str, tuple]):
        self.app = app
        self.settings = settings
        self.paths = dict(paths)  # route -> (input field names, file field names)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        request = Request(scope)
        adm = self.settings.runtime().check_request(request)
        if adm.denial is not None:
            return await denial_response(adm.denial)(scope, receive, send)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data":
            body, receive = await _buffered(receive)
            problem = multipart_problem(request.headers["content-type"], body, *self.paths[scope["path"]])
            if problem is not None:
                return await denial_response(Denial.bad_input("BadMultipart", problem))(scope, receive, send)
        return await self.app(scope, receive, _ErrorBodies(send, scope, self.settings.runtime().answered_error))


async def _buffered(receive):
    """The whole request body, and a ``receive`` that hands it to the app again."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def multipart_problem(content_type: str, body: bytes, fields: frozenset, file_fields: frozenset) -> t.Optional[str]:
    """Why a multipart body cannot be one of this API's requests (None when it can): no boundary,
    broken framing, a part that names no input of the API, or text where the API takes a file (BentoML
    would fetch a text value of a file field as a URL)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        return "multipart/form-data without a boundary"
    parts: t.List[dict] = []
    header = {"field": b"", "value": b""}

    def on_part_begin():
        parts.append({})

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        if header["field"].lower() == b"content-disposition":
            parts[-1]["disposition"] = parse_options_header(header["value"])[1]
        header["field"], header["value"] = b"", b""

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # noqa: BLE001 - python-multipart's errors for a malformed body
        return f"malformed multipart body ({type(e).__name__}: {e})"
    if not parts:
        return "the multipart body has no parts"
    for part in parts:
        disp = part.get("disposition") or {}
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name not in fields:
            return f"the part {name!r} is not an input of this API (inputs: {', '.join(sorted(fields))})"
        if name in file_fields and b"filename" not in disp:
            return f"the part {name!r} must be a file upload"
    return None


def denial_response(denial):
    from starlette.responses import JSONResponse

    return JSONResponse(denial.body(), status_code=denial.status, headers=denial.headers())


class _ErrorBodies:
    """An ASGI ``send`` that passes successful answers through and rewrites error bodies: the request's
    own denial (its status, body and headers) when the answer has the denial's status, else BentoML's
    error in the guard's shape (error_body)."""

    def __init__(self, send, scope=None, sent=None):
        self.send = send
        self.scope = scope if scope is not None else {}
        self.sent = sent  # called with the request's admission once an error answer has been sent
        self.start = None
        self.body = b""

    def _denial(self, status: int):
        adm = (self.scope.get("state") or {}).get(STATE_ADMISSION)
        denial = getattr(adm, "denial", None)
        if denial is not None and denial.status == status:
            return denial
        return UNAVAILABLE if status == UNAVAILABLE.status else None

    async def __call__(self, message):
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.body += message.get("body", b"")[:_MAX_ERROR_BODY]
        if message.get("more_body"):
            return
        status = self.start["status"]
        denial = self._denial(status)
        body = json.dumps(denial.body() if denial is not None else error_body(status, self.body)).encode()
        drop = (b"content-length", b"content-type", b"retry-after")
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in drop]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if denial is not None:
            headers += [(k.lower().encode(), v.encode()) for k, v in denial.headers().items()]
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
        adm = (self.scope.get("state") or {}).get(STATE_ADMISSION)
        if self.sent is not None and adm is not None:
            self.sent(adm)
