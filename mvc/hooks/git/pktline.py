"""Git's pkt-line framing (protocol code only; no filter logic here).

A packet is 4 hex digits giving its total length (header included) and the payload;
"0000" is a flush packet. Payloads are at most 65516 bytes.
"""

from __future__ import annotations

import re

from ...errors import MvcError

MAX_PAYLOAD = 65516
FLUSH = b"0000"
_HEX4 = re.compile(rb"\A[0-9a-fA-F]{4}\Z")


class ProtocolError(MvcError):
    """Git's side of the pipe did not speak pkt-line (one line, as every mvc error)."""


def read_packet(stream) -> bytes | None:
    """The next payload, or None for a flush packet. EOFError when the stream ends."""
    head = stream.read(4)
    if not head:
        raise EOFError
    if len(head) < 4:
        raise ProtocolError("truncated pkt-line header")
    if not _HEX4.match(head):  # exactly 4 hex digits: int() alone would take " 1f", "0x1f", "-001"
        raise ProtocolError(f"bad pkt-line header {head!r}")
    n = int(head, 16)
    if n == 0:
        return None
    if n < 4 or n - 4 > MAX_PAYLOAD:
        raise ProtocolError(f"bad pkt-line length {n}")
    data = stream.read(n - 4)
    if len(data) != n - 4:
        raise ProtocolError("truncated pkt-line payload")
    return data


def read_text_list(stream) -> list[str]:
    """Text packets up to the next flush, without trailing newlines."""
    out = []
    while (pkt := read_packet(stream)) is not None:
        out.append(pkt.decode("utf-8", "surrogateescape").rstrip("\n"))  # Git path names are bytes
    return out


def read_content(stream, sink) -> None:
    """Binary packets up to the next flush, each handed to sink(bytes)."""
    while (pkt := read_packet(stream)) is not None:
        sink(pkt)


def write_packet(stream, data: bytes) -> None:
    for i in range(0, len(data), MAX_PAYLOAD):
        part = data[i:i + MAX_PAYLOAD]
        stream.write(b"%04x" % (len(part) + 4) + part)


def write_text(stream, *lines: str) -> None:
    for line in lines:
        write_packet(stream, (line + "\n").encode("utf-8"))


def flush(stream) -> None:
    stream.write(FLUSH)
    stream.flush()


class PacketReader:
    """A binary file-like object reading content packets up to the next flush."""

    def __init__(self, stream):
        self.stream = stream
        self.cur = b""  # the packet being consumed, from offset self.off
        self.off = 0
        self.eof = False
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        """Up to *n* bytes (all that is left for n < 0), copied once."""
        parts = []
        need = n if n >= 0 else 1 << 62
        while need > 0:
            if self.off >= len(self.cur):
                if self.eof:
                    break
                pkt = read_packet(self.stream)
                if pkt is None:
                    self.eof = True
                    break
                self.cur, self.off = pkt, 0
            take = min(need, len(self.cur) - self.off)
            parts.append(memoryview(self.cur)[self.off:self.off + take])
            self.off += take
            need -= take
        out = b"".join(parts)
        self.pos += len(out)
        return out

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of what is still to be read."""
        self.cur = data + self.cur[self.off:]
        self.off = 0
        self.pos -= len(data)

    def tell(self) -> int:
        return self.pos

    def drain(self) -> int:
        """Consume the rest of the content; returns how many bytes were left."""
        return len(self.read())


class PacketWriter:
    """A binary file-like object that frames everything written to it as pkt-lines."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()

    def write(self, data) -> int:
        self.buf += data
        while len(self.buf) >= MAX_PAYLOAD:
            write_packet(self.stream, bytes(self.buf[:MAX_PAYLOAD]))
            del self.buf[:MAX_PAYLOAD]
        return len(data)

    def close(self) -> None:
        if self.buf:
            write_packet(self.stream, bytes(self.buf))
            self.buf.clear()
