"""The project's layers import only downwards (README "Layout"):

    core      utils/ (all but utils/training.py)   third-party and other core modules only
    models    models/, models/trellis/              + core
    datasets  datasets/                             + core, models
    data      data_rendering/ (making samples, mesh readers) + core, models, datasets
    pipeline  pipeline/ (inference stages)          + core, models, datasets, data (a mesh canonical is read by
                                                      data_rendering's readers)
    training  utils/training.py                     + core, models, datasets
    top       entry scripts at the root, scripts/, benchmarks/ (and tests): may import anything

Every Import/ImportFrom node of every .py counts, lazy imports inside functions included. A failure lists each
offending (module, import) pair."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models", "datasets", "pipeline", "data_rendering", "scripts", "benchmarks")
TOP_MODULES = {p.stem for p in ROOT.glob("*.py")} | {"scripts", "benchmarks", "tests"}
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "datasets": {"core", "models", "datasets"},
    "data": {"core", "models", "datasets", "data"},
    "pipeline": {"core", "models", "datasets", "data", "pipeline"},
    "training": {"core", "models", "datasets", "training"},
    "top": {"core", "models", "datasets", "data", "pipeline", "training", "top"},
}


def layer(module: str) -> str | None:
    """The layer of a dotted project module name; None for a module outside the project (stdlib, third-party)."""
    head = module.split(".")[0]
    if module == "utils.training" or module.startswith("utils.training."):
        return "training"
    if head == "utils":
        return "core"
    if head in ("models", "datasets", "pipeline"):
        return head
    if head == "data_rendering":
        return "data"
    if head in TOP_MODULES:
        return "top"
    return None


def project_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the project packages and the root scripts."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(module: str, path: Path, known: set[str]) -> list[str]:
    """Every module that `module` imports, anywhere in its file. `from pkg import name` names pkg.name where that is
    a project module (`from utils import training` is an import of utils.training), else pkg."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                found.append(full if full in known else base)
    return found


def violations() -> list[tuple[str, str]]:
    files = project_files()
    bad = []
    for module, path in sorted(files.items()):
        own = layer(module)
        for imported in imported_modules(module, path, set(files)):
            other = layer(imported)
            if other is not None and other not in ALLOWED[own]:
                bad.append((module, imported))
    return sorted(set(bad))


def test_every_layer_has_modules():
    layers = {layer(m) for m in project_files()}
    assert layers >= set(ALLOWED), f"layers with no module: {set(ALLOWED) - layers}"


def test_imports_only_go_downwards():
    bad = violations()
    listing = "\n".join(f"  {module} ({layer(module)}) imports {imported} ({layer(imported)})"
                        for module, imported in bad)
    if bad:
        print("layer violations:\n" + listing)
    assert not bad, "modules importing upwards:\n" + listing


def test_the_walk_sees_lazy_and_from_imports(tmp_path):
    """The checker itself: imports inside functions count, and `from utils import training` is the training layer."""
    path = tmp_path / "mod.py"
    path.write_text("import torch\nfrom utils import cli, training\n\n"
                    "def f():\n    from datasets.vae_dataset import VAEDataset\n    import pipeline.animate\n")
    found = imported_modules("utils.mod", path, {"utils.cli", "utils.training"})
    assert found == ["torch", "utils.cli", "utils.training", "datasets.vae_dataset", "pipeline.animate"]
    assert [layer(m) for m in found] == [None, "core", "training", "datasets", "pipeline"]
