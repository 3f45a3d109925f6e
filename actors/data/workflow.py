"""Handlers of the command and approval messages, mixed into the persistence
actor: each state change is committed, then announced (``data/events.py``).

Announcing never waits and never fails the change: events are notifications
(the state is in PostgreSQL), handed to the events sink without blocking; one
that cannot be handed over is counted as dropped.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from actors.data import events, repo
from actors.data import messages as m
from actors.data.model import Approval, Command, risk_category
from actors.data.repo import Expired, Ingested
from actors.envelope import Event, EventKind, event
from actors.kernel import handles
from config import ApprovalSettings

__all__ = ["WorkflowHandlers"]


class WorkflowHandlers:
    """Requires ``self._pool()``, ``self.approvals`` and ``self.announce()`` from the actor."""

    approvals: ApprovalSettings

    def _pool(self) -> Any:  # persistence.GuardedPool
        raise NotImplementedError

    def announce(self, published: list[tuple[EventKind, Event]]) -> None:
        raise NotImplementedError

    # -- commands ---------------------------------------------------------------------------
    @handles(m.CreateCommand)
    async def _create_command(self, msg: m.CreateCommand) -> tuple[Command, bool]:
        async with self._pool().acquire() as conn:
            command, created = await repo.create_command(
                conn,
                msg.new,
                msg.user_id,
                created_by=msg.created_by,
                sender=msg.sender,
                threshold=self.approvals.threshold,
                expiry=self.approvals.expiry,
                policy_score=self.approvals.score(msg.new.action),
            )
            approval = None
            if created and command.approval_id is not None:
                approval = await repo.get_approval(conn, command.approval_id)
        if created:
            out = [events.command_created(command)]
            if approval is not None:
                out.append(
                    events.approval_requested(
                        approval, (command.request_id, command.sender), command.user_id
                    )
                )
            self.announce(out)
        return command, created

    @handles(m.GetCommand)
    async def _get_command(self, msg: m.GetCommand) -> Command:
        async with self._pool().acquire() as conn:
            return await repo.get_command(conn, msg.command_id)

    @handles(m.ListCommands)
    async def _list_commands(self, msg: m.ListCommands) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_commands(conn, msg.query, msg.count, as_json=msg.as_json)

    @handles(m.UpdateCommandStatus)
    async def _update_command_status(self, msg: m.UpdateCommandStatus) -> Command:
        if msg.sent_by is not None:
            async with self._pool().acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT created_by FROM commands WHERE id = $1", msg.command_id
                )
            if row is None:
                raise repo.NotFound(f"no command {msg.command_id}")
            if row["created_by"] != msg.sent_by:
                raise repo.Forbidden("an agent reports only on the commands it sent")
        return await self._report(
            msg.command_id, None, msg.change, msg.actor_id, None, msg.actor_name
        )

    @handles(m.ReportCommand)
    async def _report_command(self, msg: m.ReportCommand) -> Command:
        """A report from the bus: only its sender's own command is found."""
        return await self._report(
            msg.command_id,
            (msg.sender, msg.request_id),
            msg.change,
            msg.actor_id,
            msg.duration_ms,
            msg.actor_name,
        )

    async def _report(
        self,
        command_id: int | None,
        sender_ref: tuple[str, str | None] | None,
        change: Any,
        actor_id: int | None,
        duration_ms: int | None,
        actor_name: str,
    ) -> Command:
        async with self._pool().acquire() as conn:
            if sender_ref is not None:
                sender, request_id = sender_ref
                command_id = await repo.command_id_of(
                    conn, sender, request_id, command_id, actor_id
                )
            assert command_id is not None
            command, previous = await repo.update_command_status(
                conn, command_id, change, actor_id, duration_ms=duration_ms, actor_name=actor_name
            )
            cancelled = None
            if previous == "awaiting_approval" and command.approval_id is not None:
                cancelled = await repo.get_approval(conn, command.approval_id)
        if previous is not None:
            out = [events.command_updated(command, previous)]
            if cancelled is not None:
                out.append(
                    events.approval_decided(
                        cancelled, (command.request_id, command.sender), command.user_id
                    )
                )
            self.announce(out)
        return command

    @handles(m.IngestCommands)
    async def _ingest_commands(self, msg: m.IngestCommands) -> list[Ingested]:
        async with self._pool().acquire() as conn:
            results = await repo.ingest_commands(
                conn,
                list(msg.rows),
                threshold=self.approvals.threshold,
                expiry=self.approvals.expiry,
                policy_scores=[self.approvals.score(row[0].action) for row in msg.rows],
            )
        out: list[tuple[EventKind, Event]] = []
        for (new, _user, _by, sender), done in zip(msg.rows, results, strict=True):
            if done.outcome != "created":
                continue
            category = risk_category(done.risk_score)
            out.append(
                event(
                    "commands",
                    "command.created",
                    done.user_id,
                    commandId=done.command_id,
                    requestId=done.request_id,
                    sender=sender,
                    status=done.status,
                    action=new.action,
                    type=new.type,
                    source=new.source or None,
                    riskScore=done.risk_score,
                    riskCategory=category,
                    approvalId=done.approval_id,
                )
            )
            if done.approval_id is not None:
                out.append(
                    event(
                        "approvals",
                        "approval.requested",
                        done.user_id,
                        approvalId=done.approval_id,
                        commandId=done.command_id,
                        requestId=done.request_id,
                        sender=sender,
                        action=new.action,
                        description=new.description or None,
                        riskScore=done.risk_score,
                        riskCategory=category,
                    )
                )
        if out:
            self.announce(out)
        return results

    # -- approvals ------------------------------------------------------------------------------
    @handles(m.CreateApproval)
    async def _create_approval(self, msg: m.CreateApproval) -> Approval:
        expires_in = min(msg.new.expires_in or self.approvals.expiry, self.approvals.max_expiry)
        score = max(self.approvals.score(msg.new.action), msg.new.risk_score)
        async with self._pool().acquire() as conn:
            approval = await repo.create_approval(
                conn, msg.new, msg.requester_id, expires_in=expires_in, score=score
            )
        self.announce([events.approval_requested(approval, None, approval.requester_id)])
        return approval

    @handles(m.GetApproval)
    async def _get_approval(self, msg: m.GetApproval) -> Approval:
        async with self._pool().acquire() as conn:
            return await repo.get_approval(conn, msg.approval_id)

    @handles(m.ListApprovals)
    async def _list_approvals(self, msg: m.ListApprovals) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_approvals(conn, msg.query, msg.count, as_json=msg.as_json)

    @handles(m.DecideApproval)
    async def _decide_approval(self, msg: m.DecideApproval) -> Approval:
        async with self._pool().acquire() as conn:
            try:
                approval = await repo.decide_approval(
                    conn, msg.approval_id, msg.decision, msg.who, msg.reason
                )
            except Expired as exc:
                await self._announce_decision(conn, exc.current)
                raise
            await self._announce_decision(conn, approval)
        return approval

    async def _announce_decision(self, conn: asyncpg.Connection, approval: Approval) -> None:
        command = None
        if approval.command_id is not None:
            try:
                command = await repo.get_command(conn, approval.command_id)
            except repo.NotFound:
                command = None
        ref = (command.request_id, command.sender) if command is not None else None
        out = [events.approval_decided(approval, ref, approval.requester_id)]
        if command is not None and command.status == approval.status:
            out.append(events.command_decided(command))
        self.announce(out)
