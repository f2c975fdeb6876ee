"""Configuration-level checks for defects 13 and 15.

13. timeout_http_request and timeout_http_keep_alive, when not set
    explicitly, are at most timeout_client (HAProxy's fallback to
    `timeout client`): the resolved FrontendConfig values say so;
15. max_body_size applies to chunked request bodies too, and
    man/proxyd.toml.5 must not say it does not.
"""

import os
import re
import textwrap

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from proxyd import config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROXYD_TOML_5 = os.path.join(REPO, "man", "proxyd.toml.5")


def frontend(frontend_lines: str = "", defaults_lines: str = "") -> config.FrontendConfig:
    text = f"""
[defaults]
{textwrap.dedent(defaults_lines)}

[frontends.web]
bind = "127.0.0.1:8080"
mode = "http"
backend = "app"
{textwrap.dedent(frontend_lines)}

[backends.app]
servers = [{{ name = "s1", address = "127.0.0.1:9001" }}]
"""
    return config.build(tomllib.loads(text)).frontends["web"]


# ----------------------------------------------------------- 13. timeouts

def test_config_module_is_the_one_under_test():
    assert os.path.dirname(os.path.abspath(config.__file__)) == os.path.join(REPO, "proxyd")


@pytest.mark.parametrize("frontend_lines, defaults_lines", [
    ('timeout_client = 1', ''),
    ('timeout_client = "1s"', ''),
    ('', 'timeout_client = "1s"'),
], ids=["frontend-number", "frontend-string", "defaults"])
def test_http_timeouts_not_set_are_at_most_timeout_client(frontend_lines, defaults_lines):
    fe = frontend(frontend_lines, defaults_lines)
    assert fe.timeout_client == 1.0
    assert fe.timeout_http_request == 1.0
    assert fe.timeout_http_keep_alive == 1.0


def test_http_timeouts_not_set_keep_their_default_under_a_longer_timeout_client():
    fe = frontend('timeout_client = 60')
    assert (fe.timeout_http_request, fe.timeout_http_keep_alive) == (10.0, 10.0)
    fe = frontend()
    assert (fe.timeout_http_request, fe.timeout_http_keep_alive) == (10.0, 10.0)


def test_http_timeouts_not_set_keep_their_default_when_timeout_client_is_zero():
    # 0 = no timeout (defect 14): "at most no limit" is the 10 s default, not 0
    fe = frontend('timeout_client = 0')
    assert (fe.timeout_http_request, fe.timeout_http_keep_alive) == (10.0, 10.0)


def test_http_timeouts_set_explicitly_win_over_timeout_client():
    fe = frontend('timeout_client = "1s"\ntimeout_http_keep_alive = "3s"')
    assert (fe.timeout_http_keep_alive, fe.timeout_http_request) == (3.0, 1.0)
    fe = frontend('timeout_client = "1s"\ntimeout_http_request = "3s"')
    assert (fe.timeout_http_request, fe.timeout_http_keep_alive) == (3.0, 1.0)
    # set in [defaults] is set explicitly too (as HAProxy's defaults section)
    fe = frontend('timeout_client = "1s"', 'timeout_http_request = "5s"')
    assert (fe.timeout_http_request, fe.timeout_http_keep_alive) == (5.0, 1.0)


# ------------------------------------------------- 15. the max_body_size entry

def max_body_size_entry() -> str:
    """The text of the `.B max_body_size` entry of proxyd.toml.5, up to the next .TP."""
    with open(PROXYD_TOML_5, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^\.B max_body_size\n(.*?)^\.TP", text, re.M | re.S)
    assert m, "no .B max_body_size entry in man/proxyd.toml.5"
    return m.group(1)


def test_manual_says_max_body_size_applies_to_chunked_bodies():
    entry = max_body_size_entry()
    flat = " ".join(entry.split()).lower()
    assert "chunked" in flat, entry
    assert "does not apply" not in flat and "not measured" not in flat, entry
