"""What every ``jarvisd`` help page and usage error shares: a description and
examples on each command, the exit codes, and a hint at the environment
variable when an option that is a setting is given on the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["EXIT_CODES", "Commands", "Parser", "command_of", "finish", "setting_hint"]

EXIT_CODES = """\
exit status:
  0    done
  1    refused or failed (the reason on stderr), or no daemon answers
  2    a usage or configuration error
  130  interrupted (Ctrl-C)

settings come from the config file (jarvisd check-config shows them) or from
variables named JARVISD_<SECTION>__<KEY>, e.g. JARVISD_HTTP__PORT=9000."""

# Each command's examples, by its words after `jarvisd`.
EXAMPLES: dict[str, str] = {
    "": "jarvisd init && jarvisd run\n  jarvisd health\n  jarvisd approvals list",
    "init": "jarvisd init\n  jarvisd init --config /etc/jarvisd/jarvisd.toml --state-dir /var/lib/jarvisd",
    "run": "jarvisd run\n  JARVISD_HTTP__PORT=9000 jarvisd --config ./jarvisd.toml run",
    "check-config": "jarvisd check-config\n  JARVISD_DAEMON__LOG_LEVEL=debug jarvisd check-config",
    "migrate": "jarvisd migrate --status\n  jarvisd migrate",
    "health": "jarvisd health && echo ready\n  jarvisd health --timeout 1",
    "version": "jarvisd version\n  jarvisd --version",
    "embedded": "jarvisd embedded forget",
    "embedded forget": "jarvisd embedded forget",
    "redis-cli": "jarvisd redis-cli PING\n  jarvisd redis-cli XLEN jarvis:inbox",
    "redis-url": "jarvisd redis-url",
    "user": "jarvisd user add alice --role approver\n  jarvisd user list",
    "user add": "jarvisd user add alice --role approver --email alice@example.org\n"
    "  printf '%s\\n' \"$PASSWORD\" | jarvisd user add bob --role user --password-stdin",
    "user list": "jarvisd user list",
    "user passwd": "jarvisd user passwd alice\n"
    "  printf '%s\\n' \"$PASSWORD\" | jarvisd user passwd alice --password-stdin",
    "user disable": "jarvisd user disable alice\n  jarvisd user disable alice --enable",
    "token": "TOKEN=$(jarvisd token create --user alice)\n  jarvisd token list --user alice",
    "token create": "TOKEN=$(jarvisd token create --user alice --name laptop)",
    "token list": "jarvisd token list\n  jarvisd token list --user alice",
    "token revoke": "jarvisd token revoke 7",
    "logins": "jarvisd logins rotate-key",
    "logins rotate-key": "jarvisd logins rotate-key",
    "publish": 'jarvisd publish alerts \'{"level": "info", "text": "hello"}\'',
    "subscribe": "jarvisd subscribe alerts\n  jarvisd subscribe --pattern 'jarvis:events:*'\n"
    "  jarvisd subscribe --since 0 --kind approvals",
    "approvals": "jarvisd approvals list\n  jarvisd approvals show 12\n"
    "  jarvisd approvals approve 12 --reason 'checked the target'",
    "approvals list": "jarvisd approvals list\n  jarvisd approvals list --status '' --limit 200 --json",
    "approvals show": "jarvisd approvals show 12\n  jarvisd approvals show 12 --wait 30",
    "approvals approve": "jarvisd approvals approve 12 --reason 'checked the target'",
    "approvals reject": "jarvisd approvals reject 12 --reason 'wrong host'",
    "agent": "URL=$(jarvisd agent add planner)\n  jarvisd agent list",
    "agent add": "URL=$(jarvisd agent add planner)",
    "agent list": "jarvisd agent list\n  jarvisd agent list --json",
    "agent revoke": "jarvisd agent revoke planner",
    "webhooks": "jarvisd webhooks list\n  jarvisd webhooks retry ops",
    "webhooks list": "jarvisd webhooks list\n  jarvisd webhooks list --json",
    "webhooks retry": "jarvisd webhooks retry ops",
}


def setting_hint(unknown: list[str]) -> str | None:
    """For ``--port 9000``: the setting of that name and its variable."""
    import msgspec

    from config import Settings

    sections = {
        f.name: f.type
        for f in msgspec.structs.fields(Settings)
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
    }
    for i, word in enumerate(unknown):
        name, eq, value = word.removeprefix("--").partition("=")
        if not word.startswith("--") or not name:
            continue
        key = name.replace("-", "_")
        if not eq and i + 1 < len(unknown) and not unknown[i + 1].startswith("-"):
            value = unknown[i + 1]
        for section, kind in sorted(sections.items()):
            if key in {f.name for f in msgspec.structs.fields(kind)}:
                var = f"JARVISD_{section.upper()}__{key.upper()}"
                return (
                    f"{word.split('=')[0]} is a setting, not an option: "
                    f"{var}={value or '...'} jarvisd ..., or [{section}] {key} in the config file"
                )
    return None


class Parser(argparse.ArgumentParser):
    """argparse with the help pages jarvisd wants: examples kept as written,
    and usage errors that say where a setting goes."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            message = f"unrecognized arguments: {' '.join(unknown)}"
            hint = setting_hint(unknown)
            self.error(f"{message}\n{hint}" if hint else message)
        return parsed

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def finish(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every help page a description (its one-line help, when it has
    none) and its examples."""
    example = EXAMPLES.get(path)
    if example:
        tail = f"examples:\n  {example}"
        parser.epilog = f"{tail}\n\n{parser.epilog}" if parser.epilog else tail
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, child in action.choices.items():
            if child.description is None:
                line = helps.get(name) or ""
                child.description = line[:1].upper() + line[1:] + ("." if line else "")
            finish(child, f"{path} {name}".strip())


class _Unbuilt:
    """A command's parser that is not built: every call to it (arguments,
    actions, subcommands) is taken and dropped."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


class Commands:
    """The top-level subcommands, each listed with its one line of help;
    only ``only``'s parser is built whole (None: every one), since a run of
    the CLI parses one command and building them all costs more than it does."""

    def __init__(self, sub: Any, only: str | None) -> None:
        self.sub = sub
        self.only = only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.only is None or self.only == name or self.only in kwargs.get("aliases", ()):
            return self.sub.add_parser(name, **kwargs)
        self.sub.add_parser(name, help=kwargs.get("help"), add_help=False)
        return _Unbuilt()


def command_of(argv: Sequence[str]) -> str:
    """The command ``argv`` names: its first word that is neither an option
    nor the value of --config ('' when there is none)."""
    words = iter(argv)
    for word in words:
        if word in ("--config", "-c"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""
