"""Plugins: a package installed elsewhere adds a method, a backbone, a dataset and a transport
through entry points (bbpt.plugins); a broken or clashing plugin is one line, exit 2.

The packages are pip-installed into a temporary folder (never the shared environment) and
bbpt runs in subprocesses with that folder on PYTHONPATH, so this process's registries stay
as they are.
"""
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from types import SimpleNamespace

import pytest

from bbpt import boxes, plugins
from bbpt.errors import UnknownName
from bbpt.models.catalog import BACKBONES, register_backbone
from bbpt.registry import Registry

DEMO = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "bbpt-demo"
        version = "0.1"

        [tool.setuptools]
        packages = ["bbpt_demo"]

        [project.entry-points."bbpt.methods"]
        pick = "bbpt_demo.method"

        [project.entry-points."bbpt.backbones"]
        demo = "bbpt_demo.backbone"

        [project.entry-points."bbpt.datasets"]
        demo-shapes = "bbpt_demo.dataset"

        [project.entry-points."bbpt.transports"]
        inproc = "bbpt_demo.transport"
    """,
    "bbpt_demo/__init__.py": "",
    "bbpt_demo/method.py": '''
        """Pick: the best of three templates by training loss, one query each."""
        import numpy as np
        import torch.nn.functional as F
        from pydantic import Field

        from bbpt.boxes.capabilities import Needs
        from bbpt.methods import Method, MethodConfig, register_method
        from bbpt.models.blackbox import TextPrompt

        TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {}.")


        class PickConfig(MethodConfig):
            budget: int | None = Field(3, ge=1, description="one api_call per template")


        @register_method
        class Pick(Method):
            name = "pick"
            needs = Needs(frozenset({"templates"}))
            Config = PickConfig

            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.rng, self.losses = np.random.default_rng(self.seed), []

            def step(self, budget):
                if len(self.losses) == len(TEMPLATES):
                    return None
                images, y = next(self.data.batches(self.cfg.batch_size, self.rng))
                logits = self.box.query(TextPrompt((TEMPLATES[len(self.losses)],)), images)[0]
                self.losses.append(float(F.cross_entropy(logits, y)))
                return {"train_loss": self.losses[-1]}

            def prompt(self):
                return TextPrompt((TEMPLATES[int(np.argmin(self.losses)) if self.losses else 0],))
    ''',
    "bbpt_demo/backbone.py": '''
        from bbpt.models import register_backbone


        @register_backbone("demo", names=["demo-mini"], summary="the embedded model, through a plugin")
        def load(name, pretrained, device):
            from bbpt.models import create_backbone

            return create_backbone("mini", pretrained, device)
    ''',
    "bbpt_demo/dataset.py": '''
        from bbpt.data import shapes
        from bbpt.data.offline import TASKS, OfflineTask

        TASKS.register("demo-shapes", OfflineTask(
            "demo-shapes", shapes.classnames(), ["a photo of a {}."],
            lambda root: {"train": shapes.task_split(4, 1), "test": shapes.task_split(3, 2)},
            "a few shapes scenes, from a plugin", "procedural, nothing to install"))
    ''',
    "bbpt_demo/transport.py": '''
        """The in-process box under another name: a transport from a plugin."""
        from bbpt.boxes import local

        KIND = "inproc"
        SCHEMES = ()
        KEY_ENV = None
        SUMMARY = "the local model, through a plugin"
        capabilities = local.capabilities


        def open(url, classnames, meter, **options):
            return local.open(None, classnames, meter, **options)
    ''',
}

BROKEN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "bbpt-broken"
        version = "0.2"

        [tool.setuptools]
        packages = ["bbpt_broken"]

        [project.entry-points."bbpt.methods"]
        gone = "bbpt_broken.nothing_here"

        [project.entry-points."bbpt.datasets"]
        clash = "bbpt_broken.clash"

        [project.entry-points."bbpt.backbones"]
        taken = "bbpt_broken.taken"
    """,
    "bbpt_broken/__init__.py": "",
    "bbpt_broken/clash.py": '''
        from bbpt.data.offline import TASKS

        TASKS.register("shapes", TASKS.get("mnist"))
    ''',
    "bbpt_broken/taken.py": '''
        from bbpt.models import register_backbone

        register_backbone("mine", lambda name, pretrained, device: None, names=["mini", "mini-2"])
    ''',
}


def install(files: dict, root) -> str:
    """Write the package ``files`` under root/pkg and pip-install it into root/site."""
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--no-deps", "--no-build-isolation", "--target", str(root / "site"), str(root / "pkg")]
    p = subprocess.run(pip, capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr
    return str(root / "site")


def bbpt(site: str, *args: str, cwd, data=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}
    if data is not None:
        env["BBPT_DATA"] = str(data)
    return subprocess.run([sys.executable, "-m", "bbpt.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory):
    return install(DEMO, tmp_path_factory.mktemp("demo"))


def test_plugin_method_and_backbone_run(demo_site, tmp_path):
    p = bbpt(demo_site, "methods", "--box", "inproc:here", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("inproc:here (the local model, through a plugin): ")
    assert "  pick       runs" in p.stdout.splitlines() and "  zeroshot   runs" in p.stdout.splitlines()
    p = bbpt(demo_site, "models", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == f"{'demo-mini':24s} the embedded model, through a plugin"

    out = tmp_path / "run"
    p = bbpt(demo_site, "run", "--method", "pick", "--dataset", "shapes", "--model", "demo-mini", "--shots", "2",
             "--set", "batch_size=8", "--test-subset", "40", "--out", str(out), "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "result.json").read_text())
    assert (r["method"], r["dataset"], r["model"]) == ("pick", "shapes", "demo-mini")
    assert r["queries"]["api_calls"] == 3 and r["queries"]["images_forwarded"] == 24  # 3 templates x 8 images


def test_plugin_dataset_and_transport(demo_site, tmp_path):
    data = tmp_path / "data"
    p = bbpt(demo_site, "data", "prepare", "demo-shapes", cwd=tmp_path, data=data)
    assert p.returncode == 0 and p.stdout.startswith(f"demo-shapes: {data / 'demo-shapes'}"), p.stderr
    p = bbpt(demo_site, "datasets", cwd=tmp_path, data=data)
    line = next(s for s in p.stdout.splitlines() if s.startswith("demo-shapes"))
    assert "ready" in line and "a few shapes scenes, from a plugin" in line
    out = tmp_path / "run"
    p = bbpt(demo_site, "run", "--method", "zeroshot", "--dataset", "demo-shapes", "--box", "inproc:here",
             "--shots", "1", "--out", str(out), "--quiet", cwd=tmp_path, data=data)
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "result.json").read_text())
    assert (r["dataset"], r["config"]["box"], r["status"]) == ("demo-shapes", "inproc:here", "finished")
    assert r["eval_queries"]["images_forwarded"] == 10 + 10 + 30  # 1 shot x 10 classes, val 1 a class, test 3 a class


def test_broken_and_clashing_plugins_are_one_line(tmp_path):
    site = install(BROKEN, tmp_path)
    p = bbpt(site, "methods", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [
        "error: plugin entry point gone = bbpt_broken.nothing_here (group bbpt.methods, package bbpt-broken 0.2) "
        "failed to load: ModuleNotFoundError: No module named 'bbpt_broken.nothing_here'; fix the plugin or "
        "`pip uninstall bbpt-broken`"]
    p = bbpt(site, "datasets", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "error: plugin entry point clash = bbpt_broken.clash (group bbpt.datasets, package bbpt-broken 0.2) "
        "failed to load: dataset 'shapes' is registered already (by bbpt) and a plugin cannot replace it; give the "
        "plugin's another name; fix the plugin or `pip uninstall bbpt-broken`"]
    p = bbpt(site, "models", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "error: plugin entry point taken = bbpt_broken.taken (group bbpt.backbones, package bbpt-broken 0.2) "
        "failed to load: backbone 'mini' is claimed already by the family 'embedded' (by bbpt) and a plugin cannot "
        "replace it; rename the plugin's; fix the plugin or `pip uninstall bbpt-broken`"]


# ---- in process: when a group is loaded, and how often -----------------------------------------------
@pytest.fixture
def fake_group(tmp_path, monkeypatch):
    """Entry points of group 'bbpt.test' (modules written to tmp_path), counting lookups."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", {})
    reg = Registry("widget", group="bbpt.test")
    monkeypatch.setattr(plugins, "WIDGETS", reg, raising=False)
    eps, calls = [], []

    def entry_points(group):
        calls.append(group)
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(plugins, "entry_points", entry_points)

    def add(name: str, body: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        eps.append(EntryPoint(name, name, "bbpt.test"))

    return reg, add, calls


def test_registry_loads_its_group_once_and_only_when_needed(fake_group):
    reg, add, calls = fake_group
    reg.register("builtin", 1)
    add("plug_a", "from bbpt import plugins\nplugins.WIDGETS.register('a', 2)\n")
    assert reg.get("builtin") == 1 and "builtin" in reg and calls == []  # a built-in name loads nothing
    assert reg.get("a") == 2 and reg.owner("a") == "plugin 'plug_a' (package an unknown package)"
    assert reg.names() == ["a", "builtin"] and reg.owner("builtin") == "bbpt" and calls == ["bbpt.test"]
    with pytest.raises(UnknownName, match="unknown widget 'b'"):
        reg.get("b")
    assert calls == ["bbpt.test"]


def test_a_plugin_never_replaces_a_name(fake_group):
    reg, add, _ = fake_group
    reg.register("builtin", 1)
    add("plug_b", "from bbpt import plugins\nplugins.WIDGETS.register('builtin', 2)\n")
    for _ in range(2):  # the same one line every time it is asked
        with pytest.raises(plugins.PluginError, match=r"^plugin entry point plug_b = plug_b \(group bbpt.test, "
                           r"package an unknown package\) failed to load: widget 'builtin' is registered already "
                           r"\(by bbpt\) and a plugin cannot replace it"):
            reg.names()
    assert reg.get("builtin") == 1


def test_unregister_removes_a_name_and_its_owner(fake_group):
    reg, add, _ = fake_group
    reg.register("builtin", 1)
    add("plug_c", "from bbpt import plugins\nplugins.WIDGETS.register('c', 3)\n")
    assert reg.get("c") == 3 and reg.owner("c").startswith("plugin 'plug_c'")
    assert reg.unregister("c") == 3 and reg.unregister("builtin") == 1
    assert reg.names() == [] and "c" not in reg and reg.owner("c") == "bbpt"
    reg.register("builtin", 4)  # the name is free again
    assert reg.get("builtin") == 4
    with pytest.raises(UnknownName, match="unknown widget 'bultin'; did you mean 'builtin'"):
        reg.unregister("bultin")


def test_a_plugin_family_or_transport_claims_nothing_taken(monkeypatch):
    monkeypatch.setattr(plugins, "_current", ["plugin 'x' (package x 1)"])  # as while a plugin loads
    before = BACKBONES.items(with_plugins=False)
    cases = [(dict(prefix="hf:big/"), r"backbone 'hf:big/\*' is claimed already by the family 'hf' \(by bbpt\)"),
             (dict(names=["tiny", "RN50"]), "backbone 'RN50' is claimed already by the family 'open_clip'"),
             (dict(prefix="R"), "backbone 'RN101', 'RN101-quickgelu', 'RN50' is claimed already by the family "
                                "'open_clip'"),
             (dict(names=["x"], family="hf"), "backbone family 'hf' is registered already")]
    for kw, message in cases:
        with pytest.raises(plugins.NameTaken, match=message):
            register_backbone(kw.pop("family", "new"), lambda *a: None, **kw)
    assert BACKBONES.items(with_plugins=False) == before
    mod = dict(KIND="hf", SUMMARY="", capabilities=None, open=None)
    with pytest.raises(plugins.NameTaken, match="box transport 'hf' is registered already"):
        boxes._add_plugin(SimpleNamespace(**mod))
    with pytest.raises(plugins.NameTaken, match="URL scheme 'https' belongs to the box transport 'bbpt' already"):
        boxes._add_plugin(SimpleNamespace(**{**mod, "KIND": "new", "SCHEMES": ("https",)}))
    with pytest.raises(TypeError, match="is not a transport module: it lacks SUMMARY, open"):
        boxes._add_plugin(SimpleNamespace(KIND="new", capabilities=None))
    assert "new" not in boxes.transports(with_plugins=False) and boxes._PLUGINS == {}
