"""The layer map of README's Architecture section, checked against every import in the package (lazy
imports inside functions included): a module imports only from its own package or from a lower layer."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskllm_megatron"

#: Bottom to top; the units of one layer never import each other. Keep README's map the same.
LAYERS = (
    ("cache",),  # the cache folder and content digests
    ("checkpoint_folders", "launch", "assets"),  # folder kinds, read and written atomically; CLI launch; downloads
    ("run_folder",),  # a run's checkpoints: naming, which one a run means, latest, rotation
    ("masks",),  # pure torch: patterns, sampling, kernels, schedules
    ("prune", "inference"),  # pure torch: one-shot methods and reconstruction; compressed N:M linears (+ C++)
    ("megatron",),  # the glue: masked layers, sparsify, priors, process groups, checkpoints
    ("convert", "data", "run_config"),  # HF <-> megatron-core; tokenizers and indexed datasets; the run's config
    ("train", "run_checkpoint"),  # the driver; a run checkpoint as export and eval read it (not via the driver)
    ("export", "eval"),  # the tools that read run checkpoints
    ("demo",),
)


def _layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"maskllm_megatron.{unit} is in no layer: add it to LAYERS and to README's map")


def _imports(path: Path, module: str | None = None) -> set[str]:
    """The project modules ``path`` (the module named ``module``, by default its place in the package)
    imports, as absolute names."""
    module = module or ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "maskllm_megatron":  # from maskllm_megatron import assets
                out.update(f"{name}.{a.name}" for a in node.names)
            elif name.startswith("maskllm_megatron."):
                out.add(name)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("maskllm_megatron."))
    return out


def test_each_layer_imports_only_from_the_layers_below_it():
    wrong = []
    files = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)
    assert len(files) > 40
    for path in files:
        unit = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for target in _imports(path):
            other = target.split(".")[1]
            if other != unit and _layer_of(other) >= _layer_of(unit):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The walker itself: a function-level relative import is found and resolved."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..train.config import TrainConfig\n    import maskllm_megatron.eval.perplexity\n"
                     "    from maskllm_megatron import demo\n")
    assert _imports(probe, "maskllm_megatron.masks.probe") == {
        "maskllm_megatron.train.config", "maskllm_megatron.eval.perplexity", "maskllm_megatron.demo"}
