"""SQL for users, tokens, commands and approvals (DESIGN §4), one module per
entity. Every status change is one conditional ``UPDATE … WHERE status = …
RETURNING`` with its audit event in the same transaction: a repeated event is
a no-op, a conflicting one raises Conflict, nothing is applied twice.
"""

from actors.data.repo.agents import Agent, create_agent, list_agents, revoke_agent
from actors.data.repo.approvals import (
    APPROVALS,
    Step,
    create_approval,
    decide_approval,
    get_approval,
    history,
    list_approvals,
)
from actors.data.repo.commands import (
    COMMANDS,
    command_id_of,
    create_command,
    get_command,
    list_commands,
    update_command_status,
)
from actors.data.repo.common import (
    Conflict,
    Expired,
    Forbidden,
    Invalid,
    NotFound,
    init_connection,
)
from actors.data.repo.ingest import Ingested, ingest_commands
from actors.data.repo.sweeps import escalate_due, expire_due, pending_ages, warn_due
from actors.data.repo.users import (
    USERS,
    authenticate_token,
    create_token,
    create_user,
    delete_user,
    get_user,
    get_user_by_name,
    has_admin,
    list_tokens,
    list_users,
    password_hash_of,
    principal_of,
    record_login,
    revoke_token,
    update_user,
)

__all__ = [
    "APPROVALS",
    "COMMANDS",
    "USERS",
    "Agent",
    "Conflict",
    "Expired",
    "Forbidden",
    "Ingested",
    "Invalid",
    "NotFound",
    "Step",
    "authenticate_token",
    "command_id_of",
    "create_agent",
    "create_approval",
    "create_command",
    "create_token",
    "create_user",
    "decide_approval",
    "delete_user",
    "escalate_due",
    "expire_due",
    "get_approval",
    "get_command",
    "get_user",
    "get_user_by_name",
    "has_admin",
    "history",
    "ingest_commands",
    "init_connection",
    "list_agents",
    "list_approvals",
    "list_commands",
    "list_tokens",
    "list_users",
    "password_hash_of",
    "pending_ages",
    "principal_of",
    "record_login",
    "revoke_agent",
    "revoke_token",
    "update_command_status",
    "update_user",
    "warn_due",
]
