"""The ``jarvisd`` command line (DESIGN §9, §13).

Each command is a sync function around an async core, so tests can call the
cores directly; ``main`` returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jarvisd import __version__
from jarvisd.cli_common import NoConfig, Unreachable, load, reach, redis_url, with_database
from jarvisd.cli_help import EXIT_CODES, Commands, Parser, command_of, finish

if TYPE_CHECKING:
    from config import ConfigError, LoadedConfig

# The libraries a command needs are imported by that command: `jarvisd
# version`, `--help` and the calls to the daemon start in a tenth of a second.

EXIT_CONFIG = 2


def _print_config_errors(err: ConfigError) -> None:
    print(f"jarvisd: invalid configuration ({len(err.issues)} problem(s)):", file=sys.stderr)
    for issue in err.issues:
        print(f"  {issue}", file=sys.stderr)


# -- run -------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from jarvisd.logs import configure

    loaded = load(args)
    s = loaded.settings
    configure(s.daemon.log_level, s.daemon.log_format)
    from jarvisd.daemon import Daemon  # the daemon pulls in aiohttp; other commands need not
    from jarvisd.systemd import listen_fds

    async def main() -> int:
        activated = listen_fds()
        if activated:
            structlog.get_logger("jarvisd").bind(actor="daemon").info(
                "socket_activation", sockets=[f"{a.name}={a.description}" for a in activated]
            )
        daemon = Daemon(
            loaded,
            sockets=[a.sock for a in activated],
            config_arg=Path(args.config) if args.config else None,
        )
        return await daemon.run()

    import asyncio

    return asyncio.run(main())


# -- check-config ----------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = load(args)
    source = loaded.path or "defaults and environment"
    from config import redacted, to_toml

    print(f"# effective configuration from {source} (secrets redacted)")
    print(to_toml(redacted(loaded.settings)), end="")
    return 0


# -- migrate ---------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncpg

    from actors import migrate as migrations
    from jarvisd.logs import configure

    loaded = load(args)
    configure("warning", "console" if sys.stderr.isatty() else "json", stream=sys.stderr)

    async def work(conn: Any) -> Any:
        if args.status:
            return await migrations.status(conn)
        return await migrations.migrate(conn)

    try:
        import asyncio

        result = asyncio.run(with_database(loaded, work))
    except migrations.MigrationError as exc:
        print(f"jarvisd migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"jarvisd migrate: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    if args.status:
        for name in result["applied"]:
            print(f"applied  {name}")
        for name in result["pending"]:
            print(f"pending  {name}")
    elif result:
        for name in result:
            print(f"applied {name}")
    else:
        print("up to date")
    return 0


# -- health ----------------------------------------------------------------------
async def probe_ready(loaded: LoadedConfig, timeout: float = 5.0) -> tuple[int, str]:
    """GET /health/ready where the daemon listens (its Unix socket when there is one)."""
    import aiohttp

    from jarvisd.cli_common import client_session, daemon_endpoint

    socket_path, base, _headers = daemon_endpoint(loaded, None)
    async with (
        reach(socket_path, base),
        client_session(socket_path, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(f"{base}/health/ready?verbose") as resp,
    ):
        return resp.status, await resp.text()


def cmd_health(args: argparse.Namespace) -> int:
    import aiohttp

    loaded = load(args)
    try:
        import asyncio

        status, text = asyncio.run(probe_ready(loaded, args.timeout))
    except Unreachable as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"not ready: no answer in {args.timeout:g} s ({type(exc).__name__})", file=sys.stderr)
        return 1
    print(text, end="")
    return 0 if status == 200 else 1


def cmd_redis_cli(args: argparse.Namespace) -> int:  # noqa: RET503 - execv does not return
    """valkey-cli (or redis-cli) on the daemon's Redis: the embedded server's
    socket, or the configured URL."""
    import os
    from urllib.parse import unquote, urlsplit

    from actors.embedded.binaries import find_valkey_cli
    from actors.redis_link import cluster_seeds, is_cluster

    loaded = load(args)
    url = args.url or redis_url(loaded)
    down = _redis_down(url, embedded=loaded.settings.embedded_redis and not args.url)
    if down:
        print(f"jarvisd redis-cli: {down}", file=sys.stderr)
        return 1
    binary = find_valkey_cli()
    if binary is None:
        print("jarvisd redis-cli: no valkey-cli or redis-cli found", file=sys.stderr)
        return 1
    if is_cluster(url, loaded.settings.redis):  # -c: follow the cluster's redirections
        where = ["-c", "-u", cluster_seeds(url)[0] if "+cluster" in url else url]
    elif url.startswith("unix://"):
        parts = urlsplit(url)
        where = ["-s", parts.path]
        if parts.username:
            # The password by the environment, never in the argument list (/proc).
            where += ["--user", unquote(parts.username)]
            os.environ["REDISCLI_AUTH"] = unquote(parts.password or "")
    else:
        where = ["-u", url]
    argv = [str(binary), *where, *args.args]
    os.execv(argv[0], argv)  # noqa: S606 - the CLI's own binary, an argument list


def _redis_down(url: str, *, embedded: bool) -> str | None:
    """Why nothing answers at ``url`` (a socket connect, no Redis command),
    with the next step; None when something listens. The embedded Valkey
    runs with the daemon; another Redis is the operator's to start."""
    import socket
    from urllib.parse import urlsplit

    from actors.agents import without_credentials
    from actors.redis_link import cluster_seeds
    from jarvisd.cli_common import START_HINT

    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            if not Path(parts.path).exists():
                return f"no Redis socket at {parts.path}: the embedded Valkey runs with the daemon; {START_HINT}"
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(parts.path)
        else:
            seed = urlsplit(cluster_seeds(url)[0] if "+cluster" in url else url)
            socket.create_connection((seed.hostname or "127.0.0.1", seed.port or 6379), 2).close()
    except OSError as exc:
        step = START_HINT if embedded else "is that Redis server running, and is the URL right?"
        return f"nothing answers at {without_credentials(url)} ({exc.strerror or exc}): {step}"
    return None


def cmd_redis_url(args: argparse.Namespace) -> int:
    """Where the daemon's Redis is (the embedded server's Unix socket, or
    redis.url), without the daemon's own credentials: agents get URLs of
    their own from ``jarvisd agent add``. Exit 1 when the embedded server's
    socket is not there (no daemon runs)."""
    from actors.agents import without_credentials

    loaded = load(args)
    url = redis_url(loaded)
    if loaded.settings.embedded_redis:
        down = _redis_down(url, embedded=True)
        if down:
            print(f"jarvisd redis-url: {down}", file=sys.stderr)
            return 1
    print(without_credentials(url))
    print(
        "agents: 'jarvisd agent add NAME' gives each agent a Redis URL with credentials of its own",
        file=sys.stderr,
    )
    return 0


def cmd_embedded_forget(args: argparse.Namespace) -> int:
    """Remove what embedded mode keeps for this instance outside its state
    directory (as root, from a folder the servers' account cannot enter);
    refused while the daemon runs."""
    from actors.embedded import forget
    from jarvisd.instance import InstanceLock, InstanceLocked

    loaded = load(args)
    state_dir = Path(loaded.settings.daemon.state_dir)
    lock = None
    if state_dir.is_dir():
        try:
            lock = InstanceLock.take(state_dir)
        except InstanceLocked as exc:
            print(f"jarvisd: {exc}", file=sys.stderr)
            return 1
    try:
        for path in forget(state_dir):
            print(f"removed {path}")
    finally:
        if lock is not None:
            lock.release()
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"jarvisd {__version__}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write the embedded default configuration (refuses to replace a file)."""
    from config.template import default_toml

    target = Path(args.config or "jarvisd.toml")
    if target.exists() and not args.force:
        print(f"jarvisd init: {target} exists (--force replaces it)", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(default_toml(args.state_dir, args.port))
    print(f"wrote {target}: embedded PostgreSQL and Valkey under {args.state_dir}")
    here = "" if target.resolve().parent == Path.cwd() else f" --config {target}"
    print(f"next: jarvisd{here} run", file=sys.stderr)
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``only``, that command's parser alone is built
    whole (the others are a name and a line of help)."""
    parser = Parser(
        prog="jarvisd",
        description="jarvisd: the Jarvis state daemon and its command line.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"jarvisd {__version__}")
    config_help = (
        "config file (default: $JARVISD_CONFIG, ./jarvisd.toml, /etc/jarvisd/jarvisd.toml)"
    )
    parser.add_argument("--config", "-c", metavar="PATH", help=config_help)
    sub: Any = Commands(
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), only
    )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Before or after the command: SUPPRESS keeps a value given before.
        p.add_argument(
            "--config", "-c", metavar="PATH", default=argparse.SUPPRESS, help=config_help
        )
        return p

    init = with_config(
        sub.add_parser(
            "init",
            help="write a configuration that runs embedded PostgreSQL and Valkey",
            description="Writes ./jarvisd.toml (or --config PATH): embedded PostgreSQL and "
            "Valkey with their data under the state directory, the API on 127.0.0.1. "
            "Relative paths in it resolve against the file's folder.",
        )
    )
    init.add_argument(
        "--state-dir",
        default="var",
        metavar="DIR",
        help="where the daemon keeps its data, relative to the file (default var)",
    )
    init.add_argument(
        "--port", type=int, default=8017, help="the API's TCP port on 127.0.0.1 (default 8017)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(func=cmd_init)
    with_config(sub.add_parser("run", help="run the daemon")).set_defaults(func=cmd_run)
    with_config(
        sub.add_parser("check-config", help="validate the config and print the effective one")
    ).set_defaults(func=cmd_check_config)
    m = with_config(sub.add_parser("migrate", help="apply pending database migrations"))
    m.add_argument(
        "--status", action="store_true", help="list applied and pending migrations, change nothing"
    )
    m.set_defaults(func=cmd_migrate)
    h = with_config(
        sub.add_parser("health", help="exit 0 when the running daemon is ready, 1 when not")
    )
    h.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    h.set_defaults(func=cmd_health)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    embedded = sub.add_parser(
        "embedded", help="embedded mode's files kept outside the state directory"
    ).add_subparsers(dest="embedded_command", required=True, metavar="ACTION")
    with_config(
        embedded.add_parser(
            "forget",
            help="remove what embedded mode keeps outside the state directory (stopped daemon)",
        )
    ).set_defaults(func=cmd_embedded_forget)
    rc = with_config(
        sub.add_parser(
            "redis-cli", help="valkey-cli/redis-cli on the daemon's Redis (embedded or configured)"
        )
    )
    rc.add_argument(
        "--url",
        help="connect with this URL instead of the daemon's own (e.g. an agent's, "
        "from jarvisd agent add, to act as that agent)",
    )
    rc.add_argument("args", nargs=argparse.REMAINDER, help="the command, e.g. XLEN jarvis:inbox")
    rc.set_defaults(func=cmd_redis_cli)
    with_config(
        sub.add_parser(
            "redis-url",
            help="print where the daemon's Redis is (no credentials; agents: jarvisd agent add)",
        )
    ).set_defaults(func=cmd_redis_url)
    from jarvisd import cli_agents, cli_approvals, cli_data, cli_pubsub, cli_webhooks

    cli_data.add_parsers(sub, with_config)
    cli_pubsub.add_parsers(sub, with_config)
    cli_approvals.add_parsers(sub, with_config)
    cli_agents.add_parsers(sub, with_config)
    cli_webhooks.add_parsers(sub, with_config)
    finish(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=command_of(words)).parse_args(words)
    try:
        return int(args.func(args))
    except NoConfig as err:
        print(f"jarvisd: {err}", file=sys.stderr)
        if err.named:
            _print_config_errors(err.err)
        return EXIT_CONFIG
    except Exception as err:
        from config import ConfigError  # read by then: every command loads its configuration

        if not isinstance(err, ConfigError):
            raise
        _print_config_errors(err)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # pragma: no cover - only outside `run`, which owns SIGINT
        return 130


__all__ = ["build_parser", "main"]
