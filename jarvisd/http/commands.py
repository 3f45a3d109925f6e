"""Commands and approval requests (DESIGN §4, §6, §8).

| route | admin | approver | user | agent |
|---|---|---|---|---|
| POST /commands | for anyone | for anyone | for self | for anyone |
| GET /commands, /commands/{id} | all | all | own | all |
| PUT /commands/{id} (running, succeeded, failed, cancelled) | yes | - | - | the commands it sent |
| POST /approvals (standalone) | yes | yes | yes | yes |
| GET /approvals, /approvals/{id} | all | all | own | all |
| GET /approvals/{id}/history | all | all | own | all |
| approve, reject (reason required) | yes | not own; not where the quorum needs an admin | - | - |
| cancel | any | own | own | own |

"Own" is what the caller asked for or created. Another user's command or
approval is "not found" to a user, never "forbidden": a user cannot learn
which ids exist. A status report never decides an approval: only approve and
reject do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from actors import persistence as m
from actors.approvals import Decided, Watch, WatchersFull
from actors.data.listing import parse_integer
from actors.data.model import (
    Approval,
    ApprovalCreate,
    Command,
    CommandCreate,
    CommandStatusUpdate,
    Decision,
    Page,
    Principal,
    Rejection,
)
from actors.data.repo import APPROVALS, COMMANDS, Step
from actors.kernel import ActorError
from jarvisd.http.auth import forbidden, require
from jarvisd.http.common import (
    RouteDoc,
    actors_of,
    body,
    list_query,
    listed,
    optional_body,
    path_id,
    query_param,
    reply,
)
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import RUNTIME, SHARES, release_admission
from jarvisd.http.shares import Full, principal_key

__all__ = ["ROUTES"]


def _sees_all(who: Principal) -> bool:
    return who.role in ("admin", "approver", "agent")


def _owns(who: Principal, *ids: int | None) -> bool:
    return who.user_id is not None and who.user_id in ids


# -- commands ---------------------------------------------------------------------------------------
async def _cached_list(
    request: web.Request,
    who: Principal,
    spec: Any,
    make: Callable[..., Any],
    forced_column: str,
    *,
    as_json: bool,
) -> web.Response:
    """A list answer, from the list cache when the same caller scope asked the
    same query since the last change; ``as_json``: the items written as JSON
    by PostgreSQL (rows with much context to gather), else read as rows and
    encoded here (plain rows: cheaper for the database and in all)."""
    forced = None if _sees_all(who) else {forced_column: who.user_id}
    lq, count = list_query(request, spec, forced)
    lists = request.app[RUNTIME].lists
    scope = None if forced is None else who.user_id
    key = (request.path, scope, request.query_string, count or "")
    hit = lists.get(key)
    if hit is not None:
        body, headers = hit
        return web.Response(body=body, content_type="application/json", headers=headers)
    generation = lists.generation
    page = await actors_of(request).persistence.ask(make(query=lq, count=count, as_json=as_json))
    response = listed(page, count)
    assert isinstance(response.body, bytes)
    headers = {"Preference-Applied": f"count={count}"} if count else None
    lists.put(key, response.body, headers, generation)
    return response


def _changed(request: web.Request) -> None:
    """A command or an approval changed here: no list answer from before it."""
    request.app[RUNTIME].lists.changed()


@require()
async def list_commands(request: web.Request, who: Principal) -> web.Response:
    return await _cached_list(request, who, COMMANDS, m.ListCommands, "user_id", as_json=False)


async def _visible_command(request: web.Request, who: Principal, command_id: int) -> Command:
    command: Command = await actors_of(request).persistence.ask(m.GetCommand(command_id=command_id))
    if not _sees_all(who) and not _owns(who, command.user_id, command.created_by):
        raise ProblemError(404, "Not found", f"no command {command_id}")
    return command


@require()
async def get_command(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    return reply(await _visible_command(request, who, path_id(request)))


def _not_local(who: Principal) -> None:
    if who.user_id is None:
        raise forbidden(
            "the local admin decides requests; commands and requests are made with a "
            "user's or an agent's token"
        )


@require()
async def create_command(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    _not_local(who)
    new = await body(request, CommandCreate)
    user_id = new.user_id
    if who.role == "user":
        if user_id is not None and user_id != who.user_id:
            raise forbidden("a user creates commands only for themselves")
        user_id = who.user_id
    elif user_id is None:
        user_id = who.user_id
    command, created = await actors_of(request).persistence.ask(
        m.CreateCommand(
            new=new, user_id=user_id, created_by=who.user_id, sender=f"user:{who.name}"
        ),
    )
    _changed(request)
    return reply(command, 201 if created else 200, {"Location": f"/commands/{command.id}"})


@require("admin", "agent")
async def update_command(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    change = await body(request, CommandStatusUpdate)
    msg = m.UpdateCommandStatus(
        command_id=path_id(request),
        change=change,
        actor_id=who.user_id,
        actor_name=who.name,
        # An agent speaks only for itself: it reports on the commands it sent.
        sent_by=who.user_id if who.role == "agent" else None,
    )
    updated = await actors_of(request).persistence.ask(msg)
    _changed(request)
    return reply(updated)


# -- approvals ----------------------------------------------------------------------------------------
@require()
async def list_approvals(request: web.Request, who: Principal) -> web.Response:
    return await _cached_list(
        request, who, APPROVALS, m.ListApprovals, "requester_id", as_json=True
    )


async def _visible_approval(request: web.Request, who: Principal, approval_id: int) -> Approval:
    approval: Approval = await actors_of(request).persistence.ask(
        m.GetApproval(approval_id=approval_id)
    )
    if not _sees_all(who) and not _owns(who, approval.requester_id, approval.created_by):
        raise ProblemError(404, "Not found", f"no approval request {approval_id}")
    return approval


MAX_WAIT = 55
WAIT = (
    "wait",
    {"type": "integer", "minimum": 0, "maximum": MAX_WAIT},
    "seconds to wait while the request is pending (a long-poll; at most 55)",
)


@require()
async def get_approval(request: web.Request, who: Principal) -> web.Response:
    """The request; with ``?wait=N``, answered as soon as it leaves pending,
    or after N seconds with it still pending. Safe to repeat."""
    reject_unknown_params(request, ("wait",))
    approval_id = path_id(request)
    raw = query_param(request, "wait")
    wait = 0 if raw is None else parse_integer(raw)
    if wait is None or not 0 <= wait <= MAX_WAIT:
        raise ProblemError(400, "Bad request", f"wait is a number of seconds from 0 to {MAX_WAIT}")
    approval = await _visible_approval(request, who, approval_id)
    if approval.status != "pending" or wait == 0:
        return reply(approval)
    settings = request.app[RUNTIME].settings.approvals
    shares = request.app[SHARES]
    try:
        with shares.hold(
            shares.waiters,
            principal_key(who),
            settings.max_waiters_per_principal,
            "approvals.max_waiters_per_principal",
        ):
            return await _long_poll(request, who, approval, wait)
    except Full:
        # Past the caller's share: the state now, at once (a long-poll may
        # always answer early; the caller asks again).
        return reply(approval, headers={"Jarvisd-Wait": "declined"})


async def _long_poll(
    request: web.Request, who: Principal, approval: Approval, wait: int
) -> web.Response:
    approval_id = approval.id
    deadline = asyncio.get_running_loop().time() + wait
    release_admission(request)  # waiting: capped by approvals.max_waiters instead
    approvals = request.app[RUNTIME].approvals
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return reply(approval)
        try:
            woken = await approvals.ask(Watch(approval_id), timeout=5)
        except WatchersFull:
            # The daemon's waiters are all taken: the state now, at once.
            return reply(approval, headers={"Jarvisd-Wait": "declined"})
        except ActorError:
            if approval.status == "pending" and not request.app[RUNTIME].draining:
                raise
            return reply(approval)
        try:
            # Read after watching: a decision between the two is not missed.
            approval = await _visible_approval(request, who, approval_id)
            if approval.status != "pending":
                return reply(approval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(woken), remaining)
        finally:
            woken.cancel()
        approval = await _visible_approval(request, who, approval_id)
        if approval.status != "pending" or request.app[RUNTIME].draining:
            return reply(approval)


class History(msgspec.Struct, frozen=True):
    """A request's audit trail and its command's, oldest first."""

    items: list[Step]


@require()
async def approval_history(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    approval_id = path_id(request)
    await _visible_approval(request, who, approval_id)
    steps = await actors_of(request).persistence.ask(m.ApprovalHistory(approval_id=approval_id))
    return reply(History(items=steps))


@require()
async def create_approval(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    _not_local(who)
    new = await body(request, ApprovalCreate)
    approval = await actors_of(request).persistence.ask(
        m.CreateApproval(new=new, requester_id=who.user_id)
    )
    _changed(request)
    return reply(approval, 201, {"Location": f"/approvals/{approval.id}"})


def _decide(
    decision: str, shape: type[Any]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    @require()
    async def decide(request: web.Request, who: Principal) -> web.Response:
        reject_unknown_params(request, ())
        approval_id = path_id(request)
        if shape is Rejection:
            reason: str | None = (await body(request, Rejection)).reason
        else:
            reason = (await optional_body(request, Decision, Decision())).reason
        await _visible_approval(request, who, approval_id)
        msg = m.DecideApproval(
            approval_id=approval_id,
            decision=decision,  # type: ignore[arg-type]
            who=who,
            reason=reason,
        )
        try:
            decided = await actors_of(request).persistence.ask(msg)
        finally:
            _changed(request)  # an expiry found on the way is a change too
        if decided.status != "pending":
            # This daemon's waiters hear of it now, not after Redis's round trip.
            with contextlib.suppress(ActorError):
                request.app[RUNTIME].approvals.tell_nowait(Decided(decided.id))
        return reply(decided)

    decide.__name__ = f"{decision}_approval"
    return decide


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "GET",
        "/commands",
        list_commands,
        "List commands",
        response=Page[Command],
        list_spec=COMMANDS,
    ),
    RouteDoc(
        "POST",
        "/commands",
        create_command,
        "Create a command (idempotent on requestId)",
        CommandCreate,
        Command,
        201,
    ),
    RouteDoc("GET", "/commands/{id}", get_command, "Read a command", response=Command),
    RouteDoc(
        "PUT",
        "/commands/{id}",
        update_command,
        "Report a command's progress: running, succeeded, failed or cancelled",
        CommandStatusUpdate,
        Command,
    ),
    RouteDoc(
        "GET",
        "/approvals",
        list_approvals,
        "List approval requests",
        response=Page[Approval],
        list_spec=APPROVALS,
    ),
    RouteDoc(
        "POST",
        "/approvals",
        create_approval,
        "Request a standalone approval",
        ApprovalCreate,
        Approval,
        201,
    ),
    RouteDoc(
        "GET",
        "/approvals/{id}",
        get_approval,
        "Read an approval request (?wait=N: once it is decided, or after N seconds)",
        response=Approval,
        query=(WAIT,),
    ),
    RouteDoc(
        "GET",
        "/approvals/{id}/history",
        approval_history,
        "The request's audit trail and its command's, oldest first",
        response=History,
    ),
    RouteDoc(
        "PUT",
        "/approvals/{id}/approve",
        _decide("approved", Decision),
        "Approve",
        Decision,
        Approval,
        body_required=False,
    ),
    RouteDoc(
        "PUT",
        "/approvals/{id}/reject",
        _decide("rejected", Rejection),
        "Reject (a reason is required)",
        Rejection,
        Approval,
    ),
    RouteDoc(
        "PUT",
        "/approvals/{id}/cancel",
        _decide("cancelled", Decision),
        "Cancel",
        Decision,
        Approval,
        body_required=False,
    ),
]
