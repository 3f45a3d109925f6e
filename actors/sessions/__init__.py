"""User sessions in Redis (DESIGN §7): the store (``actor``), login sessions
and the failed-login throttle (``logins``), the messages and references
(``messages``), the signatures of login records (``signing``)."""

from actors.sessions.actor import Sessions, ref_of, user_tag
from actors.sessions.logins import LoginAttempt, LoginMessage, Logins, LoginsRef, LoginSucceeded
from actors.sessions.messages import (
    Session,
    SessionConflict,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionKind,
    SessionList,
    SessionMessage,
    SessionNotFound,
    SessionRevokeAll,
    SessionRotate,
    SessionsRef,
    SessionsUnavailable,
    SessionUpdate,
)

__all__ = [
    "LoginAttempt",
    "LoginMessage",
    "LoginSucceeded",
    "Logins",
    "LoginsRef",
    "Session",
    "SessionConflict",
    "SessionCreate",
    "SessionDelete",
    "SessionGet",
    "SessionKind",
    "SessionList",
    "SessionMessage",
    "SessionNotFound",
    "SessionRevokeAll",
    "SessionRotate",
    "SessionUpdate",
    "Sessions",
    "SessionsRef",
    "SessionsUnavailable",
    "ref_of",
    "user_tag",
]
