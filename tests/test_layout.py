"""The package's folders are layers (hf_transfer/__init__.py): a module imports only from its own folder and the
folders below it, so that a newcomer reads the project bottom up and no change to a lower layer needs a higher one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_transfer"
# Top to bottom. errors.py (the package's root) is below everything.
LAYERS = ["cli", "tools", "run", "config", "trainers", "data", "models", "on_device", "tasks", "integrations", ""]


def _imports(path: Path) -> set[str]:
    """The package folders (or "" for a root module) that `path` imports from."""
    package = list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: from the module's own package, up level - 1
            target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "hf_transfer":
            target = node.module.split(".")[1:]
        else:
            continue
        found.add(target[0] if target and (PACKAGE / target[0]).is_dir() else "")
    return found


def test_every_import_goes_down_the_layers():
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS[:-1])
    upward = []
    for path in PACKAGE.rglob("*.py"):
        folder = path.relative_to(PACKAGE).parts[0] if path.parent != PACKAGE else ""
        folder = "cli" if path.name == "__main__.py" else folder  # `python -m hf_transfer` is an entry point
        upward += [f"{path.relative_to(PACKAGE)} imports {target}/" for target in _imports(path)
                   if LAYERS.index(target) < LAYERS.index(folder)]
    assert not upward, upward
