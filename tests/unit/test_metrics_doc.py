"""docs/METRICS.md documents every metric family /metrics can emit, and
only those."""

import re
from pathlib import Path

from proxyd import stats

REPO = Path(__file__).resolve().parents[2]


def emitted_families() -> set[str]:
    names = {f"{section}_{key}" for section, table in stats.PROXY_METRICS.items() for key, _, _ in table}
    source = Path(stats.__file__).read_text()
    names |= set(re.findall(r'family\(\s*"([a-z_]+)"', source))
    names |= {f"worker_{name}" for name, _, _ in stats.WORKER_METRICS}
    return {f"proxyd_{name}" for name in names}


def test_every_metric_family_is_documented_and_nothing_else():
    emitted = emitted_families()
    assert len(emitted) > 60 and "proxyd_server_status" in emitted and "proxyd_worker_open_fds" in emitted
    documented = set(re.findall(r"^\| `(proxyd_[a-z_]+)` \|", (REPO / "docs/METRICS.md").read_text(), re.M))
    assert emitted - documented == set(), "emitted but not in docs/METRICS.md"
    assert documented - emitted == set(), "in docs/METRICS.md but never emitted"
