"""The server's dynamic batcher, without HTTP: what forms a batch, and that batched answers
equal unbatched ones."""
import asyncio

import pytest
import torch

from bbpt.models import BlackBox, Images, SoftPrompt
from bbpt.serve.batcher import Batcher

NAMES = ["circle", "square", "triangle"]


def run_jobs(batcher: Batcher, jobs: list[tuple[tuple, int]]):
    async def main():
        await batcher.start()
        try:  # all submitted before the batcher's loop first runs: it sees them queued together
            return await asyncio.gather(*(batcher.submit(item, rows) for item, rows in jobs), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("max_batch,max_rows", [(1, 10**6), (4, 10**6), (32, 250), (3, 100)])
def test_batches_respect_max_batch_and_max_rows_and_keep_order(monkeypatch, max_batch, max_rows):
    seen = []

    def forward(items):
        seen.append([it[0] for it in items])
        return [f"answer {it[0]}" for it in items]

    b = Batcher(max_batch=max_batch, max_rows=max_rows)
    monkeypatch.setattr(b, "_forward", forward)
    rows = [100, 100, 300, 50, 50, 100, 100, 100, 10, 10]
    out = run_jobs(b, [((i,), r) for i, r in enumerate(rows)])
    assert out == [f"answer {i}" for i in range(len(rows))]
    assert [i for batch in seen for i in batch] == list(range(len(rows)))  # in arrival order, each once
    for batch in seen:
        assert len(batch) <= max_batch
        assert len(batch) == 1 or sum(rows[i] for i in batch) <= max_rows  # an oversized query runs alone
    assert b.batches == len(seen) and b.queries == len(rows)
    if max_batch == 1:
        assert len(seen) == len(rows)
    if (max_batch, max_rows) == (32, 250):
        assert seen == [[0, 1], [2], [3, 4, 5], [6, 7, 8, 9]]


def test_one_bad_query_fails_alone(mini):
    box = BlackBox(mini, NAMES)
    ctx = box.embed_words("a photo of a")[None]
    good = (box, SoftPrompt(ctx), Images(torch.rand(2, 3, 32, 32)), None)
    bad = (box, SoftPrompt(torch.full_like(ctx, float("nan"))), Images(torch.rand(2, 3, 32, 32)), None)
    out = run_jobs(Batcher(), [(good, 3), (bad, 3), (good, 3)])
    assert isinstance(out[1], Exception) and "NaN" in str(out[1])
    assert torch.allclose(out[0], out[2]) and out[0].shape == (1, 2, 3)


def test_batched_answers_equal_unbatched_within_1e_5(mini):
    box = BlackBox(mini, NAMES)
    g = torch.Generator().manual_seed(0)
    base = box.embed_words("a photo of a")[None]
    items = [(box, SoftPrompt(base + 0.02 * torch.randn(1 + i % 3, 4, box.ctx_dim, generator=g)),
              Images(torch.rand(2 + i, 3, 32, 32, generator=g)), None) for i in range(8)]
    b = Batcher(max_batch=8)
    together = run_jobs(b, [(it, 3 * (1 + i % 3)) for i, it in enumerate(items)])
    assert b.batches < len(items)  # they were merged
    for it, t in zip(items, together):
        alone = box.query(it[1], it[2])
        assert t.shape == alone.shape and torch.allclose(t, alone, atol=1e-5)


def test_store_charges_atomically_and_stored_replies_expire(tmp_path, monkeypatch):
    from bbpt.serve import store as st

    s = st.Store(tmp_path / "s.db")
    key = s.authenticate(s.add_key("k", {"api_calls": 3}))
    assert key is not None and s.authenticate("bbpt-00000000-wrong") is None
    cost = {"api_calls": 2, "prompt_evals": 2, "images_forwarded": 4}
    s.charge(key, "train", cost, b"reply", "idem-1", "sha")
    assert s.reply(key, "idem-1", "sha") == b"reply"
    with pytest.raises(st.IdempotencyMismatch):
        s.reply(key, "idem-1", "other body")
    with pytest.raises(st.OverBudget):  # 2 + 2 > 3: refused whole, nothing written
        s.charge(key, "train", cost, b"r2", "idem-2", "sha2")
    assert s.usage(key.id)["total"]["api_calls"] == 2 and s.reply(key, "idem-2", "sha2") is None
    s.charge(key, "train", cost, b"again", "idem-1", "sha")  # a twin already stored: no second charge
    assert s.usage(key.id)["total"] == {"requests": 1, "api_calls": 2, "prompt_evals": 2, "images_forwarded": 4}
    later = st.time.time() + st.IDEMPOTENCY_SECONDS + 1
    monkeypatch.setattr(st.time, "time", lambda: later)
    assert s.reply(key, "idem-1", "sha") is None  # expired: a day, as Stripe keeps them
    big = s.authenticate(s.add_key("big", {"api_calls": 100}))
    s.charge(big, "train", cost, b"first", "idem-x", "sha")
    monkeypatch.setattr(st.time, "time", lambda: later + st.IDEMPOTENCY_SECONDS + 1)
    s.charge(big, "train", cost, b"second", "idem-x", "sha")  # the key is new again: charged again, new reply
    assert s.usage(big.id)["total"]["api_calls"] == 4 and s.reply(big, "idem-x", "sha") == b"second"
    assert s.prune() == 1  # k's expired reply (big's is fresh)
