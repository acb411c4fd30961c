"""A fetch path that survives header keys that are not UTF-8 (issue 11, item 4).

Kafka's record format v2 types a header key as a String, but brokers store whatever bytes a
producer wrote. aiokafka decodes every header key strictly as UTF-8 while it iterates a fetched
batch (``DefaultRecordBatch._read_msg``: ``aiokafka/record/_crecords/default_records.pyx`` line
362, and its pure-Python twin in ``aiokafka/record/default_records.py``). One producer that writes
``b"\\xff"`` as a header key therefore makes ``AIOKafkaConsumer.getmany()`` raise
``UnicodeDecodeError`` from inside aiokafka, before any of our code sees the record: the
partition's position stays at the start of that fetch, every later ``getmany()`` refetches and
raises again, and the records of that fetch that came before the hostile one never arrive
either. Worse, records of other partitions that the same ``getmany()`` call had already drained
are dropped after their positions moved past them (lost for this consumer's session; for good
once a later offset of theirs is committed). The record can be neither routed nor
dead-lettered; the partition stalls for good. (A broker that recompresses the batch, because the
topic's ``compression.type`` differs from the producer's, rewrites such a key itself, with
U+FFFD replacement characters: then nothing raises, and the original bytes are gone upstream.)

:class:`HeaderTolerantConsumer` is an ``AIOKafkaConsumer`` whose fetcher decodes such a key with
``surrogateescape`` instead: the record reaches the router with every header, and
``key.encode("utf-8", "surrogateescape")`` gives back the exact bytes on the wire (a key that *is*
valid UTF-8 never contains a lone surrogate, so the two cases cannot be confused; see
:func:`undecodable_header_keys`). Nothing else changes:

* only this consumer's fetcher is touched, never aiokafka's modules (no global monkeypatch);
* batches are still parsed by aiokafka's compiled parser; only a batch on which that parser
  raises ``UnicodeDecodeError`` is parsed again, from its raw bytes, by a subclass of aiokafka's
  pure-Python batch whose single override is the method that decodes header keys
  (:class:`_SurrogateEscapeBatch`), skipping the records already returned;
* transactions, aborted batches, control batches, CRC checks and positions stay aiokafka's own
  code (``PartitionRecords``), because the batches it sees keep aiokafka's interface.

How it hooks in: ``Fetcher._proc_fetch_request`` wraps each partition's fetched bytes in the
module-level name ``MemoryRecords``. The consumer's fetcher gets its own copy of that coroutine
function (same code object, same defaults) whose globals bind ``MemoryRecords`` to
:class:`_TolerantMemoryRecords`; the consumer installs it the moment aiokafka assigns
``self._fetcher`` in ``start()``, synchronously, before the fetch task has run once.

This leans on aiokafka internals, so :func:`check_aiokafka_internals` verifies them when the first
consumer is built (the names above exist, the mirrored ``_read_msg`` is byte-for-byte the source
this module was written against, and an in-memory batch with a ``b"\\xff"`` header key goes through
aiokafka's real ``PartitionRecords`` with the key recovered) and raises
:class:`AiokafkaInternalsChanged` otherwise: the service then fails at start-up, loudly, instead of
running with a fetch path nobody has checked. Written against aiokafka 0.14.0.
"""

from __future__ import annotations

import hashlib
import inspect
import struct
import types
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer
from aiokafka.codec import gzip_encode
from aiokafka.consumer import fetcher as _fetcher_module
from aiokafka.record import default_records as _default_records
from aiokafka.record import memory_records as _memory_records
from aiokafka.record.util import calc_crc32c, decode_varint, encode_varint
from aiokafka.structs import TopicPartition

__all__ = [
    "AiokafkaInternalsChanged",
    "HeaderTolerantConsumer",
    "check_aiokafka_internals",
    "encode_record_batch",
    "header_key_bytes",
    "undecodable_header_keys",
]

# sha256 of inspect.getsource(_DefaultRecordBatchPy._read_msg) in aiokafka 0.14.0: the method
# _SurrogateEscapeBatch._read_msg mirrors. Any change to it there must be read before this
# module is trusted again.
_READ_MSG_SHA256 = "0997ab7a58505c939c31b1cf5809aff4ac6de70f713794d3c62bd049a3270a4a"

# Errors raised by the compiled parser on a header key that is not UTF-8.
_DECODE_ERRORS = (UnicodeDecodeError,)


class AiokafkaInternalsChanged(RuntimeError):
    """The installed aiokafka is not the one :mod:`.fetch` was written and checked against."""


# --- the public helpers --------------------------------------------------------------------


def header_key_bytes(key: str) -> bytes:
    """The bytes of a header key as they were on the wire (lossless for every key we return)."""
    return key.encode("utf-8", "surrogateescape")


def undecodable_header_keys(headers: Iterable[tuple[str, bytes | None]]) -> list[bytes]:
    """The raw bytes of every header key of ``headers`` that was not valid UTF-8.

    Such a key came through :class:`HeaderTolerantConsumer` with its bad bytes as lone
    surrogates (U+DC80..U+DCFF); it can be neither re-produced nor written to JSON as it is, so
    the router should dead-letter the record and keep these bytes (e.g. base64)."""
    out: list[bytes] = []
    for key, _ in headers:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            out.append(header_key_bytes(key))
    return out


def encode_record_batch(
    records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[bytes, bytes | None]]]],
    *,
    timestamp_ms: int = 0,
    gzip: bool = False,
) -> bytes:
    """A non-transactional v2 record batch of ``(key, value, headers)`` records whose header
    keys are raw **bytes** (which aiokafka's own builders refuse: they take str); its records
    gzip-compressed when ``gzip``.

    Only the Kafka wire format is used here, not aiokafka's builder, so the start-up self-test
    and the tests can write a hostile header key without relying on how aiokafka encodes one.
    """
    body = bytearray()
    for delta, (key, value, headers) in enumerate(records):
        rec = bytearray(b"\x00")  # attributes
        put = rec.append
        encode_varint(0, put)  # timestamp delta
        encode_varint(delta, put)  # offset delta
        for field in (key, value):
            if field is None:
                encode_varint(-1, put)
            else:
                encode_varint(len(field), put)
                rec += field
        encode_varint(len(headers), put)
        for h_key, h_value in headers:
            encode_varint(len(h_key), put)
            rec += h_key
            if h_value is None:
                encode_varint(-1, put)
            else:
                encode_varint(len(h_value), put)
                rec += h_value
        encode_varint(len(rec), body.append)
        body += rec
    n = len(records)
    attributes = 0
    if gzip:
        body, attributes = bytearray(gzip_encode(bytes(body))), 0x01
    # BaseOffset, Length, PartitionLeaderEpoch, Magic, CRC, Attributes, LastOffsetDelta,
    # FirstTimestamp, MaxTimestamp, ProducerId, ProducerEpoch, BaseSequence, Records count
    header = struct.Struct(">qiibIhiqqqhii")
    length = header.size - 12 + len(body)
    after_crc = struct.calcsize(">qiibI")
    out = bytearray(
        header.pack(
            0, length, -1, 2, 0, attributes, n - 1, timestamp_ms, timestamp_ms, -1, -1, -1, n
        )
    )
    out += body
    struct.pack_into(">I", out, struct.calcsize(">qiib"), calc_crc32c(bytes(out[after_crc:])))
    return bytes(out)


# --- the parsing -----------------------------------------------------------------------------


class _SurrogateEscapeBatch(_default_records._DefaultRecordBatchPy):  # type: ignore[misc]
    """aiokafka's pure-Python v2 batch, reading header keys with ``surrogateescape``.

    ``_read_msg`` below is aiokafka 0.14.0's ``_DefaultRecordBatchPy._read_msg`` with a single
    change: ``.decode("utf-8")`` of the header key became ``.decode("utf-8",
    "surrogateescape")``. :data:`_READ_MSG_SHA256` pins the source it mirrors."""

    _buffer: bytearray  # set by aiokafka's __init__ (the batch, decompressed on __iter__)
    _pos: int

    def _read_msg(self, decode_varint: Any = decode_varint) -> Any:
        buffer = self._buffer
        pos = self._pos
        length, pos = decode_varint(buffer, pos)
        start_pos = pos
        _, pos = decode_varint(buffer, pos)  # attributes, unused

        ts_delta, pos = decode_varint(buffer, pos)
        if self.timestamp_type == self.LOG_APPEND_TIME:
            timestamp = self.max_timestamp
        else:
            timestamp = self.first_timestamp + ts_delta

        offset_delta, pos = decode_varint(buffer, pos)
        offset = self.base_offset + offset_delta

        key_len, pos = decode_varint(buffer, pos)
        if key_len >= 0:
            key: bytes | None = bytes(buffer[pos : pos + key_len])
            pos += key_len
        else:
            key = None

        value_len, pos = decode_varint(buffer, pos)
        if value_len >= 0:
            value: bytes | None = bytes(buffer[pos : pos + value_len])
            pos += value_len
        else:
            value = None

        header_count, pos = decode_varint(buffer, pos)
        if header_count < 0:
            raise _default_records.CorruptRecordException(
                f"Found invalid number of record headers {header_count}"
            )
        headers: list[tuple[str, bytes | None]] = []
        while header_count:
            h_key_len, pos = decode_varint(buffer, pos)
            if h_key_len < 0:
                raise _default_records.CorruptRecordException(
                    f"Invalid negative header key size {h_key_len}"
                )
            h_key = buffer[pos : pos + h_key_len].decode("utf-8", "surrogateescape")
            pos += h_key_len

            h_value_len, pos = decode_varint(buffer, pos)
            if h_value_len >= 0:
                h_value: bytes | None = bytes(buffer[pos : pos + h_value_len])
                pos += h_value_len
            else:
                h_value = None

            headers.append((h_key, h_value))
            header_count -= 1

        if pos - start_pos != length:
            raise _default_records.CorruptRecordException(
                f"Invalid record size: expected to read {length} bytes in record "
                f"payload, but instead read {pos - start_pos}"
            )
        self._pos = pos
        return _default_records._DefaultRecordPy(
            offset, timestamp, self.timestamp_type, key, value, headers
        )


class _TolerantBatch:
    """One fetched v2 batch: aiokafka's compiled batch, until it fails on a header key.

    Everything but iteration is the compiled batch's own (``PartitionRecords`` reads
    ``validate_crc()``, ``producer_id``, ``base_offset``, ``next_offset``,
    ``is_control_batch``, ``is_transactional``). On ``UnicodeDecodeError`` the rest of the batch
    is read by :class:`_SurrogateEscapeBatch` from the same bytes, after the records already
    returned. Iteration is a generator (``for record in batch`` in ``PartitionRecords``) and
    ``next(batch)`` (how it reads a control record) advances the same one."""

    __slots__ = ("_fast", "_raw", "_records")

    def __init__(self, fast: Any, raw: memoryview) -> None:
        self._fast = fast
        self._raw = raw
        self._records: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fast, name)

    def validate_crc(self) -> bool:
        return bool(self._fast.validate_crc())

    def __iter__(self) -> Iterator[Any]:
        if self._records is None:
            self._records = self._read()
        return self._records

    def __next__(self) -> Any:
        return next(iter(self))

    def _read(self) -> Iterator[Any]:
        done = 0
        try:
            for record in self._fast:  # iter() decompresses, as aiokafka's own loop does
                done += 1
                yield record
        except _DECODE_ERRORS:
            slow = iter(_SurrogateEscapeBatch(self._raw))
            for _ in range(done):
                next(slow)
            yield from slow


class _TolerantMemoryRecords(_memory_records._MemoryRecordsPy):  # type: ignore[misc]
    """aiokafka's pure-Python ``MemoryRecords`` (it only slices the fetched bytes into
    batches), handing out each v2 batch as a :class:`_TolerantBatch` over its raw slice."""

    def next_batch(self, *args: Any, **kwargs: Any) -> Any:
        raw = self._next_slice
        batch = super().next_batch(*args, **kwargs)
        if raw is not None and isinstance(batch, _default_records.DefaultRecordBatch):
            return _TolerantBatch(batch, raw)
        return batch


# --- the installation ------------------------------------------------------------------------


def _tolerant_proc_fetch_request() -> types.FunctionType:
    """``Fetcher._proc_fetch_request`` with ``MemoryRecords`` bound to the tolerant class."""
    original = _fetcher_module.Fetcher._proc_fetch_request
    namespace = dict(original.__globals__)
    namespace["MemoryRecords"] = _TolerantMemoryRecords
    fn = types.FunctionType(
        original.__code__, namespace, original.__name__, original.__defaults__, None
    )
    fn.__kwdefaults__ = original.__kwdefaults__
    fn.__qualname__ = original.__qualname__
    fn.__doc__ = original.__doc__
    return fn


def _install(fetcher: Any) -> None:
    if not isinstance(fetcher, _fetcher_module.Fetcher):
        raise AiokafkaInternalsChanged(f"the consumer's fetcher is a {type(fetcher)!r}")
    fetcher._proc_fetch_request = types.MethodType(_tolerant_proc_fetch_request(), fetcher)


class HeaderTolerantConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """An ``AIOKafkaConsumer`` that returns records whose header keys are not UTF-8, each such
    key decoded with ``surrogateescape`` (see the module docstring). Same arguments.

    Raises :class:`AiokafkaInternalsChanged` at construction if aiokafka's internals differ from
    what this was checked against."""

    def __init__(self, *topics: str, **kwargs: Any) -> None:
        check_aiokafka_internals()
        super().__init__(*topics, **kwargs)

    # aiokafka assigns ``self._fetcher`` once, in ``start()``, right after building the Fetcher
    # (and ``None`` in ``__init__``); the fetch task it creates has not run yet at that point.
    @property
    def _fetcher(self) -> Any:
        return self.__dict__.get("_semroute_fetcher")

    @_fetcher.setter
    def _fetcher(self, fetcher: Any) -> None:
        if fetcher is not None:
            _install(fetcher)
        self.__dict__["_semroute_fetcher"] = fetcher


# --- the guard -------------------------------------------------------------------------------

_checked = False


def _read_msg_source_sha256() -> str:
    source = inspect.getsource(_default_records._DefaultRecordBatchPy._read_msg)
    return hashlib.sha256(source.encode()).hexdigest()


def check_aiokafka_internals() -> None:
    """Verify, once per process, what :class:`HeaderTolerantConsumer` relies on in aiokafka;
    raise :class:`AiokafkaInternalsChanged` naming what differs."""
    global _checked
    if _checked:
        return
    version = getattr(aiokafka, "__version__", "?")
    problems: list[str] = []
    fetcher_cls = getattr(_fetcher_module, "Fetcher", None)
    proc = getattr(fetcher_cls, "_proc_fetch_request", None)
    if not inspect.iscoroutinefunction(proc) or "MemoryRecords" not in proc.__code__.co_names:
        problems.append("Fetcher._proc_fetch_request does not build MemoryRecords by name")
    elif proc.__code__.co_freevars:
        problems.append("Fetcher._proc_fetch_request became a closure")
    elif getattr(_fetcher_module, "MemoryRecords", None) is not getattr(
        _memory_records, "MemoryRecords", None
    ):
        problems.append("aiokafka.consumer.fetcher.MemoryRecords is not the records module's")
    consumer_init = inspect.getsource(AIOKafkaConsumer.start) + inspect.getsource(
        AIOKafkaConsumer.__init__
    )
    if "self._fetcher = Fetcher(" not in consumer_init:
        problems.append("AIOKafkaConsumer.start no longer assigns self._fetcher = Fetcher(...)")
    for owner, attr in (
        (_memory_records, "_MemoryRecordsPy"),
        (_default_records, "_DefaultRecordBatchPy"),
        (_default_records, "_DefaultRecordPy"),
        (_default_records, "DefaultRecordBatch"),
        (_default_records, "CorruptRecordException"),
    ):
        if not hasattr(owner, attr):
            problems.append(f"{owner.__name__}.{attr} is gone")
    if not problems and _read_msg_source_sha256() != _READ_MSG_SHA256:
        problems.append(
            "_DefaultRecordBatchPy._read_msg changed (the method _SurrogateEscapeBatch mirrors)"
        )
    if not problems:
        problems.extend(_self_test())
    if problems:
        raise AiokafkaInternalsChanged(
            f"semroute_stream's header-key-tolerant fetch was checked against aiokafka 0.14.0, "
            f"not the installed {version}: " + "; ".join(problems)
        )
    _checked = True


def _self_test() -> list[str]:
    """A batch ``[ok, hostile, ok]`` through aiokafka's own ``PartitionRecords``."""
    raw_key = b"k-\xff\xfe"
    data = encode_record_batch(
        [(b"k0", b"v0", [(b"a", b"1")]), (None, b"v1", [(raw_key, b"2")]), (b"k2", b"v2", [])]
    )
    tp = TopicPartition("semroute-self-test", 0)

    def unpack(records: Any) -> list[Any]:
        parts = _fetcher_module.PartitionRecords(
            tp, records, [], 0, None, None, True, _fetcher_module.READ_COMMITTED
        )
        return list(parts)

    try:
        got = unpack(_TolerantMemoryRecords(data))
    except Exception as exc:  # the point is to report anything
        return [f"self-test: the tolerant fetch path raised {exc!r}"]
    values = [r.value for r in got]
    keys = [[header_key_bytes(k) for k, _ in r.headers] for r in got]
    if values != [b"v0", b"v1", b"v2"] or keys != [[b"a"], [raw_key], []]:
        return [f"self-test: the tolerant fetch path returned {values!r} {keys!r}"]
    try:
        unpack(_memory_records.MemoryRecords(data))
    except _DECODE_ERRORS:
        pass
    except Exception as exc:
        return [f"self-test: aiokafka now fails differently on such a key: {exc!r}"]
    return []
