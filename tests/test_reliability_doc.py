"""docs/reliability.md's table names, for each fault, the tests that prove its outcome: each named test must
exist and run under `make faults` (the `faults` marker, or the 4-rank `rehearsal4` ones under `make rehearsal`)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

DOC = REPO / "docs" / "reliability.md"
# `file.py::name` or, continuing the previous file in the same cell, `::name`; `[...]` stands for the parameters.
NAMED = re.compile(r"`(?:(test_\w+\.py))?::(test_\w+)(?:\[\.\.\.\])?`")


def named_tests() -> list[tuple[str, str]]:
    found = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = None
        for file_name, test_name in NAMED.findall(line):
            current = file_name or current
            assert current, f"docs/reliability.md: `::{test_name}` without a file before it in: {line[:80]}"
            found.append((current, test_name))
    return found


def marked_for_faults(source: str, test_name: str) -> bool:
    """The test's own decorators, or the module's pytestmark, include faults (or rehearsal4)."""
    module_marks = re.search(r"^pytestmark = (.*)$", source, re.M)
    if module_marks and re.search(r"mark\.(faults|rehearsal4)\b", module_marks.group(1)):
        return True
    definition = re.search(rf"^def {test_name}\(", source, re.M)
    # Its decorators: everything between the previous top-level block (two blank lines) and the def.
    decorators = source[:definition.start()].rsplit("\n\n\n", 1)[-1] if definition else ""
    return bool(re.search(r"mark\.(faults|rehearsal4)\b", decorators))


def test_every_test_the_fault_table_names_exists_and_runs_under_make_faults():
    named = named_tests()
    assert len(named) > 40
    problems = []
    for file_name, test_name in named:
        path = REPO / "tests" / file_name
        source = path.read_text() if path.is_file() else ""
        if not re.search(rf"^def {test_name}\(", source, re.M):
            problems.append(f"{file_name}::{test_name}: no such test")
        elif not marked_for_faults(source, test_name):
            problems.append(f"{file_name}::{test_name}: not marked @pytest.mark.faults")
    assert not problems, "docs/reliability.md:\n" + "\n".join(problems)


def test_the_fault_table_has_no_placeholder_left():
    assert not re.search(r"\b[A-Z_]+_ROWS\b", DOC.read_text())
    assert Path(DOC).read_text().count("| fault | outcome | test |") >= 6
