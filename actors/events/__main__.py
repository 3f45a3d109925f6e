"""Print README's event table: ``python -m actors.events``."""

from actors.events.table import table

print(table(), end="")
