"""The layering of the package, checked from the source (AST) and by importing.

    checkpoints_conversion -> recurrent_lm.models.<arch> -> layers -> core -> penzai, jax

sampling, interp, lora and params know no architecture; train finds them by
name through the registry; nothing registers itself at import.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from recurrent_lm.core import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recurrent_lm"
ARCHITECTURE_MODULES = {f"recurrent_lm.models.{name}" for name in registry.names()}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(*relative: str) -> list[pathlib.Path]:
    files = []
    for rel in relative:
        path = PACKAGE / rel
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        assert found, f"{path} holds no Python files: the check would pass vacuously"
        files.extend(found)
    return files


def offenders(files, forbidden) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if forbidden(name)
    )


def is_architecture(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in ARCHITECTURE_MODULES)


def test_core_imports_nothing_above_it():
    above = ("recurrent_lm.layers", "recurrent_lm.models", "recurrent_lm.sampling",
             "recurrent_lm.train", "recurrent_lm.interp", "recurrent_lm.lora", "checkpoints_conversion")
    assert offenders(sources("core"), lambda n: n.startswith(above)) == []


def test_layers_import_no_models():
    assert offenders(sources("layers"), lambda n: n.startswith(("recurrent_lm.models", "checkpoints_conversion"))) == []


def test_generic_modules_import_no_architecture():
    files = sources("sampling", "interp.py", "lora.py", "params.py", "checkpoint.py", "train",
                    "__init__.py", "models/__init__.py", "layers/__init__.py")
    assert offenders(files, is_architecture) == []


def test_models_depend_on_no_converter_and_no_other_architecture():
    for path in sources("models"):
        own = module_name(path)
        assert offenders([path], lambda n, own=own: n.startswith("checkpoints_conversion")
                         or (is_architecture(n) and not n.startswith(own))) == []


def test_package_never_imports_converters():
    # demo.py is the main job, an application on top of every floor (it
    # round-trips the official format); no library module imports a converter.
    library = [p for p in sources(".") if p.name != "demo.py"]
    assert offenders(library, lambda n: n.startswith("checkpoints_conversion")) == []


@pytest.mark.parametrize("package", ["recurrent_lm", "recurrent_lm.layers", "recurrent_lm.sampling",
                                     "recurrent_lm.interp", "recurrent_lm.train"])
def test_importing_loads_no_architecture(package):
    code = (f"import sys, {package}; "
            "print(sorted(m for m in sys.modules if m.startswith('recurrent_lm.models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", registry.names())
def test_every_architecture_is_reachable_by_name(name):
    architecture = registry.get(name)
    assert architecture.name == name
    assert architecture.config_class.model_type == name


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown architecture 'retnet'; known: \['gemma'"):
        registry.get("retnet")


def test_no_environment_variable_hooks():
    """Production code reads no RECURRENT_LM_TEST* switch (tests inject faults from outside)."""
    for path in sources(".") + sorted((ROOT / "checkpoints_conversion").rglob("*.py")):
        assert "RECURRENT_LM_TEST" not in path.read_text(), path


def test_no_function_over_100_lines():
    long = []
    for path in sources(".") + sorted((ROOT / "checkpoints_conversion").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []
