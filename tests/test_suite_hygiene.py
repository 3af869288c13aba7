"""No test passes or fails by wall-clock time (issue 30): every ``timeout=`` in the suite is the shared hang guard
(an hour), and no test runs a script with a time budget that could cut its work on a busy machine."""

import re
from pathlib import Path

from helpers.limits import HANG_GUARD_S

TESTS = Path(__file__).resolve().parent


def sources():
    return [p for p in TESTS.rglob("*.py") if p.name != Path(__file__).name]


def test_every_timeout_in_the_suite_is_the_hang_guard():
    bad = []
    for path in sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"\btimeout\s*=\s*([^,)\s]+)", line):
                if m.group(1) not in ("HANG_GUARD_S", "timeout"):  # the guard, or a helper passing it on
                    bad.append(f"{path.relative_to(TESTS)}:{n}: {line.strip()}")
    assert not bad, "a wall-clock limit that can decide a test:\n" + "\n".join(bad)
    assert HANG_GUARD_S >= 3600


def test_no_test_gives_a_script_a_time_budget():
    pattern = re.compile(r"--budget-s|budget_s\s*=|time_budget")
    # (a test of how a script parses a budget, without running it, is not a budget)
    bad = [f"{p.relative_to(TESTS)}:{n}" for p in sources()
           for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line) and ".parse(" not in line]  # fmt: skip
    assert not bad, bad
