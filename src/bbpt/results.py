"""Run outputs: result.json, curve.csv, curve.png and the learned prompt (safetensors).

Every file is written atomically (temp file, then rename): a process killed at any moment
leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from .errors import BadInput, CorruptCheckpoint, excerpt
from .models.blackbox import SoftPrompt, TextPrompt
from .models.meter import BUDGET_UNITS
from .state import atomic_write_bytes, atomic_write_text

CURVE_FIELDS = (*BUDGET_UNITS, "train_loss", "val_accuracy")


def write_curve_csv(path: Path, curve: list[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(curve)
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, curves: dict[str, list[dict]], title: str, x: str = "api_calls") -> None:
    """Validation accuracy against queries, one line per run name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    refs = iter([("gray", "--"), ("black", ":"), ("brown", "-.")] * 4)
    for name, curve in curves.items():
        xs = [p[x] for p in curve]
        ys = [100 * p["val_accuracy"] for p in curve]
        if len(xs) == 1:  # no training (zero-shot) or not on this axis (white-box): a reference line
            color, ls = next(refs)
            ax.axhline(ys[0], ls=ls, lw=1.2, color=color, label=name)
        else:
            ax.plot(xs, ys, lw=1.4, label=name)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_prompt(path: Path, prompt, extra: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    info = dict(meta or {})
    if isinstance(prompt, SoftPrompt):
        tensors["ctx"] = prompt.ctx.detach().cpu().float().contiguous()
        info.update(kind="soft", suffix=prompt.suffix)
    else:
        info.update(kind="text", templates=list(prompt.templates))
    if not tensors:
        tensors["_empty"] = torch.zeros(0)
    atomic_write_bytes(Path(path), save(tensors, metadata={"bbpt": json.dumps(info)}))


def load_prompt(path: str | Path):
    """(prompt, extra tensors, meta) from a file written by :func:`save_prompt`."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise BadInput(f"prompt file {p} does not exist; pass the prompt.safetensors of a run folder")
    try:
        with safe_open(str(p), "pt") as f:
            meta = json.loads((f.metadata() or {})["bbpt"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CorruptCheckpoint(f"prompt file {p} is not a bbpt prompt ({type(e).__name__}: {excerpt(e, 120)}); re-run the method") from None
    tensors.pop("_empty", None)
    bad = _bad_prompt_meta(meta, tensors)
    if bad:
        raise CorruptCheckpoint(f"prompt file {p} is not a bbpt prompt ({bad}); pass the prompt.safetensors of a run "
                                "folder, or re-run the method")
    if meta.get("kind") == "soft":
        prompt = SoftPrompt(tensors.pop("ctx"), suffix=meta.get("suffix", "."))
    else:
        prompt = TextPrompt(tuple(meta["templates"]))
    return prompt, tensors, meta


def _bad_prompt_meta(meta, tensors: dict) -> str:
    """What is wrong with a prompt file's metadata ("" if nothing)."""
    if not isinstance(meta, dict):
        return f"its metadata is a JSON {type(meta).__name__}, not a mapping"
    if not isinstance(meta.get("method", ""), str) or not isinstance(meta.get("model", ""), str):
        return "its 'method' and 'model' must be strings"
    if meta.get("kind") == "soft":
        ctx = tensors.get("ctx")
        if ctx is None or ctx.dim() not in (2, 3, 4) or not ctx.is_floating_point():
            return "a soft prompt needs a float 'ctx' tensor of shape (m, D), (P, m, D) or (P, C, m, D)"
        return "" if isinstance(meta.get("suffix", "."), str) else "its 'suffix' must be a string"
    templates = meta.get("templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        return "a text prompt needs 'templates', a non-empty list of strings"
    return ""


def write_outputs(out: Path, result: dict, method) -> None:
    """curve.csv, curve.png, prompt.safetensors, then result.json (last: a folder with a
    finished result.json holds every output); a finished run's checkpoint is removed."""
    out = Path(out)
    write_curve_csv(out / "curve.csv", result["curve"])
    if len(result["curve"]) >= 2:
        plot_curves(out / "curve.png", {result["method"]: result["curve"]},
                    f"{result['method']} on {result['dataset']} ({result['shots']}-shot, seed {result['seed']})")
    meta = {"method": result["method"], "dataset": result["dataset"], "model": result["model"],
            "test_accuracy": result["accuracy"]["test"], "status": result["status"]}
    save_prompt(out / "prompt.safetensors", method.prompt(), method.extra_state(), meta)
    atomic_write_text(out / "result.json", json.dumps(result, indent=1) + "\n")
    if result["status"] == "finished":
        (out / "checkpoint.safetensors").unlink(missing_ok=True)
