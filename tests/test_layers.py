"""The import graph keeps the layers of ARCHITECTURE.md: data flows one way, and the inference
path (models, diffusion, retrieval, pipeline, report, server) never needs the training package.

Every import statement is read with ``ast`` (including imports inside functions, which run
later but are dependencies all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# io -> data -> models/diffusion/retrieval -> pipeline -> report/evaluation -> app. Modules of
# one layer may import each other; a module may import any lower layer, never a higher one.
LAYERS: dict[str, int] = {
    "lib": 0,  # the package marker (lib/__init__.py)
    "lib.io": 0,
    "lib.progress": 0,
    "lib.data": 1,
    "lib.metrics": 1,
    "lib.consistency": 1,
    "lib.presets": 1,
    "lib.models": 2,
    "lib.diffusion": 2,
    "lib.retrieval": 2,
    "lib.reconstruction": 2,
    "lib.reconstruction_methods": 2,
    "lib.reconstruction_options": 2,
    "lib.options_schema": 2,
    "lib.pipeline": 3,
    "lib.train": 3,
    "lib.report": 4,
    "lib.evaluation": 4,
    "app": 5,
    "bench": 5,
    "main": 5,
}
# Only these may import the training package (issue 18): the training code itself and the
# command line that starts it, and the benchmark/diagnostic scripts that time it.
MAY_IMPORT_TRAIN = ("lib.train", "app.cli", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer of a project module (the longest matching prefix), None for third-party ones."""
    matches = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if layer_of(node.module) is not None:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names if layer_of(alias.name) is not None)
    return found


def source_files() -> list[Path]:
    files = [ROOT / "main.py"]
    for folder in ("lib", "app", "bench"):
        if (ROOT / folder).is_dir():
            files.extend(sorted((ROOT / folder).rglob("*.py")))
    return files


def test_every_module_has_a_layer() -> None:
    """A new top-level module must be placed in the layer table, or this check would skip it."""
    missing = [module_name(path) for path in source_files() if layer_of(module_name(path)) is None]
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


@pytest.mark.parametrize("path", source_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_import_runs_up_the_layers(path: Path) -> None:
    importer = module_name(path)
    own = layer_of(importer)
    upward = [
        f"line {line}: {module} (layer {layer_of(module)})"
        for line, module in project_imports(path)
        if layer_of(module) > own
    ]
    assert not upward, f"{importer} (layer {own}) imports a higher layer: {upward}"


def may_import_train(path: Path) -> bool:
    importer = module_name(path)
    return any(importer == name or importer.startswith(name + ".") for name in MAY_IMPORT_TRAIN)


@pytest.mark.parametrize(
    "path", [p for p in source_files() if not may_import_train(p)], ids=lambda path: str(path.relative_to(ROOT))
)
def test_only_training_code_imports_the_training_package(path: Path) -> None:
    importer = module_name(path)
    train = [
        f"line {line}: {module}" for line, module in project_imports(path) if module.split(".")[:2] == ["lib", "train"]
    ]
    assert not train, f"{importer} imports the training package: {train}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above would pass vacuously if the import reader found nothing."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from lib.train.loop import train\n    import app.cli\n")
    assert project_imports(sample) == [(2, "lib.train.loop"), (3, "app.cli")]
    assert layer_of("lib.train.loop") == 3 and layer_of("lib.io.nifti") == 0 and layer_of("numpy") is None
