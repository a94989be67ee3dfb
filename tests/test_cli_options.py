"""`bbpt run`'s options are made from RunConfig's fields, so help, defaults and ranges cannot drift."""
import json
import os
import subprocess
import sys

import pytest
import typer
from pydantic import Field
from test_cli import cli_run

from bbpt import cli, engine
from bbpt.config import RunConfig

BBPT = [sys.executable, "-m", "bbpt.cli"]
WIDE = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400", "NO_COLOR": "1"}


def command(*path):
    cmd = typer.main.get_command(cli.app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def options(*path) -> dict:
    """Option name (--long) -> the click parameter of `bbpt PATH`."""
    return {o: p for p in command(*path).params for o in p.opts if o.startswith("--")}


def help_text(*args) -> str:
    p = subprocess.run([*BBPT, *args, "--help"], capture_output=True, text=True, timeout=120, env=WIDE)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_every_run_field_has_a_run_option_with_its_description_and_default():
    opts = options("run")
    for name, field in RunConfig.model_fields.items():
        flag = cli.run_flag(name)
        assert flag in opts, f"RunConfig.{name} has no `bbpt run` option {flag}"
        if name in cli.RUN_FIELD_FORMS:  # options, box_options: KEY=VALUE pairs, written by hand
            continue
        p = opts[flag]
        assert p.help == field.description, name
        assert p.default == field.get_default(call_default_factory=True), name
    assert {"--eval-batch", "--max-images-per-call", "--classes"} <= set(opts)


def test_ranges_and_choices_come_from_the_field():
    opts = options("run")
    assert opts["--shots"].metavar == "<int> [1<=x<=100000]"
    assert opts["--seed"].metavar == f"<int> [0<=x<={engine.MAX_SEED}]"
    assert opts["--eval-every"].metavar == "<int> [x>=0]"
    assert opts["--precision"].metavar == "[fp32|bf16|fp16]"
    assert opts["--classes"].metavar == "[all|base|new]"


def test_a_new_field_gets_an_option_and_one_without_a_form_is_refused(monkeypatch):
    class Wider(RunConfig):
        trials: int = Field(3, ge=2, lt=9, description="trials per point")
        fast: bool = Field(False, description="go fast")
        tags: list[str] = Field(["a"], description="tags")

    monkeypatch.setattr(cli, "RunConfig", Wider)
    made = {p.name: p for p in cli._run_field_params()}
    assert set(made) == set(Wider.model_fields) - set(cli.RUN_FIELD_FORMS)
    assert made["trials"].default.help == "trials per point" and made["trials"].default.metavar == "<int> [2<=x<9]"
    assert made["trials"].default.default == 3 and made["fast"].annotation is bool
    assert made["tags"].default.metavar == "<str>,..." and "tags" in cli._list_fields()
    assert not {"trials", "fast"} & cli._list_fields()

    class Odd(RunConfig):
        extra: dict[str, int] = Field({}, description="no command-line form")

    monkeypatch.setattr(cli, "RunConfig", Odd)
    with pytest.raises(TypeError, match="run field 'extra'.*has no command-line form"):
        cli._run_field_params()


def test_run_help_shows_each_description_and_flags_as_flags():
    out = help_text("run")
    for name, field in RunConfig.model_fields.items():
        if name not in cli.RUN_FIELD_FORMS:
            assert field.description in out, name
    assert "<bool>" not in out
    force = next(line for line in out.splitlines() if "--force" in line and "--no-force" in line)
    assert "<" not in force.split("Replace")[0]  # no type column for a flag
    assert "(1, 2, 4, 8, 16)" not in out and "any count >= 1" in out
    assert "hf:ORG/NAME" in out and "cuda:N" in out
    for f in ("run.json", "checkpoint.safetensors", "curve.csv", "curve.png", "prompt.safetensors", "result.json"):
        assert f in out, f  # what --out will hold
    top = help_text()
    debug = next(line for line in top.splitlines() if "--debug" in line)
    assert "<bool>" not in top and "<" not in debug


@pytest.mark.parametrize("path", [("eval",), ("reproduce",), ("base2new",), ("cross-dataset",), ("shift",),
                                  ("serve",)])
def test_other_commands_take_the_run_fields_help(path):
    opts = options(*path)
    for flag in ("--model", "--pretrained", "--device", "--shots", "--precision", "--test-subset"):
        if flag in opts:
            field = RunConfig.model_fields[flag[2:].replace("-", "_")]
            assert opts[flag].help.startswith(field.description), (path, flag)
    assert "<bool>" not in help_text(*path)


@pytest.fixture
def captured(monkeypatch):
    """engine.run replaced: the RunConfig `bbpt run` builds, nothing run."""
    seen = []

    def fake_run(cfg, out=None, **kw):
        seen.append(cfg)
        return engine.RunResult(method=cfg.method, dataset=cfg.dataset, shots=cfg.shots, seed=cfg.seed, status="finished",
                                accuracy={"test": 0.0, "val": 0.0}, wall_seconds=0.0,
                                queries={"api_calls": 0, "prompt_evals": 0, "images_forwarded": 0})

    monkeypatch.setattr(engine, "run", fake_run)
    return seen


def test_cli_over_config_file_over_defaults(tmp_path, capsys, captured):
    f = tmp_path / "c.toml"
    f.write_text('dataset = "shapes"\nshots = 3\neval_batch = 64\nclasses = "new"\nloggers = ["none"]\n'
                 '[box_options]\nimage_size = 96\n[options]\nbudget = 40\nrank = 2\n')
    code, _, err = cli_run(["run", "--config", str(f), "--shots", "5", "--classes", "base", "--set", "rank=4",
                            "--box-option", "image_size=224", "--logger", "tensorboard,wandb", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 0, err
    cfg = captured[-1]
    assert (cfg.dataset, cfg.shots, cfg.classes, cfg.eval_batch) == ("shapes", 5, "base", 64)  # file, CLI, CLI, file
    assert cfg.options == {"budget": 40, "rank": 4} and cfg.box_options == {"image_size": 224}
    assert cfg.loggers == ["tensorboard", "wandb"]  # a list field: comma-separated
    assert (cfg.method, cfg.max_images_per_call) == ("zip", 128)  # neither: the defaults
    code, _, err = cli_run(["run", "--config", str(f), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert captured[-1].box_options == {"image_size": 96} and captured[-1].classes == "new"
    assert captured[-1].loggers == ["none"]


def test_new_run_options_reach_run_json(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = cli_run(["run", "--method", "zeroshot", "--dataset", "shapes", "--shots", "3", "--eval-batch", "50",
                            "--max-images-per-call", "5", "--classes", "base", "--test-subset", "20",
                            "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    run_json = json.loads((out / "run.json").read_text())
    stored = run_json.get("config", run_json)
    assert (stored["shots"], stored["eval_batch"], stored["max_images_per_call"], stored["classes"]) == (3, 50, 5, "base")
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["classes"] == "base" and result["config"]["eval_batch"] == 50


@pytest.mark.parametrize("args, expected", [
    (["--eval-batch", "0"], "--eval-batch 0 is out of range (allowed: >= 1 and <= 100000)"),
    (["--max-images-per-call", "100001"], "--max-images-per-call 100001 is out of range (allowed: >= 1 and <= 100000)"),
    (["--classes", "odd"], "--classes 'odd' is invalid: Input should be 'all', 'base' or 'new'"),
    (["--precision", "fp64"], "--precision 'fp64' is invalid"),
    (["--shots", "100001"], "--shots 100001 is out of range"),
    (["--eval-batch", "many"], "Invalid value for '--eval-batch'"),
])
def test_bad_run_field_values_are_one_line_exit_2(tmp_path, capsys, args, expected):
    out = tmp_path / "never"
    code, _, err = cli_run(["run", "--dataset", "shapes", *args, "--out", str(out), "--quiet"], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert expected in lines[0]
    assert not out.exists()
