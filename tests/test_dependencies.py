"""Every third-party module otr imports is a declared dependency, so `pip install otr-cli` (plus the
extra that names an optional feature) brings everything a command imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from helpers import REPO

# The `dev` extra holds the test tools; a module otr itself imports must come with a user-facing one.
TEST_ONLY_EXTRAS = {"dev"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module name -> one file that imports it (absolute imports only)."""
    modules: dict[str, str] = {}
    for path in sorted((REPO / "otr_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                modules.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return modules


def _declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, extra_requirements in project.get("optional-dependencies", {}).items():
        if extra not in TEST_ONLY_EXTRAS:
            requirements += extra_requirements
    return {_requirement_name(requirement) for requirement in requirements}


def test_every_third_party_import_is_a_declared_dependency():
    distributions_of = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = []
    for module, importer in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module == "otr_cli":
            continue
        # A module of an optional extra that is not installed here (vllm) is named like its distribution.
        distributions = distributions_of.get(module, [module])
        if not any(_canonical(distribution) in declared for distribution in distributions):
            undeclared.append(f"{module} (imported by {importer}; distribution {', '.join(distributions)})")
    assert not undeclared, "imported but not in pyproject.toml's dependencies or extras: " + "; ".join(undeclared)
