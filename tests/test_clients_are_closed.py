"""Every OpenAI client a test makes is closed, never left to the garbage collector.

A collected AsyncOpenAI schedules its own close. By then its idle connections' sockets (their
transports were collected in the same sweep) are closed and their descriptor numbers may belong
to sockets the gateway accepted in this same event loop; the late close unregisters those from the
loop's selector, and the gateway never reads the request on them: the test hangs until the
client's timeout (tests/decode/test_admin.py failed CI that way). Use LocalStack.openai
(tests/stack.py) or `async with openai.AsyncOpenAI(...)`."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MADE = re.compile(r"openai\.AsyncOpenAI\(")


def test_every_async_openai_client_is_closed_by_its_maker():
    loose = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("stack.py", Path(__file__).name):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MADE.search(line) and "async with" not in line:
                loose.append(f"{path.relative_to(TESTS)}:{number}: {line.strip()}")
    assert not loose, "AsyncOpenAI made outside `async with` (use LocalStack.openai):\n" + "\n".join(loose)
