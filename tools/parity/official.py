"""Running official statements on fixed inputs, for the parity scripts in this folder.

No official code is copied into bbpt: a script takes the path of an official checkout, checks
it is at the pinned commit, and executes the official file's own statements (imported, or a
block located by its ``ast`` and compiled from that file) with stubs for what needs a GPU, a
dataset or a pretrained CLIP. The toy model of :mod:`toy` stands in for CLIP on both sides.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import platform
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

PINNED = {  # ../shared/reference/methods.md
    "LOG-postech/ZIP": "2ba908b",
    "mrflogs/CraFT": "1a4c251",
    "yifanycc/sharpzo": "13b491f",
    "changdaeoh/BlackVIP": "66606fb",
    "ECNU-ICALK/BPT-VLM": "15f2e25",
    "txsun1997/Black-Box-Tuning": "e4013f7",
    "shizhediao/Black-Box-Prompt-Learning": "3fd736a",
    "saic-fi/LFA": "2ee3bba",
    "gaopengcuhk/Tip-Adapter": "d0e2d6f",
}


class Checkout:
    """An official repository on disk at its pinned commit."""

    def __init__(self, path: str, repo: str):
        self.path, self.repo = Path(path).resolve(), repo
        if not self.path.is_dir():
            sys.exit(f"{path}: no such folder; pass the path of a checkout of github.com/{repo}")
        try:
            head = subprocess.run(["git", "-C", str(self.path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sys.exit(f"{path}: not a git checkout; clone github.com/{repo} and check out {PINNED[repo]}")
        if not head.startswith(PINNED[repo]):
            sys.exit(f"{path} is at {head[:7]}, not the pinned {PINNED[repo]} of {repo}: "
                     f"git -C {path} checkout {PINNED[repo]}")
        self.commit = head

    def file(self, rel: str) -> Path:
        return self.path / rel

    def source(self, rel: str) -> str:
        return self.file(rel).read_text()

    def block(self, rel: str, find) -> tuple[types.CodeType, list[int]]:
        """Compile the statements ``find(tree)`` returns (a list of ast statements) from file
        ``rel``, keeping their line numbers; returns (code, [first, last line])."""
        tree = ast.parse(self.source(rel), filename=str(self.file(rel)))
        body = find(tree)
        mod = ast.Module(body=body, type_ignores=[])
        code = compile(mod, str(self.file(rel)), "exec")
        return code, [body[0].lineno, max(getattr(s, "end_lineno", s.lineno) for s in body)]

    @contextlib.contextmanager
    def modules(self, stubs: dict[str, types.ModuleType] | None = None):
        """``stubs`` in sys.modules and the checkout on sys.path, both restored afterwards."""
        saved = {k: sys.modules.get(k) for k in (stubs or {})}
        sys.modules.update(stubs or {})
        sys.path.insert(0, str(self.path))
        try:
            yield
        finally:
            sys.path.remove(str(self.path))
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    def load_module(self, rel: str, name: str, stubs: dict[str, types.ModuleType] | None = None):
        """Import the official file ``rel`` as module ``name``, with ``stubs`` standing in for
        the modules it imports that need data, a GPU or a download."""
        with self.modules(stubs):
            spec = importlib.util.spec_from_file_location(name, self.file(rel))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod


def function(tree: ast.Module, name: str) -> ast.FunctionDef:
    """The (first) function or method called ``name`` anywhere in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LookupError(f"no function {name!r} in the official file")


def first(node: ast.AST, kind: type) -> ast.AST:
    for n in ast.walk(node):
        if isinstance(n, kind):
            return n
    raise LookupError(f"no {kind.__name__} in {getattr(node, 'name', node)}")


def stub(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


@contextlib.contextmanager
def cpu_for_cuda():
    """``.cuda()`` on tensors and modules is a no-op (the official code is written for a GPU)."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import cma

        env["cma"] = cma.__version__
    except ImportError:
        pass
    return env


def official_section(checkout: Checkout, statements: list[dict]) -> dict:
    return {"repo": checkout.repo, "commit": checkout.commit, "statements": statements}


def command(script: str, checkout: Checkout, extra: str = "") -> str:
    """How the fixture was made: the script, on a checkout of the repo at its pinned commit,
    in an environment with the library versions of ``environment``."""
    return (f"python tools/parity/{script} PATH{extra}  # PATH: git clone https://github.com/{checkout.repo} "
            f"&& git -C PATH checkout {checkout.commit[:7]}; {' '.join(f'{k}=={v}' for k, v in environment().items() if k == 'cma')}").rstrip("; ")
