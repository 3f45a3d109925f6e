"""How ``jarvisd approvals`` shows requests to a person at a terminal: a
table that names people, and one request with everything it carries.

Agents write the action, the description and the parameters: every string
is shown with its control, format and bidirectional characters escaped
(``\\u001b``), so that nothing an agent writes can move the cursor, recolour
the terminal, or reorder what the person reads.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

__all__ = ["age", "detail", "outcome", "safe", "table"]


def safe(value: Any) -> str:
    """``value`` as text with nothing a terminal would act on (Cc, Cf, Zl,
    Zp: escapes, bidi overrides, zero-width marks) left as it is."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable() or c == " "
        else f"\\u{ord(c):04x}"
        if ord(c) <= 0xFFFF
        else f"\\U{ord(c):08x}"
        for c in text
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(iso: str | None) -> datetime | None:
    return None if not iso else datetime.fromisoformat(iso.replace("Z", "+00:00"))


def age(seconds: float) -> str:
    """3 s, 4 min, 2 h, 3 d."""
    s = abs(seconds)
    if s < 60:
        return f"{int(s)} s"
    if s < 3600:
        return f"{int(s // 60)} min"
    if s < 86400:
        return f"{int(s // 3600)} h"
    return f"{int(s // 86400)} d"


def _relative(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    return f"in {age(delta)}" if delta > 0 else f"{age(delta)} ago"


def _stamp(iso: str | None, now: datetime) -> str:
    when = _when(iso)
    if when is None:
        return "-"
    return f"{when.strftime('%Y-%m-%d %H:%M:%S')} UTC ({_relative(when, now)})"


def _who(approval: dict[str, Any]) -> str:
    name = approval.get("requester")
    if name:
        return safe(name)
    rid = approval.get("requesterId")
    return "- (on nobody's behalf)" if rid is None else f"user {rid}"


def _quorum(approval: dict[str, Any]) -> str:
    need = approval.get("approvalsRequired", 1)
    if need <= 1:
        return ""
    return f"{len(approval.get('approvals') or [])}/{need}"


def table(items: list[dict[str, Any]], now: datetime) -> str:
    """One line a request: id, status, risk, action, who asked and from
    where, how old, how long it has left, the approvals of a quorum."""
    if not items:
        return "nothing to show"
    header = ["ID", "STATUS", "RISK", "ACTION", "REQUESTER", "SENDER", "AGE", "EXPIRES", "OK"]
    rows = [header]
    for a in items:
        created = _when(a.get("createdAt"))
        expires = _when(a.get("expiresAt")) if a.get("status") == "pending" else None
        status = a["status"] + ("!" if a.get("escalatedAt") and a["status"] == "pending" else "")
        rows.append(
            [
                str(a["id"]),
                status,
                f"{a['riskCategory']} {a['riskScore']}",
                _cut(safe(a["action"]), 32),
                _cut(safe(a.get("requester") or "-"), 20),
                _cut(safe(a.get("sender") or "-"), 24),
                "-" if created is None else age((now - created).total_seconds()),
                "-" if expires is None else _relative(expires, now),
                _quorum(a) or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if any(a.get("escalatedAt") and a["status"] == "pending" for a in items):
        lines.append("(! escalated: waited past approvals.escalate_after)")
    return "\n".join(lines)


def detail(
    approval: dict[str, Any],
    command: dict[str, Any] | None,
    history: list[dict[str, Any]],
    now: datetime,
) -> str:
    """Everything about one request, for a person deciding it."""
    a = approval
    need, admins = a.get("approvalsRequired", 1), a.get("adminsRequired", 0)
    votes = a.get("approvals") or []
    rule = f" ({safe(a['scoreRule'])})" if a.get("scoreRule") else ""
    lines = [
        f"approval {a['id']}: {a['status'].upper()}, {a['riskCategory']} risk {a['riskScore']}{rule}",
        "",
        f"  action       {safe(a['action'])}",
        f"  description  {safe(a.get('description') or '-')}",
        f"  requester    {_who(a)}",
        f"  sender       {safe(a.get('sender') or '-')}",
    ]
    if command is not None:
        lines.append(
            f"  command      {command['id']} ({command['status']}), requestId "
            f"{safe(command['requestId'])}"
        )
    elif a.get("commandId") is not None:
        lines.append(f"  command      {a['commandId']}")
    lines += [
        f"  created      {_stamp(a.get('createdAt'), now)}",
        f"  expires      {_stamp(a.get('expiresAt'), now)}",
    ]
    if a.get("escalatedAt"):
        lines.append(f"  escalated    {_stamp(a['escalatedAt'], now)}")
    needs = f"{need} approval{'s' if need > 1 else ''}"
    if admins:
        needs += f", {admins} of them by an admin" if need > 1 else ", by an admin"
    lines.append(f"  needs        {needs}")
    for v in votes:
        note = f": {safe(v['reason'])}" if v.get("reason") else ""
        lines.append(
            f"  approved by  {safe(v['by'])}{' (admin)' if v.get('admin') else ''}, "
            f"{_stamp(v.get('at'), now)}{note}"
        )
    if a["status"] != "pending":
        note = f": {safe(a['reason'])}" if a.get("reason") else ""
        lines.append(
            f"  decided      {a['status']} by {safe(a.get('decider') or '-')}, "
            f"{_stamp(a.get('decidedAt'), now)}{note}"
        )
    lines += ["", "parameters"]
    text = json.dumps(a.get("parameters") or {}, indent=2, ensure_ascii=False, sort_keys=True)
    # Split at newlines only: splitlines() would also break at U+2028, U+2029
    # and U+0085 inside a value, making lines the agent chose.
    lines += [f"  {safe(line)}" for line in text.split("\n")]
    lines += ["", "history"]
    for step in history:
        when = _when(step["at"])
        clock = "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%S")
        move = f"{step['from'] or '(new)'} -> {step['to']}"
        by = f" by {safe(step['by'])}" if step.get("by") else ""
        why = f": {safe(step['reason'])}" if step.get("reason") else ""
        lines.append(f"  {clock}  {step['subject']:<8}  {move}{by}{why}")
    if a["status"] == "pending":
        lines += [
            "",
            f"decide: jarvisd approvals approve {a['id']} [--reason TEXT] | "
            f"jarvisd approvals reject {a['id']} --reason TEXT",
        ]
    return "\n".join(lines)


def outcome(decided: dict[str, Any]) -> str:
    """What a decision did: decided, or one approval recorded toward a quorum."""
    if decided["status"] == "pending":
        votes = decided.get("approvals") or []
        need = decided.get("approvalsRequired", 1)
        return (
            f"approval {decided['id']}: your approval is recorded ({len(votes)} of {need}); "
            f"it waits for {need - len(votes)} more"
        )
    who = decided.get("decider") or decided.get("decidedBy") or "?"
    return f"approval {decided['id']} {decided['status']} by {safe(who)}"
