"""Access lines in HAProxy's layouts, so that halog and HAProxy users' tools
read them: `option tcplog` for TCP sessions, `option httplog` for HTTP
requests (HAProxy's configuration manual, sections 8.2.2 and 8.2.3):

  tcplog:  %ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq
  httplog: %ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc
           %ac/%fc/%bc/%sc/%rc %sq/%bq %{+Q}r

then proxyd's own facts, which HAProxy's layouts have no field for, as
`key=value` fields after HAProxy's last one: `up=` (client bytes delivered
to the server), `fin=` (which side closed first, on a TCP session that
ended normally) and `err=` (the precise error; always last, it may hold
spaces).  The sessions build the line with one f-string; what is here is
what they share: the date (rebuilt once per second), the termination state
in HAProxy's terms, and the server's label.
"""

from __future__ import annotations

import time

NOSRV = "<NOSRV>"   # HAProxy's server name when none was reached

_date_second = -1
_date_text = ""


def accept_date(wall: float) -> str:
    """HAProxy's date, `06/Feb/2009:12:12:51.443`, local time; the part
    down to the second is formatted once per second."""
    global _date_second, _date_text
    second = int(wall)
    if second != _date_second:
        _date_second = second
        _date_text = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(second))
    return f"{_date_text}.{int((wall - second) * 1000):03d}"


def tcp_state(term: str, err: str, half_close: bool, queued: bool) -> tuple[str, str]:
    """proxyd's termination code of a TCP session -> (HAProxy's 2-character
    state, the `fin=` field).

    proxyd marks a session that ended by a FIN with who sent it first (CD:
    the client, SD: the server); HAProxy calls that a normal end ("--"), and
    the side that closed first goes to `fin=`.  A session closed by proxyd
    timeout_fin after that first FIN is normal too, unless the FIN was
    passed on (half_close, or the server's FIN: always passed): then the
    side that never finished timed out (sD: the server, cD: the client).
    An error ends it in HAProxy's terms as it is (CD/SD with err=ECONNRESET:
    that side aborted); a crash is HAProxy's I (internal error); a session
    still waiting in the backend's queue is in state Q.
    """
    if not term:
        return "--", ""
    if term in ("CD", "SD") and (not err or err == "timeout_fin"):
        fin = "client" if term == "CD" else "server"
        if err and (term == "SD" or half_close):
            return ("sD" if term == "CD" else "cD"), fin
        return "--", fin
    if err == "internal_error":
        return "I" + term[1], ""
    if queued and term[1] == "C" and term[0] in "CKP":
        return term[0] + "Q", ""
    return term, ""


def http_state(term: str, err: str, queued: bool) -> str:
    """proxyd's termination code of an HTTP request -> HAProxy's 4-character
    state: the 2 characters as in tcp_state (HTTP codes are HAProxy's
    already; every CD/SD there is an abort), then "--": no persistence
    cookie is used nor set."""
    if not term:
        return "----"
    if err == "internal_error":
        return f"I{term[1]}--"
    if queued and term[1] == "C" and term[0] in "CKPc":
        return f"{term[0]}Q--"
    return f"{term}--"
