"""Strict HTTP/1.x message heads and chunked framing (RFC 9112).

Anything ambiguous is refused rather than guessed at, because a proxy and
the server behind it guessing differently is how requests are smuggled:
bare LF or CR, obs-fold, whitespace before a colon, several or malformed
Content-Length values, Transfer-Encoding with Content-Length or without a
final "chunked", bad chunk sizes.  Errors carry the status to answer.
"""

from __future__ import annotations

import re

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
ANY_VERSION_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9.]+")
STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3}) ([\t\x20-\x7e\x80-\xff]*)")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
DIGITS = re.compile(rb"\d{1,18}")
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
                        rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|"
                        rb"\"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*\"))?)*)")
# What may still turn into a valid line while its CRLF has not come: a
# chunk-size line (hex digits, then an extension) or a trailer field (a
# name, then a colon and a value).  Anything else is refused at once, before
# it is relayed.
CHUNK_SIZE_PREFIX = re.compile(rb"(?:[0-9A-Fa-f]{1,15}(?:[ \t;][\t\x20-\x7e\x80-\xff]*)?)?\r?")
TRAILER_PREFIX = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?::[\t\x20-\x7e\x80-\xff]*)?)?\r?")
# RFC 9110 6.5.1: framing cannot come after the content; a recipient that
# merges trailers into the head (6.5.2 forbids it, servers do it) would
# read these as the message's framing.
FRAMING_FIELDS = {b"content-length", b"transfer-encoding"}
ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
END_TO_END = {b"host"}  # never dropped, whatever Connection names
KNOWN_CODINGS = {b"gzip", b"deflate", b"compress", b"x-gzip", b"x-compress"}
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
              b"transfer-encoding", b"content-length"}  # the last two are framing: re-added as parsed


class HttpError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Message:
    """A parsed head: its first line's parts, its headers, and its framing."""

    __slots__ = ("method", "target", "version", "status", "headers", "length", "chunked",
                 "connection", "upgrade", "host")

    def __init__(self):
        self.method = b""
        self.target = b""
        self.version = 11
        self.status = 0
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lower-case name, name, value)
        self.length = -1          # Content-Length, or -1
        self.chunked = False
        self.connection: set[bytes] = set()  # tokens of the Connection header, lower case
        self.upgrade = b""
        self.host = b""

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, _, v in self.headers if n == name]


def _lines(head: bytes, bad: int) -> list[bytes]:
    """HEAD without its final CRLFCRLF, split on CRLF; a bare CR or LF is an error."""
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise HttpError(bad, "bare CR or LF")
    return lines


def _headers(message: Message, lines: list[bytes], bad: int) -> None:
    for line in lines:
        if not line:
            raise HttpError(bad, "empty header line")
        if line[0] in b" \t":
            raise HttpError(bad, "obs-fold continuation line")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise HttpError(bad, "invalid header name")  # includes whitespace before the colon
        value = value.strip(b" \t")
        if BAD_VALUE.search(value):
            raise HttpError(bad, "control character in a header value")
        message.headers.append((name.lower(), name, value))


def _framing(message: Message, bad: int, is_request: bool) -> None:
    lengths = message.get(b"content-length")
    codings = message.get(b"transfer-encoding")
    if codings:
        if lengths:
            raise HttpError(bad, "both Content-Length and Transfer-Encoding")
        if is_request and message.version == 10:
            raise HttpError(bad, "Transfer-Encoding in an HTTP/1.0 request")
        tokens = [t.strip(b" \t").lower() for v in codings for t in v.split(b",")]
        if not tokens or tokens[-1] != b"chunked" or tokens.count(b"chunked") != 1:
            raise HttpError(bad, "Transfer-Encoding does not end with a single chunked")
        for token in tokens[:-1]:
            if token not in KNOWN_CODINGS:
                raise HttpError(501 if is_request else bad, "unknown transfer coding")
        message.chunked = True
    elif lengths:
        if len(lengths) > 1 or not DIGITS.fullmatch(lengths[0]):
            raise HttpError(bad, "invalid or repeated Content-Length")
        message.length = int(lengths[0])
    for value in message.get(b"connection"):
        message.connection.update(t.strip(b" \t").lower() for t in value.split(b",") if t.strip())


def parse_request(head: bytes) -> Message:
    lines = _lines(head, 400)
    match = REQUEST_LINE.fullmatch(lines[0])
    if not match:
        if ANY_VERSION_LINE.fullmatch(lines[0]):
            raise HttpError(505, "unsupported HTTP version")
        raise HttpError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if (major, minor) not in ((b"1", b"0"), (b"1", b"1")):
        raise HttpError(505, "unsupported HTTP version")
    if method == b"CONNECT":
        raise HttpError(501, "CONNECT is not supported")
    if not (target[0] == 47 or ABSOLUTE_FORM.match(target) or (target == b"*" and method == b"OPTIONS")):
        # RFC 9112 3.2: origin-form, absolute-form, or "*" for OPTIONS
        # (authority-form is CONNECT's); "foo" is none, and servers differ
        # on what it means.
        raise HttpError(400, "request-target in none of the forms")
    message = Message()
    message.method, message.target = method, target
    message.version = 10 if minor == b"0" else 11
    _headers(message, lines[1:], 400)
    hosts = message.get(b"host")
    if len(hosts) > 1 or (message.version == 11 and not hosts):
        raise HttpError(400, "missing or repeated Host")
    message.host = hosts[0] if hosts else b""
    _framing(message, 400, is_request=True)
    if b"upgrade" in message.connection:
        upgrades = message.get(b"upgrade")
        message.upgrade = upgrades[0] if len(upgrades) == 1 else b""
    return message


def parse_response(head: bytes) -> Message:
    lines = _lines(head, 502)
    match = STATUS_LINE.fullmatch(lines[0])
    if not match:
        raise HttpError(502, "malformed status line")
    message = Message()
    message.version = 10 if match.group(1) == b"0" else 11
    message.status = int(match.group(2))
    if not 100 <= message.status <= 599:
        # RFC 9110 15: outside 100..599 a status is invalid, to be taken as a
        # server error; a 0xx read as final by one side and as interim (or
        # as having a body) by another frames the stream two ways.
        raise HttpError(502, "status code out of range")
    _headers(message, lines[1:], 502)
    _framing(message, 502, is_request=False)
    if message.status == 101:
        upgrades = message.get(b"upgrade")
        message.upgrade = upgrades[0] if upgrades else b""
    return message


def host_without_port(host: bytes) -> str:
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        return text.split("]", 1)[0] + "]"
    return text.rsplit(":", 1)[0] if ":" in text else text


def target_host(target: bytes) -> bytes:
    """The host of an absolute-form target ("http://host:port/x"), else b"".

    RFC 9112 3.2.2: with an absolute-form target, Host is ignored in favour
    of the target's own authority; routing must look at the same host.
    """
    lower = target[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        authority = target.split(b"://", 1)[1].split(b"/", 1)[0]
        return authority.rsplit(b"@", 1)[-1]
    return b""


def same_authority(authority: bytes, host: bytes, target: bytes) -> bool:
    """Host names the same authority as an absolute-form target (RFC 9112
    3.2.2), case aside and with the scheme's default port implied."""
    default = b":443" if target[:5].lower() == b"https" else b":80"

    def norm(value: bytes) -> bytes:
        value = value.lower()
        return value[:-len(default)] if value.endswith(default) else value
    return norm(authority) == norm(host)


def request_path(target: bytes) -> str:
    """The path of an origin-form or absolute-form target."""
    text = target.decode("latin-1")
    if text.startswith(("http://", "https://")):
        rest = text.split("://", 1)[1]
        text = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    return text


def forwarded_head(first_line: bytes, message: Message, extra: list[bytes]) -> bytes:
    """FIRST_LINE, the end-to-end headers of MESSAGE, its framing, then EXTRA lines."""
    drop = HOP_BY_HOP | (message.connection - END_TO_END)
    lines = [first_line]
    lines += [name + b": " + value for lower, name, value in message.headers if lower not in drop]
    if message.chunked:
        lines.append(b"Transfer-Encoding: " + b", ".join(message.get(b"transfer-encoding")))
    elif message.length >= 0:
        lines.append(b"Content-Length: %d" % message.length)
    lines += extra
    return b"\r\n".join(lines) + b"\r\n\r\n"


class ChunkedDecoder:
    """Checks chunked framing as bytes pass; says where the message ends.

    feed(data) returns how many bytes of DATA belong to this message (all of
    them until the last chunk and trailers are complete) and raises HttpError
    on bad framing.  It keeps only the current partial size or trailer line.
    """

    __slots__ = ("state", "remaining", "line", "done", "bad", "decoded")

    SIZE, DATA, DATA_CR, DATA_LF, TRAILER = range(5)
    MAX_LINE = 4096

    def __init__(self, bad: int = 400):
        self.state = self.SIZE
        self.remaining = 0
        self.line = b""
        self.done = False
        self.bad = bad
        self.decoded = 0   # payload bytes seen

    def feed(self, data) -> int:
        i, n = 0, len(data)
        while i < n and not self.done:
            state = self.state
            if state == self.DATA:
                take = min(self.remaining, n - i)
                self.remaining -= take
                self.decoded += take
                i += take
                if not self.remaining:
                    self.state = self.DATA_CR
            elif state == self.DATA_CR or state == self.DATA_LF:
                expected = 13 if state == self.DATA_CR else 10
                if data[i] != expected:
                    raise HttpError(self.bad, "chunk data not followed by CRLF")
                i += 1
                self.state = self.DATA_LF if state == self.DATA_CR else self.SIZE
            else:
                chunk = bytes(data[i:i + self.MAX_LINE + 2])
                buf = self.line + chunk
                end = buf.find(b"\r\n")
                if end < 0:
                    prefix = CHUNK_SIZE_PREFIX if state == self.SIZE else TRAILER_PREFIX
                    if len(buf) > self.MAX_LINE or not prefix.fullmatch(buf):
                        raise HttpError(self.bad, "bad chunk line")
                    self.line = buf
                    i += len(chunk)
                    continue
                line = buf[:end]
                i += end + 2 - len(self.line)
                self.line = b""
                if b"\n" in line or b"\r" in line:
                    raise HttpError(self.bad, "bare CR or LF in chunked framing")
                if state == self.SIZE:
                    match = CHUNK_SIZE.fullmatch(line)
                    if not match:
                        raise HttpError(self.bad, "bad chunk size")
                    self.remaining = int(match.group(1), 16)
                    self.state = self.DATA if self.remaining else self.TRAILER
                elif line:  # a trailer field: same rules as a header line
                    name, colon, value = line.partition(b":")
                    if line[0] in b" \t" or not colon or not TOKEN.fullmatch(name) \
                            or BAD_VALUE.search(value.strip(b" \t")):
                        raise HttpError(self.bad, "bad trailer field")
                    if name.lower() in FRAMING_FIELDS:
                        raise HttpError(self.bad, "framing field in the trailers")
                else:
                    self.done = True
        return i
