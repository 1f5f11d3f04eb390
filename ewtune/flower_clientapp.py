"""The ClientApp of the federation app (the ``clientapp`` component of coordinator/flower_app): the holder's
shim :mod:`agent.client_app`, with the weights packed into one buffer for transport
(:mod:`coordinator.packing`), which spares Flower one authenticated request per tensor on every hop.

A packed train or evaluate message is unpacked into plain named arrays before the shim sees it, and a train
reply's arrays are packed again; the daemon, its checks and the receipt (whose digest covers the named arrays)
are unchanged. Messages without a layout pass through as they are. Imports flwr, numpy and the shim only.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from accountant.errors import InvalidInputError
from agent import client_app as shim
from coordinator.packing import LAYOUT_KEY, weight_records, weights_of

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return shim.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        packed = _unpack(msg)
    except InvalidInputError as bad:
        return Message(Error(code=shim.INVALID, reason=str(bad)), reply_to=msg)
    reply = shim.train(msg, context)
    if packed and reply.has_content() and "arrays" in reply.content:
        for name, record in weight_records(weights_of(reply.content), packed=True).items():
            reply.content[name] = record
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        _unpack(msg)
    except InvalidInputError as bad:
        return Message(Error(code=shim.INVALID, reason=str(bad)), reply_to=msg)
    return shim.evaluate(msg, context)


def _unpack(msg: Message) -> bool:
    """Replace a packed message's weights by the named arrays; True when it was packed."""
    if not msg.has_content() or LAYOUT_KEY not in msg.content:
        return False
    arrays = weights_of(msg.content)
    for name, record in weight_records(arrays, packed=False).items():
        msg.content[name] = record
    del msg.content[LAYOUT_KEY]
    return True
