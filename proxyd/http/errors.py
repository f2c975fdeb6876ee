"""proxyd's own answers: small valid HTTP/1.1 responses, or the operator's files."""

from __future__ import annotations

REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def builtin_page(status: int) -> bytes:
    reason = REASONS.get(status, "Error")
    body = f"<html><body><h1>{status} {reason}</h1></body></html>\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-cache\r\nConnection: close\r\n\r\n").encode() + body
