"""RFC 9457 problem details, and the mapping of internal errors to them."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from aiohttp import web

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str = "",
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, object] | None = None,
) -> web.Response:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra or {})
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type=PROBLEM_JSON, headers=headers
    )


class ProblemError(Exception):
    """Raise from a handler to answer with a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra

    def response(self) -> web.Response:
        return problem(self.status, self.title, self.detail, headers=self.headers, extra=self.extra)


def reject_unknown_params(request: web.Request, allowed: Iterable[str]) -> None:
    if not request.query_string:
        return
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        allowed_list = ", ".join(sorted(allowed)) or "none"
        raise ProblemError(
            400,
            "Unknown query parameter",
            f"unknown query parameter(s): {', '.join(unknown)} (allowed: {allowed_list})",
        )
