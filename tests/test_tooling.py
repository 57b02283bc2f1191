"""The house rules that tools check: ruff (lint + format) and the import-linter layer contracts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install the dev extra (make test does)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_is_clean() -> None:
    out = _run(_tool("ruff"), "check", "dfm", "tests", "examples")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_clean() -> None:
    out = _run(_tool("ruff"), "format", "--check", "dfm", "tests", "examples")
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_contracts_hold() -> None:
    out = _run(_tool("lint-imports"), "--no-cache")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" not in out.stdout.lower() or " 0 broken" in out.stdout.lower(), out.stdout


def test_import_linter_catches_a_domain_violation(tmp_path: Path) -> None:
    """The contracts are live: a domain module importing diffusers breaks them."""
    bad = ROOT / "dfm" / "domain" / "_contract_probe.py"
    bad.write_text("import diffusers  # noqa: F401\n")
    try:
        out = _run(_tool("lint-imports"), "--no-cache")
    finally:
        bad.unlink()
    assert out.returncode != 0
    assert "dfm.domain._contract_probe" in out.stdout


FORBIDDEN_IN_DOMAIN = ("torch.distributed", "torch.multiprocessing", "os", "pathlib", "io", "logging", "socket")


def _imported_modules(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_domain_has_no_distributed_io_or_logging_imports() -> None:
    """Rule 1 for what import-linter cannot express (subpackages of torch, stdlib I/O and logging)."""
    offenders = []
    for path in sorted((ROOT / "dfm" / "domain").rglob("*.py")):
        for name in _imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_DOMAIN):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, "dfm/domain must stay pure (DESIGN.md rule 1):\n" + "\n".join(offenders)
