"""Every method bbpt ships through the same conformance checks, with the settings in
tests/method_cases.py (METHOD_CASES): a shipped method without an entry fails here, so none
skips a check unnoticed.

The checks: the entry describes the class (white box, the boxes it fits, what an embedding
fit requests); same seed, same result, another seed another one, and the exact query counts
at a tiny budget (at most that budget); the saved prompt gives the run's test accuracy; at a
reduced budget it lowers its few-shot training loss; on a real task it beats zero-shot (or
chance). The last is slow for most methods (their default budgets, 16 shots): ``-m slow``.
"""
import pytest

from method_cases import BOXES, METHOD_CASES, shipped
from test_methods import build

from bbpt import boxes
from bbpt.data import load_task, stratified_subset
from bbpt.engine import TEST_SUBSET_SEED, evaluate, make_run_config, run
from bbpt.evaluation import SavedPrompt
from bbpt.errors import BudgetExhausted
from bbpt.methods import METHODS
from bbpt.models import BlackBox, QueryMeter, create_backbone
from bbpt.results import load_prompt

TINY_SUBSET = 200


def each(check: str):
    """Every entry as a pytest param; one without ``check`` skipped with its reason, a slow
    or measured-not-to ``beats`` marked so."""
    out = []
    for name, case in sorted(METHOD_CASES.items()):
        spec, marks = getattr(case, check), []
        if spec is None:
            marks.append(pytest.mark.skip(reason=f"{name}: {case.why_not}"))
        elif check == "beats" and spec.slow:
            marks.append(pytest.mark.slow)
        if check == "beats" and spec is not None and spec.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=spec.xfail))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def test_every_shipped_method_has_a_case():
    missing = sorted(set(shipped()) - set(METHOD_CASES))
    assert not missing, f"registered but without an entry in METHOD_CASES (tests/method_cases.py): {missing}"


def test_every_case_names_a_registered_shipped_method():
    unknown = sorted(set(METHOD_CASES) - set(shipped()))
    assert not unknown, f"METHOD_CASES entries for methods bbpt does not ship: {unknown}"


def test_the_box_kinds_are_the_transports():
    assert set(BOXES) == set(boxes.transports())


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_the_case_describes_the_class(name):
    cls, case = METHODS.get(name), METHOD_CASES[name]
    assert case.white_box == (not cls.black_box)
    fits = {kind for kind, spec in BOXES.items() if not cls.needs.missing(boxes.capabilities(spec))}
    assert fits == set(case.fits), (name, sorted(fits))
    assert (case.embeds is not None) == ("embeddings" in cls.needs.returns)
    if case.embeds is not None:
        assert (case.embeds.texts, case.embeds.val) == (cls.uses_text, cls.uses_val)
    for check in ("lowers_loss", "beats"):
        assert getattr(case, check) is not None or case.why_not, f"{name}: no {check} and no reason why"


def tiny(name, seed=2, **kw):
    t = METHOD_CASES[name].tiny
    return make_run_config(method=name, dataset="shapes", shots=t.shots, seed=seed, test_subset=TINY_SUBSET,
                           options=t.options, **kw)


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_same_seed_same_result_exact_queries_and_the_saved_prompt(name, tmp_path):
    cls, want = METHODS.get(name), METHOD_CASES[name].tiny.queries
    a = run(tiny(name), out=tmp_path / "a", progress=False)
    b = run(tiny(name), progress=False)
    assert a.accuracy == b.accuracy and a.curve == b.curve and a.queries == b.queries
    assert a.queries == want, (name, a.queries)
    for unit, limit in a.budget.items():  # the budget, in the method's unit (none: budget-free)
        assert limit is None or a.queries[unit] <= limit, (unit, a.queries, a.budget)
    c = run(tiny(name, seed=3), progress=False)
    assert c.curve != a.curve
    # the saved prompt (+ extra state), re-applied through a fresh box: the run's test accuracy
    prompt, extra, meta = load_prompt(tmp_path / "a" / "prompt.safetensors")
    assert meta["method"] == name
    task = load_task("shapes")
    box = BlackBox(create_backbone("mini"), task.classnames, QueryMeter())
    again = evaluate(SavedPrompt(cls, prompt, extra), box, stratified_subset(task.test, TINY_SUBSET, TEST_SUBSET_SEED),
                     500, progress=False)
    assert again["accuracy"] == pytest.approx(a.accuracy.test, abs=1e-9)


@pytest.mark.parametrize("name", each("lowers_loss"))
def test_a_reduced_budget_lowers_the_training_loss(mini, name):
    """At a reduced budget the method lowers the full few-shot training loss it started from."""
    spec = METHOD_CASES[name].lowers_loss
    m, box, task = build(name, mini, dataset=spec.dataset, shots=spec.shots, seed=1, **spec.options)
    eval_box = box.for_classes(task.classnames, QueryMeter())
    before = evaluate(m, eval_box, m.data.set, 500, progress=False)
    try:
        while m.step() is not None:
            pass
    except BudgetExhausted:
        pass
    after = evaluate(m, eval_box, m.data.set, 500, progress=False)
    budget = spec.options.get("budget")
    if budget is not None:
        spent = box.meter.counts[type(m).unit(m.cfg)]
        assert 0.8 * budget < spent <= budget
    assert after["loss"] < before["loss"] - spec.by, (before, after)


@pytest.mark.parametrize("name", each("beats"))
def test_it_beats_its_reference_on_a_real_task(name):
    """Above zero-shot (or chance) by the entry's margin on its number of offline tasks."""
    spec = METHOD_CASES[name].beats
    tried, wins = {}, 0
    for task in spec.tasks:
        kw = dict(dataset=task, shots=spec.shots, seed=1, test_subset=spec.test_subset)
        got = run(make_run_config(method=name, options=spec.options, **kw), progress=False).accuracy.test
        if spec.over == "chance":
            ref = 1 / len(load_task(task).classnames)
        else:
            ref = run(make_run_config(method="zeroshot", **kw), progress=False).accuracy.test
        tried[task] = (got, ref)
        wins += got > ref + spec.margin
        if wins >= spec.wins:
            return
    pytest.fail(f"{name} beat {spec.over} by more than {spec.margin} on {wins} of {spec.wins} tasks needed: {tried}")
