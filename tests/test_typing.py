"""mypy follows an ask from the caller to the handler's reply type: the
reference of each actor accepts only its own messages, and an ask returns
exactly the reply type its message declares."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).parent / "typing" / "wrong_reply.py"


def test_mypy_rejects_a_wrong_reply_type_and_a_message_sent_to_the_wrong_actor() -> None:
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(SAMPLE)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = SAMPLE.read_text().splitlines()
    wrong = {n for n, line in enumerate(lines, 1) if line.rstrip().endswith("# wrong")}
    errors = {int(m.group(1)) for m in re.finditer(r"wrong_reply\.py:(\d+): error", done.stdout)}
    assert wrong, "the sample marks its wrong lines"
    assert errors == wrong, done.stdout
