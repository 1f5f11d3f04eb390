"""The agent daemon's local gRPC API: Describe, Train, Evaluate, Health, and RevealAudit (an audit daemon only).

The methods are registered with gRPC's generic handlers and carry plain bytes, so there is no protoc code to
drift from the installed protobuf. A message is ``MAGIC | uint32 header length | JSON header | safetensors``:
the header holds a message of :mod:`ewtune.federation.contract` in its dict form, the one the Flower records
carry (a request's under :data:`REQUEST`: the round plan, the evaluation or reveal request; a reply's as it is:
the holder's description, the train reply, the evaluation reply); the safetensors blob (possibly empty) holds
the named numpy arrays of the trainable weights (safetensors: no pickling, dtype and shape kept exactly, so the
receipt's :func:`ewtune.accountant.receipts.update_digest` is the same on both ends).

This module imports neither torch nor flwr: the ClientApp shim uses :class:`DaemonClient` and must start
fast. The daemon is served on a Unix socket or a loopback port only; it is never exposed on a network.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import safetensors
import safetensors.numpy

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.agent.policy import PlanRefused
from ewtune.federation.contract import EvaluationReply, EvaluationRequest, HolderDescription, RevealRequest, RoundPlan, TrainReply

SERVICE = "ewtune.agent.v1.AgentDaemon"
REQUEST = "config"  # the header key of a request's contract message
CANARIES = "canaries"  # the header key of an audit daemon's reveal
MAGIC = b"EWT1"
_HEADER_LENGTH = struct.Struct(">I")
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Message = TypeVar("Message", RoundPlan, EvaluationRequest, RevealRequest)


class DaemonUnavailable(EwtuneError):
    """The daemon is shutting down or cannot be reached."""

    exit_code = 4


class RequestFailed(EwtuneError):
    """A request failed after work on the data began. Its reason is generic on purpose: an error text can
    depend on the records; the detail stays in the holder's log."""

    exit_code = 5


class DaemonError(EwtuneError):
    """A call to the daemon failed; ``status`` is the gRPC status name (FAILED_PRECONDITION for a refusal)."""

    def __init__(self, status: str, message: str):
        super().__init__(f"agent daemon: {message}")
        self.status = status
        self.reason = message

    @property
    def refused(self) -> bool:
        return self.status == grpc.StatusCode.FAILED_PRECONDITION.name


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One wire message: ``header`` as JSON and ``arrays`` as safetensors."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=True).encode("utf-8")
    return MAGIC + _HEADER_LENGTH.pack(len(head)) + head + _arrays_to_bytes(arrays)


def decode(message: bytes) -> tuple[dict[str, Any], Arrays | None]:
    """Inverse of :func:`encode`; a malformed message raises :class:`InvalidInputError`."""
    if len(message) < len(MAGIC) + _HEADER_LENGTH.size or not message.startswith(MAGIC):
        raise InvalidInputError("not an ewtune agent message (bad magic)")
    start = len(MAGIC) + _HEADER_LENGTH.size
    (length,) = _HEADER_LENGTH.unpack_from(message, len(MAGIC))
    try:
        header = json.loads(message[start : start + length].decode("utf-8"))
    except (ValueError, RecursionError) as bad:  # RecursionError: nesting deeper than the parser goes
        raise InvalidInputError(f"agent message header is not JSON: {bad}") from None
    if not isinstance(header, dict):
        raise InvalidInputError("agent message header must be a JSON object")
    return header, _arrays_from_bytes(message[start + length :])


def _arrays_to_bytes(arrays: Mapping[str, np.ndarray] | None) -> bytes:
    if arrays is None:
        return b""
    return safetensors.numpy.save({name: np.ascontiguousarray(array) for name, array in arrays.items()})


def _arrays_from_bytes(blob: bytes) -> Arrays | None:
    if not blob:
        return None
    try:
        return safetensors.numpy.load(bytes(blob))
    except (safetensors.SafetensorError, ValueError) as bad:
        raise InvalidInputError(f"agent message arrays are not valid safetensors: {bad}") from None


# --- server ----------------------------------------------------------------------------------------------


def serve(daemon: Any, address: str, max_workers: int = 4, socket_mode: int = 0o660,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Server:
    """Start serving ``daemon`` (an :class:`ewtune.agent.daemon.Daemon` or anything with its methods) on
    ``address`` (``unix:///path.sock`` or a loopback ``host:port``) and return the started server; a
    request larger than ``max_message_bytes`` is refused by gRPC before it is read into memory.
    Stop it with ``server.stop(grace)``."""
    socket_path = unix_socket_path(address)
    if socket_path is None:
        check_loopback(address)
    else:
        _remove_stale_socket(socket_path)
    executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ewtune-rpc")
    server = grpc.server(executor, options=_message_limits(max_message_bytes))
    handlers = {
        "Describe": _unary(lambda header, arrays: (daemon.describe(), None)),
        "Health": _unary(lambda header, arrays: (daemon.health(), None)),
        "Train": _unary(lambda header, arrays: _train(daemon, header, arrays)),
        "Evaluate": _unary(lambda header, arrays: (_evaluation(daemon, header, arrays).to_config(), None)),
        "RevealAudit": _unary(lambda header, arrays: ({CANARIES: daemon.reveal_audit(header.get(REQUEST))}, None)),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if server.add_insecure_port(address) == 0:
        raise InvalidInputError(f"cannot listen on {address}")
    server.start()
    if socket_path is not None:
        os.chmod(socket_path, socket_mode)
    return server


def _train(daemon: Any, header: dict[str, Any], arrays: Arrays | None) -> tuple[dict[str, Any], Arrays]:
    """The daemon decodes the plan itself (``RoundPlan.from_config``): what it checks is what it was sent."""
    reply = daemon.train(_required(arrays), header.get(REQUEST))
    released = TrainReply(receipt=json.dumps(reply.receipt, sort_keys=True), steps=reply.metrics["steps"])
    return released.to_config(), reply.arrays


def _evaluation(daemon: Any, header: dict[str, Any], arrays: Arrays | None) -> EvaluationReply:
    return EvaluationReply.released(daemon.evaluate(_required(arrays), header.get(REQUEST)))


def _required(arrays: Arrays | None) -> Arrays:
    if not arrays:
        raise InvalidInputError("the request carries no arrays (the global trainable weights)")
    return arrays


def _unary(method: Callable[[dict[str, Any], Arrays | None], tuple[dict[str, Any], Arrays | None]]):
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            header, arrays = decode(request)
            reply_header, reply_arrays = method(header, arrays)
            return encode(reply_header, reply_arrays)
        except PlanRefused as refusal:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(refusal))
        except DaemonUnavailable as unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(unavailable))
        except RequestFailed as failed:
            context.abort(grpc.StatusCode.ABORTED, str(failed))
        except InvalidInputError as invalid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(invalid))
        except EwtuneError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except Exception:  # noqa: BLE001 - the log gets the traceback; the caller a reason that says nothing of the data
            log.exception("agent daemon request failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the agent daemon (details in the holder's log)")

    return grpc.unary_unary_rpc_method_handler(handle)


def _message_limits(max_message_bytes: int) -> list[tuple[str, int]]:
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1:
        raise InvalidInputError(f"the message size limit must be a positive number of bytes, got {max_message_bytes!r}")
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def unix_socket_path(address: str) -> Path | None:
    """The socket file of a ``unix:`` address (``unix:///abs/path`` or ``unix:relative``), else None."""
    if not address.startswith("unix:"):
        return None
    rest = address[len("unix:") :]
    return Path(rest[2:] if rest.startswith("//") else rest)


def check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0] if ":" in address else ""
    if host not in _LOOPBACK_HOSTS:
        raise InvalidInputError(
            f"the agent daemon listens only on a Unix socket or a loopback port, got {address!r} "
            "(use unix:///path/agent.sock or 127.0.0.1:PORT)"
        )


def _remove_stale_socket(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InvalidInputError(f"{path} exists and is not a socket: refusing to replace it")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)


# --- client ----------------------------------------------------------------------------------------------


class DaemonClient:
    """Calls the daemon at ``address``; every failure becomes a :class:`DaemonError` with the daemon's reason."""

    def __init__(self, address: str, timeout: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=_message_limits(max_message_bytes))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> HolderDescription:
        return HolderDescription.from_config(self._call("Describe", {})[0])

    def health(self) -> dict[str, Any]:
        return self._call("Health", {})[0]

    def train(self, arrays: Mapping[str, np.ndarray], plan: RoundPlan | Mapping[str, Any]) -> tuple[Arrays, TrainReply]:
        """(updated arrays, the train reply: the signed receipt and the steps executed) for the round ``plan``
        (a :class:`RoundPlan` or its dict form)."""
        header, reply_arrays = self._call("Train", {REQUEST: _message(RoundPlan, plan).to_config()}, arrays)
        return reply_arrays or {}, TrainReply.from_config(header)

    def evaluate(self, arrays: Mapping[str, np.ndarray], request: EvaluationRequest | Mapping[str, Any]) -> EvaluationReply:
        """The private evaluation of ``arrays`` as the model after the run and round ``request`` names."""
        header = self._call("Evaluate", {REQUEST: _message(EvaluationRequest, request).to_config()}, arrays)[0]
        return EvaluationReply.from_config(header)

    def reveal_audit(self, request: RevealRequest | Mapping[str, Any]) -> dict[str, Any]:
        """An audit daemon's canaries and inclusion bits for the run ``request`` names (once)."""
        return self._call("RevealAudit", {REQUEST: _message(RevealRequest, request).to_config()})[0][CANARIES]

    def _call(self, method: str, header: dict[str, Any], arrays=None) -> tuple[dict[str, Any], Arrays | None]:
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            reply = stub(encode(header, arrays), timeout=self.timeout, wait_for_ready=False)
        except grpc.RpcError as error:
            raise DaemonError(error.code().name, error.details() or error.code().name) from None
        return decode(reply)


def _message(kind: type[Message], message: Message | Mapping[str, Any]) -> Message:
    """``message`` as the contract type ``kind``: a dict form is decoded first (and refused when malformed)."""
    return message if isinstance(message, kind) else kind.from_config(message)
