"""Send messages to nodes and collect their replies, polling the SuperLink at a short interval.

``Grid.send_and_receive`` sleeps a fixed 3 s between pulls (flwr 1.42, ``http_grid.py``); a round pays that
on every stage, so this module pushes and pulls itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from flwr.app import Message
from flwr.serverapp import Grid


def exchange(
    grid: Grid, messages: Sequence[Message], timeout: float, poll_interval: float = 0.1, arrivals: dict[str, float] | None = None
) -> dict[str, Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds, keyed by the id of the
    message they answer. A message the SuperLink would not take, or whose reply does not come, is absent.
    ``arrivals`` (optional) receives the seconds from the push to each reply's arrival."""
    if not messages:
        return {}
    started = time.monotonic()
    pending = {message_id for message_id in grid.push_messages(list(messages)) if message_id}
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            answered = reply.metadata.reply_to_message_id
            if answered in pending:
                replies[answered] = reply
                if arrivals is not None:
                    arrivals[answered] = time.monotonic() - started
                pending.discard(answered)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return replies
