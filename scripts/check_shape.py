"""Guard rails of the house that import-linter cannot express (run by ``make lint``):

- no class in ``broker/`` with more than 15 public methods, and no module over 600 lines
  unless its docstring says why in a line starting ``Size:``. A god object or a grab-bag
  module grows one method at a time; this fails the build the day it crosses the line
  instead of the day someone notices;
- the environment is read only by ``broker/config.py`` (the one loader), and by the two
  places that are not configuration: brokerctl's ``BROKER_URL``/``BROKER_ADMIN_TOKEN``
  defaults (an HTTP client that never loads settings) and ``broker dev``'s OpenBao child,
  whose environment is cleaned of ``VAULT_*``/``BAO_*``; and the Alembic script's
  ``BROKER_STORE_URL``, read only when the ``alembic`` CLI runs it by hand.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_PUBLIC_METHODS = 15
MAX_MODULE_LINES = 600
READS_ENVIRONMENT = {"config.py", "cli/ctl.py", "dev/openbao.py", "leases/schema/env.py"}


def _reads_environment(tree: ast.AST) -> int | None:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in ("environ", "getenv", "environb", "putenv")
        ):
            return node.lineno
    return None


def problems(root: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        lines = source.count("\n")
        doc = ast.get_docstring(tree) or ""
        line = _reads_environment(tree)
        if line is not None and path.relative_to(root).as_posix() not in READS_ENVIRONMENT:
            found.append(
                f"{path}:{line}: reads the environment; settings come from broker/config.py"
            )
        if lines > MAX_MODULE_LINES and not any(
            line.startswith("Size:") for line in doc.splitlines()
        ):
            found.append(
                f"{path}: {lines} lines (limit {MAX_MODULE_LINES}); split it, or say why "
                "in a 'Size:' line of its docstring"
            )
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            public = [
                f.name
                for f in node.body
                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                and not f.name.startswith("_")
            ]
            if len(public) > MAX_PUBLIC_METHODS:
                found.append(
                    f"{path}:{node.lineno}: class {node.name} has {len(public)} public "
                    f"methods (limit {MAX_PUBLIC_METHODS}); give each consumer its own"
                )
    return found


def main() -> int:
    found = problems(Path(sys.argv[1] if len(sys.argv) > 1 else "broker"))
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
