"""The account the embedded servers run as when jarvisd runs as root: a
system account of their own (``jarvisd-embedded``, created when missing),
never a shared one such as ``nobody``, whose other processes would otherwise
reach the servers."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from actors.kernel import FatalActorError

__all__ = ["EMBEDDED_ACCOUNT", "RunAs", "ensure_account"]

# The system account the embedded servers run as when jarvisd runs as root.
EMBEDDED_ACCOUNT = "jarvisd-embedded"
# Accounts shared with other services: a server run as one of them would be
# reachable by every process of that account.
_SHARED_ACCOUNTS = frozenset({"nobody", "daemon", "bin", "sys", "www-data", "nogroup"})


@dataclass(frozen=True, slots=True)
class RunAs:
    uid: int
    gid: int
    name: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    @classmethod
    def current(cls) -> RunAs:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:  # a DynamicUser may have no passwd entry visible
            name = str(uid)
        return cls(uid, os.getegid(), name)

    @classmethod
    def resolve(cls, unprivileged_user: str) -> RunAs:
        """Ourselves, or ``unprivileged_user`` when we are root (the default
        account is created when missing)."""
        if os.geteuid() != 0:
            return cls.current()
        if unprivileged_user in _SHARED_ACCOUNTS:
            raise FatalActorError(
                f"embedded.postgres_user {unprivileged_user!r} is shared with other services, "
                f"whose processes would reach the embedded servers; use an account of their own "
                f"(the default, {EMBEDDED_ACCOUNT!r}, is created when missing)"
            )
        if unprivileged_user == EMBEDDED_ACCOUNT:
            ensure_account(EMBEDDED_ACCOUNT)
        try:
            entry = pwd.getpwnam(unprivileged_user)
        except KeyError:
            raise FatalActorError(
                f"embedded.postgres_user {unprivileged_user!r} does not exist; running as root, "
                "the embedded servers need an unprivileged account of their own"
            ) from None
        if entry.pw_uid == 0:
            raise FatalActorError("embedded.postgres_user must not be root")
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    def subprocess_kwargs(self) -> dict[str, Any]:
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def ensure_account(name: str) -> bool:
    """Create the system account ``name`` (no login, no home) if it does not
    exist; True when it was created."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    tool = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if os.path.exists(p)), None
    )
    if tool is None:
        raise FatalActorError(
            f"the system account {name!r} for the embedded servers is missing and there is no "
            f"useradd to create it; create it (a system account without login) or set "
            f"embedded.postgres_user to one"
        )
    done = subprocess.run(
        [
            tool,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "jarvisd embedded PostgreSQL and Valkey",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 and done.returncode != 9:  # 9: it exists (a race)
        raise FatalActorError(f"cannot create the system account {name!r}: {done.stderr.strip()}")
    return done.returncode == 0
