"""CLI and engine: result.json schema, budget stop, one-line errors with exit code 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bbpt import cli
from bbpt.engine import make_run_config, run
from bbpt.methods import METHODS, Method, MethodConfig, register_method
from bbpt.models import SoftPrompt


class ProbeConfig(MethodConfig):
    budget: int | None = 25
    prompts_per_step: int = 10


class Probe(Method):
    """Test method: P random prompts per step on one batch (P api_calls a step)."""

    name = "probe"
    Config = ProbeConfig

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ctx = self.box.embed_words("a photo of a")[None]
        self.rng = np.random.default_rng(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def step(self, budget):
        imgs, y = next(self.data.batches(self.cfg.batch_size, self.rng))
        P = self.cfg.prompts_per_step
        cand = self.ctx + 0.01 * torch.randn(P, *self.ctx.shape[1:], generator=self.gen)
        logits = self.box.query(SoftPrompt(cand), imgs)  # (P, B, C)
        losses = torch.stack([torch.nn.functional.cross_entropy(l, y) for l in logits])
        self.ctx = cand[losses.argmin()][None]
        return {"train_loss": float(losses.min())}

    def prompt(self):
        return SoftPrompt(self.ctx)


@pytest.fixture
def probe():
    """The "probe" method, registered for one test only: registered at import, it would be in every
    registry listing of whatever test files ran beside this one (their "every method" checks)."""
    register_method(Probe)
    yield Probe
    METHODS.unregister("probe")


def cli_run(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["bbpt", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_zeroshot_run_writes_result_schema(tmp_path, capsys):
    code, out, err = cli_run(["run", "--method", "zeroshot", "--dataset", "shapes", "--shots", "2", "--seed", "1",
                              "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "x" / "result.json").read_text())
    for key in ("method", "dataset", "model", "shots", "seed", "budget", "queries", "accuracy", "curve", "wall_seconds", "config"):
        assert key in r
    assert (r["method"], r["dataset"], r["model"], r["shots"], r["seed"]) == ("zeroshot", "shapes", "mini", 2, 1)
    assert set(r["budget"]) >= {"api_calls"}
    assert r["queries"] == {"api_calls": 0, "prompt_evals": 0, "images_forwarded": 0}
    assert 0.0 <= r["accuracy"]["test"] <= 1.0 and 0.0 <= r["accuracy"]["val"] <= 1.0
    assert r["curve"] and set(r["curve"][0]) >= {"api_calls", "train_loss", "val_accuracy"}
    assert r["config"]["method"] == "zeroshot" and r["config"]["options"]["template"] is None
    assert f"test {100 * r['accuracy']['test']:.2f}%" in out
    assert (tmp_path / "x" / "prompt.safetensors").exists() and (tmp_path / "x" / "curve.csv").exists()


def test_budget_is_a_hard_stop_in_the_engine(tmp_path, probe):
    cfg = make_run_config(method="probe", dataset="shapes", shots=2, seed=1, options={"budget": 25})
    r = run(cfg, out=tmp_path / "p", progress=False)
    assert r.queries["api_calls"] == 20  # 2 steps of 10; the third would pass 25
    assert r.queries["prompt_evals"] == 20 and r.queries["images_forwarded"] == 20 * 20
    assert r.curve[0].api_calls == 0 and r.curve[-1].api_calls == 20
    assert r.budget == {"api_calls": 25}
    # same seed, same config -> the same result
    r2 = run(cfg, out=None, progress=False)
    assert r2.accuracy == r.accuracy and r2.curve == r.curve
    assert (tmp_path / "p" / "curve.png").exists()


def test_config_file_and_set_override(tmp_path, capsys, probe):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"dataset": "shapes", "shots": 1, "options": {"budget": 40, "prompts_per_step": 5}}))
    code, _, err = cli_run(["run", "--method", "probe", "--config", str(f), "--set", "prompts_per_step=20",
                            "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert r["shots"] == 1 and r["config"]["options"]["prompts_per_step"] == 20
    assert r["queries"]["api_calls"] == 40


def make_folder(root, classes, n=2):
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.png")


def bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    make_folder(empty, ["a", "b"])
    (empty / "train" / "c").mkdir()
    malformed = tmp_path / "malformed"
    (malformed / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(malformed / "a" / "0.png")
    (malformed / "split.json").write_text("{not json")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    return [
        (["run", "--dataset", "fashoin"], "unknown dataset 'fashoin'; did you mean 'fashion-mnist'"),
        (["run", "--method", "zipp"], "unknown method 'zipp'"),
        (["run", "--model", "ViT-B-17"], "unknown model 'ViT-B-17'"),
        (["run", "--dataset", str(tmp_path / "nope" / "data")], "does not exist"),
        (["run", "--dataset", str(empty)], "has no images"),
        (["run", "--dataset", str(malformed)], "split.json"),
        (["run", "--pretrained", str(corrupt)], "corrupt"),
        (["run", "--model", "ViT-B-16"], "needs --pretrained"),
        (["run", "--model", "ViT-B-16", "--pretrained", "openai"], "not available offline"),
        (["run", "--method", "probe", "--dataset", "shapes", "--budget", "5"], "budget exhausted"),
        (["run", "--set", "nonsense=1"], "option 'nonsense'"),
        (["run", "--shots", "0", "--dataset", "shapes"], "--shots 0 is out of range"),
    ]


def test_bad_input_one_line_exit_2(tmp_path, capsys, probe):
    for args, expected in bad_inputs(tmp_path):
        code, out, err = cli_run([*args, "--out", str(tmp_path / "r"), "--quiet"], capsys)
        assert code == 2, (args, err)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert expected in lines[0], (args, lines[0])
        assert "Traceback" not in err


def test_exit_code_and_debug_in_subprocess(tmp_path):
    exe = [sys.executable, "-m", "bbpt.cli"]
    p = subprocess.run([*exe, "run", "--dataset", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: unknown dataset 'nope'") and "Traceback" not in p.stderr
    p = subprocess.run([*exe, "--debug", "run", "--dataset", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr and "UnknownName" in p.stderr


def test_listing_commands(capsys):
    code, out, _ = cli_run(["datasets"], capsys)
    assert code == 0 and all(n in out for n in ("mnist", "fashion-mnist", "animal-mnist", "shapes"))
    code, out, _ = cli_run(["models"], capsys)
    assert code == 0 and "mini" in out and "ViT-B-16" in out and "RN50" in out
    code, out, _ = cli_run(["methods"], capsys)
    assert code == 0 and "zeroshot" in out


# ---- every case of "Reliability" / Why: one line, exit 2, nothing spent ------------------
def usage_cases(tmp_path):
    from test_data_input import huge_png

    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    boolean = tmp_path / "bool.json"
    boolean.write_text('{"seed": true}')
    big = tmp_path / "big"
    make_folder(big, ["a", "b"])
    huge_png(big / "test" / "a" / "huge.png")
    inf_toml = tmp_path / "inf.toml"
    inf_toml.write_text('method = "bbt"\ndataset = "shapes"\n[options]\nsigma = inf\n')
    return [
        (["run", "--budgte", "5"], "No such option: --budgte"),
        (["run", "--shots", "abc"], "Invalid value for '--shots'"),
        (["eval"], "Missing option '--prompt'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run", "--seed", "-1", "--dataset", "shapes"], "--seed -1 is out of range (allowed: >= 0 and <= 2147483647)"),
        (["run", "--seed", str(2**31), "--dataset", "shapes"], "--seed 2147483648 is out of range"),
        (["run", "--set", "batch_size=0", "--dataset", "shapes"], "option batch_size=0 is out of range (allowed: >= 1"),
        (["run", "--device", "tpu", "--dataset", "shapes"], "--device 'tpu' is invalid: use cpu, cuda, cuda:N or mps"),
        (["run", "--config", str(lst)], "holds a JSON list; it must hold a mapping of run fields"),
        (["run", "--config", str(tmp_path)], "is a folder; pass a JSON or TOML file"),
        (["run", "--config", str(boolean), "--dataset", "shapes"], "--seed True is invalid: Input should be a valid integer"),
        (["run", "--device", "mps", "--dataset", "shapes"], "MPS is not available; use --device cpu"),
        (["run", "--device", "cuda:3", "--dataset", "shapes"], "use --device cpu"),
        (["run", "--dataset", str(big), "--shots", "1"], "is 15000x15000 (225.0 Mpx), over bbpt's limit"),
        (["run", "--dataset", str(big), "--shots", "3"], "--shots 3 is more than class 'a' has in the train split (1 image); use --shots 1 or fewer"),
        (["run", "--test-subset", "0", "--dataset", "shapes"], "--test-subset 0 is out of range"),
        (["run", "--method", "zip", "--set", "n_ctx=0", "--dataset", "shapes"], "option n_ctx=0 is out of range"),
        (["run", "--method", "sharpzo", "--set", "sparsity=-0.5", "--dataset", "shapes"], "option sparsity=-0.5 is out of range"),
        (["run", "--method", "craft", "--set", "head_kl_fraction=1.5", "--dataset", "shapes"],
         "option head_kl_fraction=1.5 is out of range (allowed: >= 0 and <= 1)"),
        (["run", "--method", "zip", "--set", "clip=-1", "--dataset", "shapes"], "option clip=-1"),
        (["run", "--method", "bbt", "--set", "sigma=Infinity", "--dataset", "shapes"],
         "method bbt: option sigma=inf is invalid: Input should be a finite number (allowed: > 0)"),
        (["run", "--method", "bbt", "--set", "sigma=NaN", "--dataset", "shapes"], "option sigma=nan is invalid"),
        (["run", "--config", str(inf_toml)], "method bbt: option sigma=inf is invalid: Input should be a finite number"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_spends_nothing(tmp_path, capsys):
    for args, expected in usage_cases(tmp_path):
        out = tmp_path / "never"
        code, _, err = cli_run([*args, "--out", str(out), "--quiet"] if args[0] == "run" else args, capsys)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, code, err)
        assert expected in lines[0], (args, lines[0])
        assert not out.exists(), args  # refused before the run folder was touched


def test_bare_bbpt_prints_help_and_exits_0():
    p = subprocess.run([sys.executable, "-m", "bbpt.cli"], capture_output=True, text=True)
    assert p.returncode == 0 and "run" in p.stdout and "methods" in p.stdout and not p.stderr
    p = subprocess.run([sys.executable, "-m", "bbpt.cli", "run", "--budgte", "5"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_corrupt_test_image_is_reported_before_any_query(tmp_path, capsys, monkeypatch):
    from bbpt.models.meter import QueryMeter

    root = tmp_path / "d"
    make_folder(root, ["a", "b"], n=3)
    (root / "test" / "b" / "1.png").write_bytes(b"this is not a png")
    charged = []
    monkeypatch.setattr(QueryMeter, "charge", lambda self, *a: charged.append(a))
    code, _, err = cli_run(["run", "--method", "zip", "--dataset", str(root), "--shots", "1",
                            "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and "test image" in err and "1.png cannot be read" in err
    assert charged == [] and not (tmp_path / "r").exists()


def test_methods_lists_every_option_with_range_and_help(capsys):
    code, out, _ = cli_run(["methods"], capsys)
    assert code == 0
    for name in METHODS.names():
        cls = METHODS.get(name)
        if not cls.__module__.startswith("bbpt."):
            continue
        assert f"\n{name} [" in "\n" + out
        for field, info in cls.Config.model_fields.items():
            assert info.description, (name, field)
            assert f"  {field} " in out, (name, field)


def test_every_numeric_option_has_a_range():
    """No method option takes any number: each int/float field is bounded (pydantic Field)."""
    import typing

    from bbpt.methods.base import option_range

    for name in METHODS.names():
        cls = METHODS.get(name)
        if not cls.__module__.startswith("bbpt."):
            continue
        for field, info in cls.Config.model_fields.items():
            args = typing.get_args(info.annotation) or (info.annotation,)
            plain = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args]
            if any(a in (int, float) for a in plain):
                assert any(sym in option_range(info) for sym in (">", "<")), (name, field, option_range(info))


def test_an_explicit_option_wins_over_the_preset(tmp_path, capsys):
    """`--set preset=dtd --set sigma=0.5` runs with σ 0.5; the preset's other values still apply."""
    code, _, err = cli_run(["run", "--method", "craft", "--dataset", "shapes", "--shots", "1", "--set", "preset=dtd",
                            "--set", "sigma=0.5", "--set", "intrinsic_dim=8", "--set", "popsize=4", "--budget", "8",
                            "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    o = json.loads((tmp_path / "o" / "result.json").read_text())["config"]["options"]
    assert o["sigma"] == 0.5 and o["preset"] == "dtd"
    assert (o["proj_std"], o["lam"], o["beta"], o["head"], o["head_optim"]) == (1.0, 0.001, 0.001, "official", "adam")
    from bbpt.methods import make_config

    for method, explicit, preset in (("craft", {"sigma": 0.5, "preset": "dtd"}, {"proj_std": 1.0}),
                                     ("bptvlm", {"popsize": 7, "preset": "zip"}, {"n_text": 5})):
        cls = METHODS.get(method)
        cfg = cls.resolve_config(make_config(cls, explicit), 16)
        assert all(getattr(cfg, k) == v for k, v in {**explicit, **preset}.items())


def test_eval_refuses_a_prompt_file_with_bad_metadata_or_without_its_head_in_one_line(tmp_path, capsys):
    import json as _json

    import torch
    from safetensors.torch import save_file

    from bbpt.models import SoftPrompt
    from bbpt.results import save_prompt

    listed = tmp_path / "list.safetensors"  # metadata that is a JSON list
    save_file({"ctx": torch.zeros(4, 64)}, str(listed), metadata={"bbpt": _json.dumps(["soft", "."])})
    headless = tmp_path / "craft.safetensors"  # a CraFT prompt whose head tensors were dropped
    save_prompt(headless, SoftPrompt(torch.zeros(1, 4, 64)), {}, {"method": "craft", "model": "mini"})
    no_ctx = tmp_path / "noctx.safetensors"
    save_file({"w": torch.zeros(3)}, str(no_ctx), metadata={"bbpt": _json.dumps({"kind": "soft", "method": "bbt"})})
    cases = [(listed, "is not a bbpt prompt (its metadata is a JSON list, not a mapping)"),
             (headless, "does not fit craft (it holds no head.* tensors"),
             (no_ctx, "is not a bbpt prompt (a soft prompt needs a float 'ctx' tensor")]
    for path, expected in cases:
        code, _, err = cli_run(["eval", "--prompt", str(path), "--dataset", "shapes", "--quiet"], capsys)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: prompt file "), (path, err)
        assert expected in lines[0], lines[0]


def broken_dataset(root, layout: str, kind: str):
    """Two classes of three 8x8 PNGs in ``layout`` (folders, split.json, coop), the test split's
    last image replaced by a broken ``kind`` (tests/test_data_input.py); returns the broken file."""
    from test_data_input import BROKEN_KINDS, broken_image

    bad_name = "bad" + BROKEN_KINDS[kind]
    if layout == "folders":
        make_folder(root, ["a", "b"], n=3)
        return broken_image(root / "test" / "b" / bad_name, kind)
    images = root / "images" if layout == "coop" else root
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / c / f"{i}.png")
    bad = broken_image(images / "b" / bad_name, kind)
    train, test = [f"{c}/{i}.png" for c in "ab" for i in range(3)], ["a/3.png", "b/3.png", f"b/{bad_name}"]
    if layout == "coop":
        entry = lambda p: [p, "ab".index(p[0]), p[0]]  # noqa: E731
        (root / "split_zhou_Broken.json").write_text(json.dumps(
            {"train": [entry(p) for p in train[1::3]], "val": [entry(p) for p in train[::3]],
             "test": [entry(p) for p in test]}))
    else:
        (root / "split.json").write_text(json.dumps({"train": train, "test": test}))
    return bad


@pytest.mark.parametrize("layout,kind", [("folders", "bmp"), ("split.json", "gif"), ("coop", "tiff"),
                                         ("folders", "png-idat")])
def test_undecodable_test_image_is_refused_before_any_query(tmp_path, capsys, monkeypatch, layout, kind):
    """Header and verify() pass; the damage is in the image data, found by decoding before training."""
    from bbpt.models.meter import QueryMeter

    bad = broken_dataset(tmp_path / "d", layout, kind)
    charged = []
    monkeypatch.setattr(QueryMeter, "charge", lambda self, *a: charged.append(a))
    code, _, err = cli_run(["run", "--method", "zeroshot", "--dataset", str(tmp_path / "d"), "--shots", "1",
                            "--out", str(tmp_path / "r"), "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: test image {bad} cannot be read (") and lines[0].endswith(
        "); remove or replace it, then rerun")
    assert charged == [] and not (tmp_path / "r").exists()


# ---- listing commands: light imports -----------------------------------------------------------
LIGHT = """import sys
from bbpt.cli import main
sys.argv = ["bbpt", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print("HEAVY:", sorted(m for m in ("torch", "open_clip") if m in sys.modules))
"""


def test_listing_commands_import_neither_torch_nor_open_clip(capsys):
    """`bbpt datasets` and `bbpt models` in a fresh interpreter load neither torch nor open_clip,
    and print what they print where both are loaded (open_clip's own registry answering)."""
    import open_clip  # noqa: F401  (here the catalog asks open_clip itself: the reference listing)

    for args in (["datasets"], ["models"]):
        p = subprocess.run([sys.executable, "-c", LIGHT, *args], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        out, _, heavy = p.stdout.rpartition("HEAVY: ")
        assert heavy.strip() == "[]", (args, heavy)
        code, here, _ = cli_run(args, capsys)
        assert code == 0 and out == here, args


def test_models_package_loads_its_names_on_first_use():
    code = """import sys
import bbpt.models, bbpt.data
assert "torch" not in sys.modules, "import bbpt.models / bbpt.data imported torch"
from bbpt.models import BlackBox, QueryMeter, SoftPrompt, create_backbone, embedded_models
from bbpt.models import *
import bbpt.models.backbone as backbone
assert BlackBox.__module__ == "bbpt.models.localbox" and QueryMeter.__module__ == "bbpt.models.meter"
assert create_backbone is backbone.create_backbone and embedded_models is backbone.embedded_models
assert bbpt.models.blackbox.BlackBox is BlackBox and "Images" in dir(bbpt.models)
try:
    bbpt.models.nothing
except AttributeError as e:
    assert "has no attribute 'nothing'" in str(e)
else:
    raise AssertionError("bbpt.models.nothing exists")
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_main_reports_interrupts_once_their_module_is_loaded(monkeypatch, capsys):
    """main() matches RunInterrupted / SweepInterrupted without importing engine or sweep itself."""
    import signal

    from bbpt.engine import RunInterrupted, RunResult
    from bbpt.sweep import SweepInterrupted

    result = RunResult(method="zip", dataset="mnist", shots=1, seed=1, status="interrupted", queries={"api_calls": 7})
    summary = {"runs": [{"status": "finished"}, {"status": "not started"}]}
    for exc, code, said in ((RunInterrupted(signal.SIGTERM, None, result), 143, "after 7 api_calls: nothing saved"),
                            (SweepInterrupted(signal.SIGINT, summary), 130, "1 of 2 runs finished")):
        def raise_it(*a, **k):
            raise exc

        monkeypatch.setattr(cli, "app", raise_it)
        rc, _, err = cli_run(["run"], capsys)
        assert rc == code and said in err, err
