"""``[[webhooks]]``: HTTP endpoints that get every matching event from the
outbox, signed, in order, at least once (DESIGN §5, "Events").

Each entry names an endpoint. Its secret comes from ``secret_file`` (a path,
relative to the config file's folder) or, under systemd, from the credential
``webhook-<name>``; a secret written into the config file itself is refused.
Webhooks are configured in the file only (no environment variables)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from config.explain import explain, split_path

__all__ = ["WebhookSettings", "load_webhooks", "secret_free", "shown_url"]

WebhookName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
# An event type or a glob over them: "approval.requested", "approval.*", "*".
TypeGlob = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[a-z.*?]+$")]


class WebhookSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    # Its name in /stats, /metrics and `jarvisd webhooks`: lowercase letters,
    # digits, - and _. A new name starts with the events committed after it.
    name: WebhookName
    url: Annotated[str, msgspec.Meta(max_length=2000)]
    # The event types it gets, or globs over them.
    types: Annotated[tuple[TypeGlob, ...], msgspec.Meta(min_length=1, max_length=50)] = ("*",)
    # A file holding the signing secret (required for format "jarvisd").
    secret_file: str | None = None
    # "jarvisd": the event as JSON, signed. "slack": a Slack-compatible
    # incoming webhook ({"text": …}), approval requests with a link.
    format: Literal["jarvisd", "slack"] = "jarvisd"
    # "slack": the base of the link to a request, e.g. "https://jarvis.example";
    # unset: the API's own address.
    link_base: str | None = None
    # Failed attempts at one event before the endpoint is marked dead (it
    # stops, holding its place, until `jarvisd webhooks retry`).
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    # Seconds an attempt may take, the first pause after a failure, and the
    # longest pause (each doubles, with jitter).
    timeout: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    backoff: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    backoff_max: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    # Filled from secret_file or the credential: never written in the file.
    secret: str = ""


Issue = Callable[[str, str], None]  # (key, problem)


def load_webhooks(
    raw: Any, base: Path, env: Mapping[str, str], issue: Issue
) -> tuple[WebhookSettings, ...]:
    """Check the ``[[webhooks]]`` array of tables and read each secret."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        issue("webhooks", "expected an array of tables: [[webhooks]]")
        return ()
    found: list[WebhookSettings] = []
    for i, table in enumerate(raw):
        where = f"webhooks[{i}]"
        if "secret" in table:
            issue(f"{where}.secret", "put the secret in a file and name it with secret_file")
            continue
        try:
            hook = msgspec.convert(table, WebhookSettings)
        except msgspec.ValidationError as exc:
            problem, inside = split_path(exc)
            issue(f"{where}{inside}", explain(problem))
            continue
        where = f"webhooks.{hook.name}"
        if any(h.name == hook.name for h in found):
            issue(f"{where}.name", "two webhooks have this name")
            continue
        checked = _check(hook, where, base, env, issue)
        if checked is not None:
            found.append(checked)
    return tuple(found)


def _check(
    hook: WebhookSettings, where: str, base: Path, env: Mapping[str, str], issue: Issue
) -> WebhookSettings | None:
    ok = True
    for key, url in (("url", hook.url), ("link_base", hook.link_base)):
        problem = None if url is None else _url_problem(url)
        if problem:
            issue(f"{where}.{key}", problem)
            ok = False
    if hook.backoff > hook.backoff_max:
        issue(f"{where}.backoff", f"must be <= backoff_max ({hook.backoff_max})")
        ok = False
    secret = ""
    if hook.secret_file:
        path = Path(hook.secret_file)
        path = path if path.is_absolute() else (base / path).resolve()
        secret = _read(path, f"{where}.secret_file", issue)
        ok = ok and bool(secret)
        hook = msgspec.structs.replace(hook, secret_file=str(path))
    elif env.get("CREDENTIALS_DIRECTORY"):
        cred = Path(env["CREDENTIALS_DIRECTORY"]) / f"webhook-{hook.name}"
        if cred.exists():
            secret = _read(cred, f"{where} (credential webhook-{hook.name})", issue)
            ok = ok and bool(secret)
    if ok and not secret and hook.format == "jarvisd":
        issue(
            f"{where}.secret_file",
            "required: the file holding the secret its deliveries are signed with "
            f"(or the credential webhook-{hook.name})",
        )
        ok = False
    return msgspec.structs.replace(hook, secret=secret) if ok else None


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an endpoint, in words; None when it can."""
    expected = "expected an http:// or https:// URL with a host"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _port = parts.port  # a port out of range is a ValueError
    except ValueError as exc:
        return f"{expected}: {exc}"
    if parts.scheme not in ("http", "https") or not host:
        return expected
    try:
        host.encode("idna")  # an empty or over-long label, a stray dot
    except UnicodeError:
        return f"{host[:80]!r} is not a valid host name"
    return None


def _read(path: Path, key: str, issue: Issue) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        issue(key, f"cannot read {path}: {exc.strerror or exc}")
        return ""
    except UnicodeDecodeError:
        issue(key, f"{path} is not UTF-8 text (write the secret as text, e.g. hex)")
        return ""
    if not text:
        issue(key, f"{path} is empty")
    elif len(text) < 16:
        issue(key, f"{path} holds {len(text)} characters; a secret needs at least 16")
        return ""
    return text


def secret_free(hooks: tuple[WebhookSettings, ...]) -> list[dict[str, Any]]:
    """The webhooks as plain data for display: secrets and URLs' credentials hidden."""
    shown: list[dict[str, Any]] = []
    for hook in hooks:
        data: dict[str, Any] = msgspec.to_builtins(hook)
        data["secret"] = "***" if hook.secret else ""
        data["url"] = shown_url(hook.url)
        shown.append(data)
    return shown


def shown_url(url: str) -> str:
    """An endpoint's URL as it is shown: scheme, host and port only. Its
    user, password, path and query may be its secret (an incoming webhook's
    path is)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    rest = "/…" if (parts.path.strip("/") or parts.query or parts.fragment) else ""
    return f"{parts.scheme}://{host}{rest}"
