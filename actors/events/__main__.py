"""Print the event table of docs/agents.md: ``python -m actors.events``."""

from actors.events.table import table

print(table(), end="")
