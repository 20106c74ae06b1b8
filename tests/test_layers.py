"""The package's import graph: no cycle anywhere (function-level imports included), and evaluation
in layers, each module importing only from the floors below it (m2mix_openclip/datasets.py)."""

import ast
import os

import pytest

import m2mix_openclip

PACKAGE = "m2mix_openclip"
SOURCES = os.path.dirname(os.path.dirname(os.path.abspath(m2mix_openclip.__file__)))

# evaluation's floors: 0 maths, 1 inputs, 2 tasks, 3 tools (the figures, table and file helpers
# that only tools use, plots.py, report.py, atomic.py, stand outside them)
FLOORS = {
    "metrics": 0, "retrieval": 0,
    "datasets": 1, "models": 1, "encode": 1,
    "evaluation": 2, "zeroshot": 2, "simat": 2,
    "analyze": 3, "demo": 3, "export": 3, "results": 3, "integration.zeroshot_hook": 3, "integration.metrics": 3,
    "wiseft": 3, "labelled_pairs": 3,
}
# imports within one floor, each one way round (the cycle test keeps them from turning back)
SAME_FLOOR = {("retrieval", "metrics"), ("encode", "datasets"), ("evaluation", "zeroshot"),
              ("analyze", "results"), ("demo", "results"), ("wiseft", "results"),
              ("wiseft", "integration.zeroshot_hook")}


def package_modules(sources=SOURCES, package=PACKAGE):
    """Module name -> (file, is a package's __init__), for the package in folder ``sources``."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(sources, package)):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, sources)[:-3].split(os.sep)
                is_package = parts[-1] == "__init__"
                modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(sources=SOURCES, package=PACKAGE):
    """Module -> the package's modules it imports anywhere in its file (top level, functions,
    TYPE_CHECKING blocks). ``from .a import b`` counts as importing ``a.b`` where that is a
    module, else ``a``; a module's implicit import of its parent packages does not count."""
    modules = package_modules(sources, package)
    graph = {}
    for name, (path, is_package) in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    targets.add(child if child in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from .a import run\n",
        "pkg/a.py": "def run():\n    from .sub import b\n    return b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import c\nimport pkg.sub.d\n",
        "pkg/sub/d.py": "",
        "pkg/c.py": "def later():\n    from pkg.a import run\n    return run\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(str(tmp_path), "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c", "pkg.sub.d"},
                     "pkg.sub.d": set(), "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]  # through two function-level imports
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_evaluation_modules_import_only_from_lower_floors(module):
    graph = import_graph()
    name = f"{PACKAGE}.{module}"
    assert name in graph, f"{name} is gone: update FLOORS"
    for target in graph[name]:
        short = target[len(PACKAGE) + 1:]
        if short in FLOORS:
            assert FLOORS[short] < FLOORS[module] or (FLOORS[short] == FLOORS[module] and
                                                      (module, short) in SAME_FLOOR), f"{module} imports {short}"


def test_moved_names_are_still_importable_where_users_found_them():
    from m2mix_openclip import datasets, encode, evaluation, metrics, models, retrieval, zeroshot
    moved = {
        evaluation: {"load_pairs": datasets, "group_by_image": datasets, "open_image": datasets,
                     "load_model": models, "encode": encode, "encode_images": encode, "encode_texts": encode,
                     "encode_grouped": encode, "class_text_features": encode,
                     "expected_calibration_error": metrics, "embedding_geometry": metrics,
                     "grouped_retrieval": retrieval, "retrieval_metrics": retrieval,
                     "embedding_arithmetic": retrieval, "zero_shot_metrics": zeroshot},
        zeroshot: {"LabelledSet": datasets, "load_labelled_set": datasets, "parse_class_names": datasets,
                   "parse_templates": datasets, "zero_shot_classifier": encode, "zero_shot_logits": encode,
                   "zero_shot_scores": metrics},
    }
    for module, names in moved.items():
        for name, home in names.items():
            assert getattr(module, name) is getattr(home, name), f"{module.__name__}.{name}"
            assert name in module.__all__


# The package's floors, as docs/contributing.md states them: the maths, then evaluation, then the
# integration with OpenCLIP's trainer, then the tools. Leaves import nothing of the package but
# other leaves, and any floor may use them: the version adapter (every OpenCLIP difference), the
# protocol module (which patches carry verbatim), quiet logging, atomic files.
LEAVES = {"integration.openclip_compat", "integration.plugins", "integration.quiet", "atomic"}
MATHS = ("mixup", "losses", "metrics", "retrieval")
TOOLS = ("analyze", "demo", "data", "train", "results", "plots", "report", "wiseft", "export")


def _short(name):
    return name[len(PACKAGE) + 1:]


def _in(short, prefixes):
    return any(short == p or short.startswith(p + ".") for p in prefixes)


def test_leaves_import_nothing_of_the_package_but_leaves():
    graph = import_graph()
    for leaf in LEAVES:
        assert {_short(t) for t in graph[f"{PACKAGE}.{leaf}"]} <= LEAVES, leaf


def test_the_maths_imports_only_the_maths_and_the_leaves():
    graph = import_graph()
    for name, targets in graph.items():
        if _in(_short(name), MATHS):
            wrong = sorted(t for t in map(_short, targets) if not (_in(t, MATHS) or t in LEAVES))
            assert wrong == [], f"{_short(name)} imports {wrong}"


def test_nothing_below_the_tools_imports_a_tool():
    graph = import_graph()
    for name, targets in graph.items():
        short = _short(name)
        if short and not _in(short, TOOLS):
            wrong = sorted(t for t in map(_short, targets) if _in(t, TOOLS))
            assert wrong == [], f"{short} imports the tool module(s) {wrong}"
