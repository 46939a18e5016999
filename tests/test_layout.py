"""Imports point down the flow: each part of `service` imports only the parts below it (README, "Layout").

Every module's imports are read with `ast`, those under `if TYPE_CHECKING:` and inside functions included,
so a change that makes a lower stage reach up fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
SHARED = {"fhir", "outcome", "logs", "metrics"}
# The parts of `service` (a top-level module or a stage folder) each part may import, besides itself.
ALLOWED = {
    **{name: SHARED for name in SHARED},
    "config": SHARED,
    "hooks": SHARED | {"config", "rules"},
    "facts": SHARED | {"config", "rules"},
    "store": SHARED | {"config"},
    "gather": SHARED | {"config", "hooks"},
    "evaluate": SHARED | {"config", "hooks", "gather", "facts", "rules"},
    "population": SHARED | {"config", "hooks", "gather", "facts", "rules", "evaluate", "store"},
    "web": SHARED | {"config", "hooks", "gather", "facts", "rules", "evaluate", "store", "population"},
    "cli": SHARED | {"config", "hooks", "gather", "facts", "rules", "evaluate", "store", "population", "web"},
}
# Third-party packages that belong to one stage: (package, the parts that may import it).
CONFINED = [
    ("flask", {"web"}),
    ("werkzeug", {"web"}),
    ("requests", {"gather", "web", "cli"}),
    ("durable", {"evaluate/engine.py"}),
]


def part_of(path: Path) -> str:
    """Name the part a module belongs to: its stage folder, or its own name for a top-level module."""
    relative = path.relative_to(SERVICE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported(path: Path, source: str | None = None) -> set[str]:
    """Every module name this file imports, absolute, wherever the import statement stands."""
    names = set()
    package = ["service", *path.relative_to(SERVICE).parent.parts]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) - node.level + 1], node.module or ""]).strip(".")
            if not node.level:
                base = node.module or ""
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def target_part(name: str) -> str | None:
    """Name the part of `service` (or `rules`) an imported module belongs to; None for anything else."""
    parts = name.split(".")
    if parts[0] == "rules":
        return "rules"
    if parts[0] != "service" or len(parts) < 2:
        return None
    if (SERVICE / parts[1]).is_dir() or (SERVICE / f"{parts[1]}.py").is_file():
        return parts[1]
    return None  # `from service import x` where x is no module (e.g. __version__)


MODULES = sorted(SERVICE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_imports_point_down_the_flow(path):
    part = part_of(path)
    if part == "__init__":
        return  # the package marker imports nothing
    assert part in ALLOWED, f"{part} is a new part of service: give it a place in ALLOWED"
    reached = {target_part(name) for name in imported(path)} - {None, part}
    assert reached <= ALLOWED[part], (
        f"{path.relative_to(ROOT)} reaches up to {sorted(reached - ALLOWED[part])}"
    )


@pytest.mark.parametrize("package, allowed", CONFINED, ids=[c[0] for c in CONFINED])
def test_third_party_packages_stay_in_their_stage(package, allowed):
    offenders = []
    for path in MODULES:
        where = {part_of(path), str(path.relative_to(SERVICE))}
        if not where & allowed and any(n == package or n.startswith(f"{package}.") for n in imported(path)):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"{package} is imported outside {sorted(allowed)}: {offenders}"


def test_rules_import_nothing_of_service():
    for path in sorted((ROOT / "rules").rglob("*.py")):
        names = {
            n for n in imported(SERVICE / "x.py", path.read_text(encoding="utf-8")) if n.startswith("service")
        }
        assert not names, f"{path.relative_to(ROOT)} imports {sorted(names)}"


def test_the_rule_reads_conditional_and_relative_imports():
    # The check must see what TYPE_CHECKING hides, or a circle can hide behind it.
    module = SERVICE / "facts" / "labs.py"
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from service.web import app\n"
    relative = "def f():\n    from ..evaluate import cards\n"
    assert "service.web.app" in imported(module, hidden)
    assert "service.evaluate.cards" in imported(module, relative)
    assert {target_part("service.web.app"), target_part("service.evaluate.cards")}.isdisjoint(
        ALLOWED["facts"]
    )
