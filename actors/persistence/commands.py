"""Commands: made over HTTP or ingested from the bus, read, and moved along
by status reports. Each change is committed, then announced (``actors.events``)."""

from __future__ import annotations

from typing import Any

from actors import events
from actors.data import repo
from actors.data.model import (
    Command,
    CommandCreate,
    CommandStatusUpdate,
    Page,
    risk_category,
)
from actors.data.repo import Ingested
from actors.data.repo.common import JsonPage
from actors.persistence.base import Count, PgMessage, Store, rate, room

__all__ = [
    "CreateCommand",
    "GetCommand",
    "IngestCommands",
    "ListCommands",
    "ReportCommand",
    "UpdateCommandStatus",
    "commands",
]

commands = room("commands")


class CreateCommand(PgMessage[tuple[Command, bool]], frozen=True):
    """Replies (the command, whether it is new): a repeated requestId of the
    same sender answers the command it made before."""

    new: CommandCreate
    user_id: int | None
    created_by: int | None = None
    sender: str = "inbox"  # whose requestId namespace (Command.sender)


@commands.handles(CreateCommand)
async def create_command(db: Store, msg: CreateCommand) -> tuple[Command, bool]:
    policy = db.approvals
    async with db.writing() as w:
        command, created = await repo.create_command(
            w.conn,
            msg.new,
            msg.user_id,
            created_by=msg.created_by,
            sender=msg.sender,
            threshold=policy.threshold,
            expiry=policy.expiry,
            rating=rate(policy, msg.new.action, msg.new.risk_score),
        )
        if created:
            w.announce([events.command_created(command)])
            if command.approval_id is not None:
                approval = await repo.get_approval(w.conn, command.approval_id)
                ref = (command.request_id, command.sender)
                w.announce([events.approval_requested(approval, ref, command.user_id)])
    return command, created


class GetCommand(PgMessage[Command], frozen=True):
    command_id: int


@commands.handles(GetCommand)
async def get_command(db: Store, msg: GetCommand) -> Command:
    async with db.pool().acquire() as conn:
        return await repo.get_command(conn, msg.command_id)


class ListCommands(PgMessage[Page[Command] | JsonPage], frozen=True):
    query: Any  # ListQuery, parsed at the edge
    count: Count = None
    as_json: bool = False


@commands.handles(ListCommands)
async def list_commands(db: Store, msg: ListCommands) -> Page[Command] | JsonPage:
    async with db.pool().acquire() as conn:
        return await repo.list_commands(conn, msg.query, msg.count, as_json=msg.as_json)


class UpdateCommandStatus(PgMessage[Command], frozen=True):
    """A status report over HTTP, naming the command by id."""

    command_id: int
    change: CommandStatusUpdate
    actor_id: int | None
    actor_name: str = "jarvisd"
    sent_by: int | None = None  # set: only a command this user sent (Forbidden otherwise)


@commands.handles(UpdateCommandStatus)
async def update_command_status(db: Store, msg: UpdateCommandStatus) -> Command:
    if msg.sent_by is not None:
        async with db.pool().acquire() as conn:
            row = await conn.fetchrow(
                "SELECT created_by FROM commands WHERE id = $1", msg.command_id
            )
        if row is None:
            raise repo.NotFound(f"no command {msg.command_id}")
        if row["created_by"] != msg.sent_by:
            raise repo.Forbidden("an agent reports only on the commands it sent")
    return await _report(db, msg.command_id, None, msg.change, msg.actor_id, None, msg.actor_name)


class ReportCommand(PgMessage[Command], frozen=True):
    """A status report from the bus, naming the command by id or by the
    requestId it was created with (agents know the latter): only the
    sender's own commands are found."""

    change: CommandStatusUpdate
    command_id: int | None = None
    request_id: str | None = None
    duration_ms: int | None = None  # as measured by the agent
    actor_name: str = "bus"  # who reported, for the audit trail
    actor_id: int | None = None  # the reporting agent's user id, if it has one
    sender: str = "inbox"


@commands.handles(ReportCommand)
async def report_command(db: Store, msg: ReportCommand) -> Command:
    return await _report(
        db,
        msg.command_id,
        (msg.sender, msg.request_id),
        msg.change,
        msg.actor_id,
        msg.duration_ms,
        msg.actor_name,
    )


async def _report(
    db: Store,
    command_id: int | None,
    sender_ref: tuple[str, str | None] | None,
    change: CommandStatusUpdate,
    actor_id: int | None,
    duration_ms: int | None,
    actor_name: str,
) -> Command:
    async with db.writing() as w:
        if sender_ref is not None:
            sender, request_id = sender_ref
            command_id = await repo.command_id_of(w.conn, sender, request_id, command_id, actor_id)
        assert command_id is not None
        command, previous = await repo.update_command_status(
            w.conn, command_id, change, actor_id, duration_ms=duration_ms, actor_name=actor_name
        )
        if previous is not None:
            w.announce([events.command_updated(command, previous)])
            if previous == "awaiting_approval" and command.approval_id is not None:
                cancelled = await repo.get_approval(w.conn, command.approval_id)
                ref = (command.request_id, command.sender)
                w.announce([events.approval_decided(cancelled, ref)])
    return command


class IngestCommands(PgMessage[list[Ingested]], frozen=True):
    """The batched ingest path (agent bus): one Ingested per row. A row: the
    command, on whose behalf, who sent it (user id, sender)."""

    rows: tuple[tuple[CommandCreate, int | None, int | None, str], ...]


@commands.handles(IngestCommands)
async def ingest_commands(db: Store, msg: IngestCommands) -> list[Ingested]:
    policy = db.approvals
    async with db.writing() as w:
        results = await repo.ingest_commands(
            w.conn,
            list(msg.rows),
            threshold=policy.threshold,
            expiry=policy.expiry,
            ratings=[rate(policy, row[0].action, row[0].risk_score) for row in msg.rows],
        )
        for (new, _user, _by, sender), done in zip(msg.rows, results, strict=True):
            if done.outcome == "created":
                w.announce(
                    events.command_ingested(done, new, sender, risk_category(done.risk_score))
                )
    return results
