"""Differential fuzzing of the HTTP parser: proxyd against llhttp (httptools).

Generated requests (valid ones and subtle neighbours) go through a real
proxyd to a recording backend; generated responses come back from it.  What
proxyd forwards or relays must be what llhttp reads in the original, modulo
proxyd's documented rewriting, and every disagreement must be one that
docs/PARSER.md ("Differential fuzzing") lists with the RFC 9112 section that
decides it (tests/http_fuzz.py has the strategies, the backend, the checks
and the categories).  Here: a fixed seed (derandomize) and a budget of a few
hundred cases; scripts/fuzz-http runs the same strategies for as long as
asked.

Then each documented difference as a fixed vector (so the list in the docs
stays true), the proxyd bugs the fuzzing found (now fixed) as
regression tests, and a few checks that the checker itself notices a
forwarded request or a relayed response that is not what llhttp read.

One proxyd (one worker) and one backend serve the whole module.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests import http_fuzz as hf

REQUEST_EXAMPLES = 300
RESPONSE_EXAMPLES = 300
FUZZ_SETTINGS = {"derandomize": True, "deadline": None, "database": None, "print_blob": True,
                 "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much]}


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    env = hf.FuzzEnv(tmp_path_factory.mktemp("differential"))
    yield env
    env.stop()


def _check(outcome: hf.Outcome) -> hf.Outcome:
    assert not outcome.problems, outcome.report()
    unknown = set(outcome.categories) - set(hf.CATEGORIES)
    assert not unknown, unknown
    return outcome


# ------------------------------------------------------------------ the fuzz

@settings(max_examples=REQUEST_EXAMPLES, **FUZZ_SETTINGS)
@given(case=hf.request_cases())
def test_requests_agree_with_llhttp(fuzz_env, case):
    _check(hf.run_request_case(fuzz_env, case))


@settings(max_examples=RESPONSE_EXAMPLES, **FUZZ_SETTINGS)
@given(case=hf.response_cases())
def test_responses_agree_with_llhttp(fuzz_env, case):
    _check(hf.run_response_case(fuzz_env, case))


# ------------------------------------------------------- documented differences

def raw_message(raw: bytes) -> hf.Message:
    """A template as it is (MARK where the case marker goes)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return hf.Message([head], [], raw_body=body)


M = hf.MARK
GET = b"GET /" + M + b" HTTP/1.1\r\nHost: example.test\r\nX-Fuzz-Case: " + M + b"\r\n"

REQUEST_VECTORS = {
    "R-ASTERISK-FORM": b"GET * HTTP/1.1\r\nHost: example.test\r\nX-Fuzz-Case: " + M + b"\r\n\r\n",
    "R-VERSION": b"GET /" + M + b" HTTP/2.0\r\nHost: example.test\r\n\r\n",
    "R-HOST": b"GET /" + M + b" HTTP/1.1\r\nX-Fuzz-Case: " + M + b"\r\n\r\n",
    "R-AUTHORITY": b"GET http://other.test/" + M + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "R-TE-HTTP10": b"POST /" + M + b" HTTP/1.0\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\n\r\n",
    "R-TE-UNKNOWN": GET + b"Transfer-Encoding: br, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "R-TE-EMPTY-ELEMENT": GET + b"Transfer-Encoding: , chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "R-CHUNK-SIZE-DIGITS": GET + b"Transfer-Encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n",
    "R-CL-DIGITS": GET + b"Content-Length: 0000000000000000005\r\n\r\nhello",
    "R-REQUEST-LINE-WS": b"GET  /" + M + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "R-LEADING-LF": b"\n" + GET + b"\r\n",
    "R-SIZE": GET + b"X-Long: " + b"x" * 17000 + b"\r\n\r\n",
    "R-CONNECT": b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nX-Fuzz-Case: " + M + b"\r\n\r\n",
    "F-METHOD": b"BREW /" + M + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "F-CHUNK-EXT-BWS": GET + b"Transfer-Encoding: chunked\r\n\r\n5 ; a = b\r\nhello\r\n0\r\n\r\n",
    "F-TE-OWS": GET + b"Transfer-Encoding: chunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "C-EXT-GRAMMAR": GET + b"Transfer-Encoding: chunked\r\n\r\n5;a=\r\nhello\r\n0\r\n\r\n",
    "C-LINE-SIZE": GET + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n",
    "K-PERSISTENCE": b"GET /" + M + b" HTTP/1.0\r\nHost: example.test\r\nProxy-Connection: keep-alive\r\n\r\n"
                     b"GET /" + M + b"-2 HTTP/1.1\r\nHost: example.test\r\n\r\n",
}

RESPONSE_VECTORS = {
    "S-STATUS-NO-SP": b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    "S-STATUS-RANGE": b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok",
    "S-REASON-CTL": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
    "S-VERSION": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "S-TE-NOT-CHUNKED": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nthe body until close",
    "S-TE-UNKNOWN": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: br, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "S-CHUNK-SIZE-DIGITS": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000002\r\nok\r\n0\r\n\r\n",
    "S-CL-DIGITS": b"HTTP/1.1 200 OK\r\nContent-Length: 0000000000000000002\r\n\r\nok",
    "S-101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    "S-SIZE": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 4000) for i in range(40))
              + b"Content-Length: 2\r\n\r\nok",
    "S-INTERIM": b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "F-CHUNK-EXT-BWS": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 ; a = b\r\nok\r\n0\r\n\r\n",
    "F-TE-OWS": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\t\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "S-TRAILER-FRAMING": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n",
}


def test_every_category_has_a_vector():
    covered = set(REQUEST_VECTORS) | set(RESPONSE_VECTORS)
    assert covered == set(hf.CATEGORIES), set(hf.CATEGORIES) ^ covered


@pytest.mark.parametrize("category", sorted(REQUEST_VECTORS))
def test_documented_request_difference(fuzz_env, category):
    outcome = _check(hf.run_request_case(fuzz_env, raw_message(REQUEST_VECTORS[category])))
    assert category in outcome.categories, outcome.report()


@pytest.mark.parametrize("category", sorted(RESPONSE_VECTORS))
def test_documented_response_difference(fuzz_env, category):
    case = hf.ResponseCase(raw_message(RESPONSE_VECTORS[category]), [])
    outcome = _check(hf.run_response_case(fuzz_env, case))
    assert category in outcome.categories, outcome.report()


def test_requests_after_a_documented_difference_are_still_compared(fuzz_env):
    # llhttp stops at `get` (F-METHOD); proxyd forwards it and the next request, which the
    # checks then compare with llhttp reading the stream again from that request's line.
    raw = (b"get /" + M + b" HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\n\r\n"
           b"GET /" + M + b"-2 HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\n\r\n")
    outcome = _check(hf.run_request_case(fuzz_env, raw_message(raw)))
    assert "F-METHOD" in outcome.categories and outcome.verdicts == ["agree-forwarded"], outcome.report()
    assert len(outcome.forwarded) == 2, outcome.report()


# ---------------------------------------------------- bugs the fuzzing found
# Each was a proxyd bug (an xfail until fixed, docs/PARSER.md "Fixed"); now
# a regression test, and the fuzz fails on any new case of it.

def _own(received: bytes, head_only: bool = False) -> hf.LlMessage:
    answers = hf.llparse(received, response=True, head_only=head_only).messages
    assert answers and hf.own_answer(answers[-1], head_only), received
    return answers[-1]


@pytest.mark.parametrize("target", [b"foo", b"example.test:80"], ids=["foo", "authority"])
def test_fixed_target_form_is_refused(fuzz_env, target):
    # `GET foo HTTP/1.1`: not origin-form (no leading /), not an absolute-URI llhttp reads;
    # `GET example.test:80 HTTP/1.1`: authority-form, only for CONNECT (RFC 9112 3.2.3).
    # proxyd forwards both verbatim; routing takes the path from the target ("foo" never matches
    # a path_prefix) while a lenient server may resolve it to "/foo" or to another host.
    marker = fuzz_env.new_marker()
    data = b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\nX-Fuzz-Case: " + marker + b"\r\n\r\n"
    x = fuzz_env.exchange(data, None, marker)
    assert x.forwarded == [], f"forwarded: {x.forwarded}"
    assert _own(x.received).status == 400


@pytest.mark.parametrize("which", ["own 400", "own 502"])
def test_fixed_own_answer_to_head_has_no_content(fuzz_env, which):
    marker = fuzz_env.new_marker()
    if which == "own 400":   # no Host: proxyd's own 400
        x = fuzz_env.exchange(b"HEAD /" + marker + b" HTTP/1.1\r\nX-Fuzz-Case: " + marker + b"\r\n\r\n",
                              None, marker)
    else:                    # a malformed status line: proxyd's own 502
        x = fuzz_env.exchange(b"HEAD /" + marker + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
                              b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n", marker)
    own = _own(x.received, head_only=True)
    assert own.status == (400 if which == "own 400" else 502)
    assert x.received.endswith(b"\r\n\r\n"), f"content after the head: {x.received!r}"


@pytest.mark.parametrize("direction", ["request", "response"])
def test_fixed_bad_chunk_line_is_not_relayed(fuzz_env, direction):
    marker = fuzz_env.new_marker()
    if direction == "request":
        # `zz-not-a-size` and no CRLF after it (then the client's FIN): proxyd forwards it to
        # the server as it comes; it would see that the line is bad only once its CRLF came
        # (a client that sends it later, after a pause, gets a 400 and the server a reset).
        data = (b"POST /" + marker + b" HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\nzz-not-a-size")
        x = fuzz_env.exchange(data, None, marker)
        assert not any(b"zz-not" in raw for raw in x.forwarded), f"the server got: {x.forwarded}"
    else:
        # The server sends a bad size line and closes: the client gets it, then EOF.
        x = fuzz_env.exchange(b"GET /" + marker + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
                              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-a-size",
                              marker)
        assert b"zz-not" not in x.received, f"the client got: {x.received!r}"


@pytest.mark.parametrize("direction", ["request", "response"])
@pytest.mark.parametrize("field", [b"Content-Length: 5", b"Transfer-Encoding: chunked"], ids=["CL", "TE"])
def test_fixed_framing_trailer_is_not_relayed(fuzz_env, direction, field):
    marker = fuzz_env.new_marker()
    body = b"5\r\nhello\r\n0\r\n" + field + b"\r\n\r\n"
    if direction == "request":
        x = fuzz_env.exchange(b"POST /" + marker + b" HTTP/1.1\r\nHost: example.test\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + body, None, marker)
        assert not any(field in raw for raw in x.forwarded), f"the server got: {x.forwarded}"
    else:
        x = fuzz_env.exchange(b"GET /" + marker + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
                              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, marker)
        assert b"\r\n" + field + b"\r\n" not in x.received, f"the client got: {x.received!r}"


# ------------------------------------------------------- the checker can fail

def _exchange(sent: bytes, received: bytes, forwarded: list[bytes]) -> hf.Exchange:
    return hf.Exchange(sent, received, "eof", forwarded, [True] * len(forwarded))


OK = b"HTTP/1.1 200 OK\r\nX-Fuzz-Backend: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
REQ = (b"POST /zc000000000001 HTTP/1.1\r\nHost: example.test\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
       b"Content-Length: 5\r\n\r\nhello")
FWD = (b"POST /zc000000000001 HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n"
       b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\nhello")


@pytest.mark.parametrize("forwarded, problem", [
    (FWD, None),
    (FWD.replace(b"hello", b"hellx"), "body"),
    (FWD.replace(b"Host: example.test\r\n", b"Host: example.test\r\nX-Hop: 1\r\n"), "end-to-end headers"),
    (FWD.replace(b"POST /zc", b"PUT /zc"), "method"),
    (FWD.replace(b"Connection: close\r\n", b""), "connection"),
    (FWD + b"GET / HTTP/1.1\r\n\r\n", "bytes after the request"),
    (FWD.replace(b"Content-Length: 5", b"Transfer-Encoding: chunked").replace(b"hello", b"5\r\nhello\r\n0\r\n\r\n"),
     "chunked"),
], ids=["same", "body", "hop-by-hop kept", "method", "no close", "extra bytes", "re-framed"])
def test_checker_sees_a_request_forwarded_differently(forwarded, problem):
    outcome = hf.check_request_case(raw_message(REQ), _exchange(REQ, OK, [forwarded]), b"zc000000000001")
    if problem is None:
        assert not outcome.problems, outcome.report()
    else:
        assert any(problem in p for p in outcome.problems), outcome.report()


def test_checker_sees_a_request_forwarded_that_llhttp_rejects():
    bad = REQ.replace(b"POST", b"P\x01ST")
    outcome = hf.check_request_case(raw_message(bad), _exchange(bad, OK, [bad]), b"zc000000000001")
    assert outcome.problems, outcome.report()


@pytest.mark.parametrize("received, problem", [
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", None),
    (b"HTTP/1.1 200 OK\r\nX-A: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", "end-to-end headers"),
    (b"HTTP/1.1 201 OK\r\nX-A: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", "status"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno", "body"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok", "cut short"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok", "connection"),
], ids=["same", "header", "status", "body", "truncated", "no close"])
def test_checker_sees_a_response_relayed_differently(received, problem):
    server = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    case = hf.ResponseCase(raw_message(server), [])
    outcome = hf.check_response_case(case, _exchange(case.request_bytes(b"m"), received, [b"GET"]), b"m")
    if problem is None:
        assert not outcome.problems, outcome.report()
    else:
        assert any(problem in p for p in outcome.problems), outcome.report()
