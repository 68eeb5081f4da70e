"""The package's import graph: one-way, no cycle (module-level and function-level imports both count)."""

import ast
import os

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "aira_moe")


def package_imports() -> dict[str, set[str]]:
    """module -> the aira_moe modules it imports anywhere in its source (dotted names, relative imports resolved)."""
    graph = {}
    for folder, _, files in os.walk(SRC):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            parts = ["aira_moe"] + os.path.relpath(path, SRC)[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            package = module if is_package else module.rsplit(".", 1)[0]
            targets = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    base = package.split(".")
                    if node.level:
                        base = base[: len(base) - node.level + 1]
                        name = ".".join(base + ([node.module] if node.module else []))
                    else:
                        name = node.module or ""
                    if name.startswith("aira_moe"):
                        targets.add(name)
                        targets.update(f"{name}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names if alias.name.startswith("aira_moe."))
            graph[module] = targets
    return {module: {t for t in targets if t in graph and t != module} for module, targets in graph.items()}


def test_import_graph_has_no_cycle_between_modules():
    graph = package_imports()
    # a package's __init__ re-exporting its own submodules is not a cycle of the design; leave those edges out
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and m in ("aira_moe", "aira_moe.tuner",
                                                                         "aira_moe.calibration", "aira_moe.evaluation",
                                                                         "aira_moe.export", "aira_moe.integrations"))}
             for m, ts in graph.items()}
    assert "aira_moe.tuner.calibrate" in graph and "aira_moe.tuner.model" in graph
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in edges[node]:
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_calibration_is_math_and_evaluation_does_not_import_integrations():
    graph = package_imports()
    for module, targets in graph.items():
        if module.startswith("aira_moe.calibration"):
            assert all(t.startswith("aira_moe.calibration") for t in targets), (module, targets)
        if module.startswith("aira_moe.evaluation"):
            assert not any(t.startswith("aira_moe.integrations") for t in targets), (module, targets)


def test_tuner_does_not_import_export():
    """export reads the tuner (to_lora_adapter, export_lora); the tuner never reaches up into export."""
    graph = package_imports()
    assert "aira_moe.export.lora" in graph and "aira_moe.tuner.model" in graph
    for module, targets in graph.items():
        if module.startswith("aira_moe.tuner"):
            assert not any(t.startswith("aira_moe.export") for t in targets), (module, targets)


def test_strategy_names_are_compared_only_by_the_registry_and_the_config():
    """A strategy is asked for what it does, never recognised by its name: outside the strategy registry
    (tuner/strategies/) and the config that parses ``cola_strategy``, no comparison involves a strategy's name."""
    from aira_moe.tuner.strategies import STRATEGIES

    repo = os.path.join(SRC, "..", "..")
    allowed = {os.path.join("src", "aira_moe", "tuner", "strategies"), os.path.join("src", "aira_moe", "tuner", "config.py")}
    found = []
    for top in ("src", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(repo, top)):
            for file in files:
                relative = os.path.relpath(os.path.join(folder, file), repo)
                if not file.endswith(".py") or any(relative.startswith(prefix) for prefix in allowed):
                    continue
                for node in ast.walk(ast.parse(open(os.path.join(repo, relative), encoding="utf-8").read())):
                    # (about a strategy: `solver == "full"` names the SVD, not a strategy)
                    if not isinstance(node, ast.Compare) or "strateg" not in ast.unparse(node):
                        continue
                    literals = [leaf.value for side in (node.left, *node.comparators) for leaf in ast.walk(side)
                                if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str)]
                    found += [f"{relative}:{node.lineno} {name!r}" for name in literals if name in STRATEGIES]
    assert not found, found
