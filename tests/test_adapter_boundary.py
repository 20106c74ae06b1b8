"""Every OpenCLIP version difference is answered by ``integration/openclip_compat.py``: no other
module of the package tests OpenCLIP's version or features itself.

The package's source is read (not run) and these count as a version or feature test:

- a version: ``__version__`` or ``open_clip.version`` of OpenCLIP, or the installed
  ``open_clip_torch`` distribution's version or metadata;
- a feature: ``hasattr`` or ``getattr(..., default)`` on an OpenCLIP module, class or function
  (imported from ``open_clip``, ``open_clip_train`` or ``training``, or a trainer module loaded
  through the adapter), ``inspect.signature`` (or ``__code__`` and friends) of one, an OpenCLIP
  import inside ``try ... except ImportError``, ``find_spec`` of an OpenCLIP package;
- a trainer flag that not every supported release has (``FLAGS_NOT_IN_EVERY_RELEASE``), looked
  up with ``getattr(args, name, default)``, ``hasattr(args, name)``, ``name in vars(args)`` or
  ``vars(args).get(name)``;
- a ``#`` comment that names an OpenCLIP release ("OpenCLIP 2.20's ...", "before OpenCLIP 3.0")
  beside code that does not ask the adapter: code written for a release, answered elsewhere.
"""

import ast
import io
import os
import re
import tokenize

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "m2mix_openclip")
ADAPTER = os.path.join("integration", "openclip_compat.py")
OPENCLIP_PACKAGES = ("open_clip", "open_clip_train", "training")
# Read from each release's params.py (2.20.0 against 2.22.0 ... 3.3.0): the flags 2.20 lacks, by dest.
FLAGS_NOT_IN_EVERY_RELEASE = {"siglip", "device", "loss_dist_impl", "cache_dir", "momentum", "opt"}
# Calls that hand out OpenCLIP modules (the adapter's trainer, a module imported by name).
MODULE_GETTERS = {"require_trainer", "import_module", "__import__"}
INTROSPECTION = {"signature", "getfullargspec", "getargspec", "getcallargs"}
CODE_ATTRIBUTES = {"__code__", "__defaults__", "__kwdefaults__", "__signature__"}
RELEASE_COMMENT = re.compile(r"OpenCLIP\b.*\b\d+\.\d+|\b\d+\.\d+\b.*\bOpenCLIP\b")

def _is_openclip_module(name: str) -> bool:
    return name.split(".")[0] in OPENCLIP_PACKAGES


def _root(node):
    """``a`` of ``a.b[c].d``; None for anything else."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _is_vars(func) -> bool:
    """``func`` is ``vars(...).get``."""
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call) and _called_name(func.value) == "vars"


def _literal(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class ModuleFacts:
    """What one module binds to OpenCLIP objects, and the names it takes from the adapter."""

    def __init__(self, tree: ast.Module):
        self.openclip_names = set()
        self.adapter_names = {"openclip_compat"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_openclip_module(alias.name):
                        self.openclip_names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.level == 0 and _is_openclip_module(node.module):
                    self.openclip_names.update(a.asname or a.name for a in node.names)
                elif node.module.endswith("openclip_compat"):
                    self.adapter_names.update(a.asname or a.name for a in node.names)
        # Names bound to an OpenCLIP object, and functions that return one, until nothing changes.
        getters = set(MODULE_GETTERS)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        while True:
            before = (len(self.openclip_names), len(getters))
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and self._is_openclip_object(node.value, getters):
                    self.openclip_names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            for function in functions:
                if any(isinstance(n, ast.Return) and n.value is not None and self._is_openclip_object(n.value, getters)
                       for n in ast.walk(function)):
                    getters.add(function.name)
            if (len(self.openclip_names), len(getters)) == before:
                break
        self.getters = getters

    def _is_openclip_object(self, node, getters=None) -> bool:
        """``node`` is an OpenCLIP module, class or function (not the result of calling one)."""
        root = _root(node)
        if isinstance(root, ast.Name):
            return root.id in self.openclip_names
        if isinstance(root, ast.Call):  # openclip_compat.require_trainer().main, a trainer module by name
            return _called_name(root) in (getters or self.getters)
        return False

    def asks_adapter(self, node) -> bool:
        return any(isinstance(n, ast.Name) and n.id in self.adapter_names for n in ast.walk(node))


def version_and_feature_tests(source: str):
    """``(line, what)`` for every OpenCLIP version or feature test in ``source``."""
    tree = ast.parse(source)
    facts = ModuleFacts(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _is_openclip_module(node.module):
            if node.module.endswith(".version") or any(a.name == "__version__" for a in node.names):
                found.append((node.lineno, f"imports OpenCLIP's version from {node.module}"))
        elif isinstance(node, ast.Attribute):
            if node.attr == "__version__" and facts._is_openclip_object(node.value):
                found.append((node.lineno, "reads OpenCLIP's __version__"))
            elif node.attr in CODE_ATTRIBUTES and facts._is_openclip_object(node.value):
                found.append((node.lineno, f"reads {node.attr} of an OpenCLIP callable"))
        elif isinstance(node, ast.Call):
            name, args = _called_name(node), node.args
            literals = [_literal(a) for a in args]
            if name == "hasattr" and len(args) == 2 and facts._is_openclip_object(args[0]):
                found.append((node.lineno, f"hasattr on an OpenCLIP object ({literals[1]!r})"))
            elif name == "getattr" and len(args) == 3 and facts._is_openclip_object(args[0]):
                found.append((node.lineno, f"getattr with a default on an OpenCLIP object ({literals[1]!r})"))
            elif name in ("getattr", "hasattr") and len(args) >= 2 and literals[1] in FLAGS_NOT_IN_EVERY_RELEASE \
                    and (name == "hasattr" or len(args) == 3):
                found.append((node.lineno, f"looks up the trainer flag {literals[1]!r}, which not every release has"))
            elif name == "get" and literals and literals[0] in FLAGS_NOT_IN_EVERY_RELEASE and _is_vars(node.func):
                found.append((node.lineno, f"looks up the trainer flag {literals[0]!r}, which not every release has"))
            elif name in INTROSPECTION and args and facts._is_openclip_object(args[0]):
                found.append((node.lineno, f"inspect.{name} of an OpenCLIP callable"))
            elif name in ("version", "metadata", "distribution", "requires") and "open_clip_torch" in literals:
                found.append((node.lineno, f"reads the installed open_clip_torch's {name}"))
            elif name == "find_spec" and literals and literals[0] and _is_openclip_module(literals[0]):
                found.append((node.lineno, f"find_spec({literals[0]!r})"))
        elif isinstance(node, ast.Compare) and _literal(node.left) in FLAGS_NOT_IN_EVERY_RELEASE \
                and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                and any(isinstance(c, ast.Call) and _called_name(c) == "vars" for c in node.comparators):
            found.append((node.lineno, f"looks up the trainer flag {_literal(node.left)!r}, which not every "
                                       "release has"))
        elif isinstance(node, ast.Try):
            catches_import_error = any(
                h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                           for n in ast.walk(h.type)) for h in node.handlers)
            imports = [n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
            if catches_import_error and any(
                    any(_is_openclip_module(a.name) for a in n.names) if isinstance(n, ast.Import)
                    else n.level == 0 and n.module and _is_openclip_module(n.module) for n in imports):
                found.append((node.lineno, "imports OpenCLIP inside try/except ImportError"))
    found.extend(_release_comments(source, tree, facts))
    return sorted(found)


def _release_comments(source: str, tree: ast.Module, facts: ModuleFacts):
    """``#`` comments that name an OpenCLIP release beside code that does not ask the adapter. An
    inline comment belongs to the innermost statement around its line (all of a compound one), a
    comment on a line of its own to the next statement."""
    statements = [n for n in ast.walk(tree) if isinstance(n, ast.stmt)]
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT or not RELEASE_COMMENT.search(token.string):
            continue
        line = token.start[0]
        own_line = not token.line[:token.start[1]].strip()
        if own_line:
            following = [s for s in statements if s.lineno > line]
            statement = min(following, key=lambda s: (s.lineno, -s.end_lineno), default=None)
        else:
            around = [s for s in statements if s.lineno <= line <= s.end_lineno]
            statement = min(around, key=lambda s: s.end_lineno - s.lineno, default=None)
        if statement is None or not facts.asks_adapter(statement):
            found.append((line, f"comment names an OpenCLIP release: {token.string.strip()}"))
    return found


def package_findings():
    findings = []
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, PACKAGE)
            if not name.endswith(".py") or relative == ADAPTER:
                continue
            with open(path, encoding="utf-8") as f:
                for line, what in version_and_feature_tests(f.read()):
                    findings.append((relative, line, what))
    return findings


def test_no_openclip_version_or_feature_test_outside_the_adapter():
    unexpected = [f"m2mix_openclip/{path}:{line}: {what}" for path, line, what in package_findings()]
    assert not unexpected, "ask integration/openclip_compat.py instead:\n" + "\n".join(unexpected)


# -- the detector finds what it is meant to find ---------------------------------------------------
@pytest.mark.parametrize("source, what", [
    ("from open_clip import loss as L\nif hasattr(L, 'SigLipLoss'):\n    pass\n", "hasattr on an OpenCLIP object"),
    ("import inspect\nfrom open_clip.loss import SigLipLoss\n"
     "x = 'dist_impl' in inspect.signature(SigLipLoss.__init__).parameters\n", "inspect.signature"),
    ("from open_clip.version import __version__\n", "imports OpenCLIP's version"),
    ("import open_clip\nold = open_clip.__version__ < '2.30'\n", "reads OpenCLIP's __version__"),
    ("import importlib.metadata as m\nv = m.version('open_clip_torch')\n", "open_clip_torch's version"),
    ("def f(args):\n    return getattr(args, 'loss_dist_impl', None)\n", "'loss_dist_impl'"),
    ("def f(args):\n    return 'siglip' in vars(args)\n", "trainer flag 'siglip'"),
    ("def f(args):\n    return vars(args).get('device')\n", "trainer flag 'device'"),
    ("try:\n    from open_clip_train import main\nexcept ImportError:\n    main = None\n", "try/except ImportError"),
    ("import importlib\ndef trainer(name):\n    return importlib.import_module('training.' + name)\n"
     "main = trainer('main')\nok = hasattr(main, 'get_latest_checkpoint')\n", "hasattr on an OpenCLIP object"),
    ("import open_clip\ntags = getattr(open_clip, 'list_pretrained_tags_by_model', None)\n", "getattr with a default"),
    ("def f(tokenizer=None):\n    # OpenCLIP 2.20's evaluate passes no tokenizer\n    return tokenizer\n",
     "comment names an OpenCLIP release"),
])
def test_the_detector_finds(source, what):
    assert any(what in found for _, found in version_and_feature_tests(source)), version_and_feature_tests(source)


@pytest.mark.parametrize("source", [
    "from . import openclip_compat\n"
    "flags, env = openclip_compat.device_arguments('cpu')  # no --device before OpenCLIP 2.28\n",
    "from .openclip_compat import numpy_scalars_allowed\n"
    "with numpy_scalars_allowed():  # checkpoints of OpenCLIP < 2.30\n    pass\n",
    "def f(loss, args):\n    return hasattr(loss, 'set_epoch') and getattr(args, 'wandb', False)\n",
    "import open_clip\nmodel = open_clip.create_model('ViT-B-32')\nok = hasattr(model, 'logit_bias')\n",
    "import open_clip\nfn = getattr(open_clip, 'create_model')\n",
    "def f(args):\n    return args.device  # a tool's own --device, which it always has\n",
])
def test_the_detector_passes(source):
    assert version_and_feature_tests(source) == []
