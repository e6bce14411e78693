"""User docs stand alone: they name no file outside the repository, no internal notes, no issue numbers."""

from __future__ import annotations

import re

from helpers import REPO

# What only the people building otr have: the test data beside the checkout, the design notes, the
# issue tracker, the machine the project is developed on.
NOT_FOR_USERS = re.compile(r"\.\./shared|shared/data|DESIGN(\.md)?\b|\b[Tt]his VM\b|\b[Ii]ssue[ -]?#?\d+|(?<![\w&])#\d+\b")


def user_facing_files():
    yield REPO / "README.md"
    yield from sorted((REPO / "docs").rglob("*.md"))
    yield from sorted((REPO / "recipes").rglob("*.yaml"))


def test_user_docs_and_recipes_name_no_repository_test_data_design_notes_or_issue_numbers():
    found = []
    for path in user_facing_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if NOT_FOR_USERS.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not found, "user docs must stand alone (use hub ids, docs/ links):\n" + "\n".join(found)
