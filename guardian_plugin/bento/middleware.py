"""The ASGI middleware that answers missing identities (401) and refused clients (403) before the
request body is read."""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from guardian_plugin.bento.decorator import GuardSettings


class GuardianMiddleware:
    """ASGI middleware: per-request identity, 401 for a missing one (when required), 403 with a JSON
    reason for a refused client -- before the request body is read and the API method runs."""

    def __init__(self, app, settings: GuardSettings, paths: t.Iterable[str]):
        self.app = app
        self.settings = settings
        self.paths = frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        rt = self.settings.runtime()
        _, refusal = rt.check_request(Request(scope))
        if refusal is not None:
            status, body = refusal
            return await JSONResponse(body, status_code=status)(scope, receive, send)
        return await self.app(scope, receive, send)
