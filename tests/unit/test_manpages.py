"""The manual pages: every configuration key documented, pages render cleanly.

proxyd/config.py declares each key once; these tests hold man/proxyd.toml.5 to
those tables (keys, defaults, [defaults] inheritance, the full example) and
check that both pages render without a single groff warning.
"""

import os
import re
import shutil
import subprocess

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import proxyd
from proxyd import config

MAN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "man")
PROXYD_8 = os.path.join(MAN, "proxyd.8")
PROXYD_TOML_5 = os.path.join(MAN, "proxyd.toml.5")
PAGES = [PROXYD_8, PROXYD_TOML_5]


def read(page):
    with open(page, encoding="utf-8") as f:
        return f.read()


def subsections(page_text):
    """{heading: [lines]} for every .SH and .SS of a page, quotes stripped from headings."""
    parts, heading = {}, None
    for line in page_text.splitlines():
        m = re.match(r'^\.S[HS]\s+(.*)$', line)
        if m:
            heading = m.group(1).strip().strip('"')
            parts[heading] = []
        elif heading is not None:
            parts[heading].append(line)
    return parts


def section_for(table_name, parts):
    """The lines of the one subsection whose heading names TABLE_NAME exactly.

    "frontends.NAME" must not match the heading of "frontends.NAME.routes[]".
    """
    pattern = re.compile(r"(?<![\w.])" + re.escape(table_name) + r"(?![\w.\[])")
    found = [h for h in parts if pattern.search(h)]
    assert len(found) == 1, f"man/proxyd.toml.5 needs exactly one .SS heading naming {table_name!r}, found {found}"
    return parts[found[0]]


_TAG = re.compile(r'^\.B[IR]?\s+"?(?:\\%)?([A-Za-z_][A-Za-z0-9_]*)')


def tagged_paragraphs(lines):
    """{key: body text} for each `.TP` paragraph whose tag starts with a bold word."""
    paragraphs, i = {}, 0
    while i < len(lines):
        if lines[i].startswith(".TP") and i + 1 < len(lines):
            m = _TAG.match(lines[i + 1])
            body = []
            j = i + 2
            while j < len(lines) and not re.match(r"^\.(TP|PP|LP|P|IP|SS|SH)\b", lines[j]):
                body.append(lines[j])
                j += 1
            if m:
                assert m.group(1) not in paragraphs, f"{m.group(1)!r} is documented twice in one section"
                paragraphs[m.group(1)] = "\n".join(body)
            i = j
        else:
            i += 1
    return paragraphs


TOML_PAGE = read(PROXYD_TOML_5)
PARTS = subsections(TOML_PAGE)
ALL_KEYS = [(table, key) for table, keys in config.SECTIONS.items() for key in keys]


def key_id(item):
    table, key = item
    return f"{table}:{key.name}"


@pytest.mark.parametrize("table,key", ALL_KEYS, ids=[key_id(k) for k in ALL_KEYS])
def test_every_key_is_documented(table, key):
    paragraphs = tagged_paragraphs(section_for(table, PARTS))
    assert key.name in paragraphs, (
        f"man/proxyd.toml.5 does not document {table}: {key.name} "
        f"(a `.TP` paragraph tagged `.B {key.name}` under the heading naming {table})")
    assert paragraphs[key.name].strip(), f"{table}: {key.name} has an empty paragraph"


@pytest.mark.parametrize("table", list(config.SECTIONS))
def test_no_key_is_documented_that_does_not_exist(table):
    known = {k.name for k in config.SECTIONS[table]}
    documented = set(tagged_paragraphs(section_for(table, PARTS)))
    assert documented <= known, f"man/proxyd.toml.5 documents keys that {table} does not have: {documented - known}"


def expected_default(key):
    """How the page states KEY's default, derived from config.py's table."""
    value = key.default
    if value is config.REQUIRED:
        return "Required"
    if value is None:
        return "Default: unset"
    if isinstance(value, (dict, tuple, list)) and not value:
        return "Default: none"
    if isinstance(value, float):  # durations are the only float keys
        return f'Default: \\fB"{value:g}s"\\fR'
    if isinstance(value, bool):
        return f"Default: \\fB{str(value).lower()}\\fR"
    if isinstance(value, int):
        return f"Default: \\fB{value}\\fR"
    if isinstance(value, str):
        return f'Default: \\fB"{value}"\\fR'
    raise AssertionError(f"no rule to write the default of {key.name}: {value!r}")


@pytest.mark.parametrize("table,key", ALL_KEYS, ids=[key_id(k) for k in ALL_KEYS])
def test_documented_default_matches_config(table, key):
    body = tagged_paragraphs(section_for(table, PARTS)).get(key.name)
    if body is None:
        pytest.fail(f"{table}: {key.name} is not documented")
    wanted = expected_default(key)
    assert wanted in body, f"man/proxyd.toml.5, {table}: {key.name}: expected {wanted!r} in:\n{body}"


def _listed_after(lines, lead):
    """Bold words of the paragraph that begins with LEAD (up to the next .PP)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(lead))
    words = []
    for line in lines[start + 1:]:
        if re.match(r"^\.(PP|SS|SH|TP)\b", line):
            break
        m = re.match(r"^\.BR?\s+(?:\\%)?([A-Za-z_]+)", line)
        if m:
            words.append(m.group(1))
    return words


@pytest.mark.parametrize("kind,keys", [("Frontend", config.FRONTEND_KEYS), ("Backend", config.BACKEND_KEYS)])
def test_defaults_section_lists_exactly_the_inheritable_keys(kind, keys):
    lines = section_for("defaults", PARTS)
    listed = _listed_after(lines, f"{kind} keys that may be inherited")
    assert len(listed) == len(set(listed)), f"{kind} keys listed twice: {listed}"
    assert set(listed) == {k.name for k in keys if k.inheritable}


@pytest.mark.parametrize("table,key", [(t, k) for t, k in ALL_KEYS if not k.inheritable],
                         ids=[key_id(k) for k in ALL_KEYS if not k[1].inheritable])
def test_keys_that_cannot_be_inherited_say_so(table, key):
    if table not in ("frontends.NAME", "backends.NAME"):
        pytest.skip("only frontend and backend keys are ever inherited")
    body = tagged_paragraphs(section_for(table, PARTS))[key.name]
    assert "Not inherited" in body


def _example_toml():
    lines = subsections(TOML_PAGE)["EXAMPLE"]
    start, end = lines.index(".EX"), lines.index(".EE")
    text = "\n".join(lines[start + 1:end])
    for escape, char in (("\\(dq", '"'), ("\\(aq", "'"), ("\\-", "-"), ("\\&", ""), ("\\e", "\\")):
        text = text.replace(escape, char)
    return text


def test_full_example_is_a_valid_configuration():
    cfg = config.build(tomllib.loads(_example_toml()))
    assert cfg.frontends and cfg.backends


def test_full_example_sets_every_section():
    raw = tomllib.loads(_example_toml())
    assert {"global", "defaults", "frontends", "backends"} <= set(raw)
    assert any("routes" in fe for fe in raw["frontends"].values())
    assert any("health_check" in be for be in raw["backends"].values())


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_version_in_title_line_matches_package(page):
    th = next(line for line in read(page).splitlines() if line.startswith(".TH "))
    assert f'"proxyd {proxyd.__version__}"' in th


def test_proxyd_8_documents_options_and_signals():
    parts = subsections(read(PROXYD_8))
    options = "\n".join(parts["OPTIONS"])
    for option in (r"\-c", r"\-D", r"\-p", r"\-\-check", r"\-\-version"):
        assert re.search(r"^\.BI?\s+" + re.escape(option) + r"\b", options, re.M), option
    signals = "\n".join(parts["SIGNALS"])
    for signal in ("SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGTTIN", "SIGTTOU"):
        assert signal in signals, signal
    codes = re.findall(r"^\.TP\n\.B (\S+)$", "\n".join(parts["Termination codes"]), re.M)
    assert set("CScsRPKD") <= set(codes)


# ------------------------------------------------------------------ rendering

def _no_warnings(cmd, env=None):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}: {result.stderr}"
    assert result.stderr == "", f"{cmd} warned:\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_groff_renders_without_warnings(page):
    _no_warnings(["groff", "-man", "-Tutf8", "-ww", "-z", page])


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_man_renders_cleanly(page):
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="80", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    out = _no_warnings(["man", "--warnings", "-l", page], env=env)
    assert "NAME" in out and "SEE ALSO" in out
    # nothing of the markup may leak into the rendered text
    leaked = [line for line in out.splitlines() if re.match(r"^\s*\.[A-Za-z]{1,2}(\s|$)", line) or "\\f" in line]
    assert not leaked, f"roff markup shows in the rendered page: {leaked}"
