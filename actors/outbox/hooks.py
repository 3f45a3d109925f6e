"""What a webhook endpoint is sent: the body in its format, and the
signature over a timestamp and that body.

``Jarvisd-Signature: t=<unix seconds>,v1=<hex>`` where ``v1`` is
HMAC-SHA256 under the endpoint's secret of ``<t>.<body>`` (the bytes as
sent): a receiver recomputes it, compares in constant time, and refuses a
``t`` too far from its clock (a replay). ``Jarvisd-Event-Id`` is the
event's id (ids only grow: a receiver drops one it has seen)."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import time
from typing import TYPE_CHECKING, Any

import msgspec

from config import WebhookSettings

if TYPE_CHECKING:
    import aiohttp

__all__ = ["clean", "matcher", "payload", "post", "sign", "slack_text", "verify"]

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def matcher(types: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for an endpoint's event types and globs."""
    return re.compile("|".join(f"(?:{fnmatch.translate(t)})" for t in types))


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    """The ``Jarvisd-Signature`` header's value for ``body`` sent at ``at``."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300.0) -> bool:
    """Whether ``header`` signs ``body`` under ``secret`` within ``tolerance``
    seconds of now: what a receiver does (tests use it, docs show it)."""
    parts = dict(p.partition("=")[::2] for p in header.split(","))
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance:
        return False
    want = hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, parts.get("v1", ""))


def payload(hook: WebhookSettings, event: bytes, link_base: str) -> bytes:
    """The body for ``hook``: the event as it is, or Slack's ``{"text": …}``."""
    if hook.format == "slack":
        return _encoder.encode({"text": slack_text(_decoder.decode(event), link_base)})
    return event


def _esc(value: Any) -> str:
    """A value safe in Slack's markup: no mentions, no links of its own."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _quoted(value: Any, limit: int) -> str:
    """Text someone else wrote (an agent's description, a reason), cut,
    on one line, as code: Slack and its kin make no mention, link or
    formatting of it, and it cannot start a line of its own."""
    text = " ".join(str(value)[:limit].split()).replace("`", "'")
    return f"`{_esc(text)}`" if text else ""


def slack_text(event: dict[str, Any], link_base: str) -> str:
    """One message for a person: what is asked, how risky, where to decide."""
    data: dict[str, Any] = event.get("data") or {}
    kind = event.get("type", "")
    approval = data.get("approvalId")
    link = f"<{link_base.rstrip('/')}/approvals/{approval}|request #{approval}>" if approval else ""
    if kind == "approval.requested":
        lines = [
            f":warning: Approval needed: *{_esc(data.get('action', ''))}*",
            f"Risk {_esc(data.get('riskScore', '?'))}/100 ({_esc(data.get('riskCategory', ''))})"
            + (f", from {_quoted(data['sender'], 100)}" if data.get("sender") else ""),
        ]
        if data.get("description"):
            lines.append(f"> {_quoted(data['description'], 500)}")
        lines.append(f"Decide: {link} before {_esc(data.get('expiresAt', ''))}")
        return "\n".join(lines)
    if kind == "approval.warning":
        return (
            f":hourglass: Still waiting: *{_esc(data.get('action', ''))}* "
            f"({link}) expires at {_esc(data.get('expiresAt', ''))}"
        )
    if kind == "approval.escalated":
        need = data.get("approvalsRequired", 1)
        lines = [
            f":rotating_light: Escalated, no decision yet: *{_esc(data.get('action', ''))}*",
            f"Risk {_esc(data.get('riskScore', '?'))}/100 ({_esc(data.get('riskCategory', ''))})"
            + (f", asked by {_quoted(data['requester'], 100)}" if data.get("requester") else "")
            + (f", {_esc(data.get('approvals', 0))} of {_esc(need)} approvals" if need > 1 else ""),
        ]
        if data.get("description"):
            lines.append(f"> {_quoted(data['description'], 500)}")
        lines.append(f"Decide: {link} before {_esc(data.get('expiresAt', ''))}")
        return "\n".join(lines)
    if kind == "approval.vote":
        return (
            f"{link} approved by {_quoted(data.get('by', ''), 100)} "
            f"({_esc(data.get('approvals', '?'))} of {_esc(data.get('approvalsRequired', '?'))})"
        )
    if kind in ("approval.decided", "approval.expired"):
        who = f" by {_quoted(data['decider'], 100)}" if data.get("decider") else ""
        why = f": {_quoted(data['reason'], 300)}" if data.get("reason") else ""
        return f"{link} was {_esc(data.get('decision', ''))}{who}{why}"
    status = f" ({_esc(data['status'])})" if data.get("status") else ""
    return f"{_esc(kind)}{status}, event {_esc(event.get('id', ''))}"


async def post(
    http: aiohttp.ClientSession,
    hook: WebhookSettings,
    event_id: int,
    event_type: str,
    body: bytes,
    attempt: int,
) -> tuple[int | None, str | None]:
    """One attempt: the status it answered (None: no answer), and what went
    wrong (None: a 2xx). Redirects are not followed: a 3xx is a failure."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "jarvisd-webhooks/1",
        "Jarvisd-Event-Id": str(event_id),
        "Jarvisd-Event-Type": event_type,
        "Jarvisd-Attempt": str(attempt),
    }
    if hook.secret:
        headers["Jarvisd-Signature"] = sign(hook.secret, body)
    try:
        async with http.post(hook.url, data=body, headers=headers, allow_redirects=False) as resp:
            if 200 <= resp.status < 300:
                return resp.status, None
            return resp.status, clean(f"HTTP {resp.status} {resp.reason or ''}")
    except TimeoutError:
        return None, f"TimeoutError: no answer within {hook.timeout:g} s"
    except Exception as exc:  # whatever it is, this attempt failed
        return None, clean(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def clean(text: str, limit: int = 300) -> str:
    """An error for the row, the log, the CLI: printable, without URLs (an
    endpoint's URL may hold its secret), at most ``limit`` characters."""
    text = _URL.sub("<url>", text.encode("utf-8", "replace").decode("utf-8", "replace"))
    return "".join(ch if ch.isprintable() else "?" for ch in text).strip()[:limit]
