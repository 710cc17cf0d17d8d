"""The package's shape: commands apart from the library."""

import ast
from pathlib import Path

import editflow

PACKAGE = Path(editflow.__file__).parent
# entry points that run a command: `editflow` (cli), `python -m editflow.train`, `accelerate launch -m editflow.preencode`
ENTRY_POINTS = {"cli.py", "train.py", "preencode.py"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_a_command_module():
    library = [p for p in PACKAGE.rglob("*.py") if "commands" not in p.relative_to(PACKAGE).parts
               and str(p.relative_to(PACKAGE)) not in ENTRY_POINTS]
    assert len(library) > 20  # the walk found the package
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("editflow.commands"))
                 for p in library}
    assert not {k: v for k, v in offenders.items() if v}, "library modules import commands"


def test_every_cli_command_is_a_module_of_commands():
    from editflow.cli import COMMANDS

    for name, (module, usage) in COMMANDS.items():
        assert module == f"editflow.commands.{name}" and (PACKAGE / "commands" / f"{name}.py").is_file()
        assert usage and all(line.startswith(f"editflow {name}") for line in usage)
