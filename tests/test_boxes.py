"""Black boxes by transport (bbpt.boxes): capabilities and needs, refusals before any query,
keys, and the Hugging Face and OpenAI protocols as `bbpt serve` speaks them, checked with
those protocols' own clients (huggingface_hub, openai) and run end to end through bbpt's
transports. Servers: `bbpt serve` subprocesses on 127.0.0.1, started and stopped here."""
import base64
import http.server
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import torch

from method_cases import METHOD_CASES, shipped
from test_serve import Server

from bbpt import boxes
from bbpt.boxes.capabilities import Capabilities, Needs
from bbpt.engine import make_run_config, run
from bbpt.errors import BadInput, BudgetExhausted
from bbpt.methods import METHODS
from bbpt.models import BlackBox, Images, QueryMeter, TextPrompt, create_backbone

BBPT = [sys.executable, "-m", "bbpt.cli"]
NAMES = ["circle", "square", "triangle"]
SHIPPED = shipped()  # not tests' own


# ---- capabilities and needs: every method, every transport --------------------------------------
@pytest.mark.parametrize("kind", sorted(boxes.transports()))
def test_every_transport_declares_what_it_takes_and_returns(kind):
    mod = boxes.transports()[kind]
    caps = mod.capabilities(None)
    assert isinstance(caps, Capabilities) and caps.accepts and caps.returns
    assert mod.KIND == kind and callable(mod.open) and mod.SUMMARY
    assert caps.billing in ("api_calls", "requests", "images", "tokens")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_its_needs_and_runs_in_process(name):
    needs = METHODS.get(name).needs
    assert isinstance(needs, Needs) and needs.returns
    assert needs.missing(boxes.capabilities("local")) == []  # the in-process box serves every method


def test_the_refusal_names_what_is_missing_and_the_methods_that_fit():
    caps = boxes.capabilities("hf:http://127.0.0.1:1")
    fit = [n for n in METHODS.names() if not METHODS.get(n).needs.missing(caps)]
    assert fit == sorted(n for n, case in METHOD_CASES.items() if "hf" in case.fits) and "zip" not in fit
    with pytest.raises(BadInput) as e:
        boxes.check_fit(METHODS.get("zip"), "hf:http://127.0.0.1:1")
    msg = str(e.value)
    assert "\n" not in msg and "soft_context (soft prompts)" in msg
    assert msg.endswith(f"methods that fit it: {', '.join(fit)} (`bbpt methods --box hf:http://127.0.0.1:1`)")
    with pytest.raises(BadInput, match=r"; logits out \(it returns probabilities\);"):
        boxes.check_fit(METHODS.get("craft"), "hf:http://127.0.0.1:1")  # CraFT's head reads logits
    boxes.check_fit(METHODS.get("bar"), "hf:http://127.0.0.1:1")  # fits: no error


def test_box_specs_parse_to_their_transports():
    assert boxes.parse(None) == boxes.parse("local") == boxes.BoxSpec("local", None)
    assert boxes.parse("http://127.0.0.1:8000") == boxes.BoxSpec("bbpt", "http://127.0.0.1:8000")
    assert boxes.parse("hf:https://x.example/m") == boxes.BoxSpec("hf", "https://x.example/m")
    assert boxes.parse("openai:http://h:1/v1") == boxes.BoxSpec("openai", "http://h:1/v1")
    with pytest.raises(BadInput, match=r"--box 'ftp://x' names no transport; .* KIND one of bbpt, hf, local, openai"):
        boxes.parse("ftp://x")


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        self.send_response(500)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *a):
        pass


def test_zip_on_a_probability_box_is_refused_before_any_query(tmp_path):
    """`bbpt run --method zip --box hf:URL`: exit 2, one line naming soft prompts and the
    methods that fit; the API never hears from bbpt and --out is not created."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        p = subprocess.run([*BBPT, "run", "--method", "zip", "--dataset", "shapes", "--box", f"hf:{url}",
                            "--out", str(tmp_path / "r"), "--quiet"], capture_output=True, text=True, timeout=120)
    finally:
        srv.shutdown()
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: method zip cannot run on hf:{url}: the box lacks soft_context (soft prompts); "
                               "methods that fit it: bar, bdpl, blackvip, ")
    assert _Counting.hits == 0 and not (tmp_path / "r").exists()


def test_bbpt_methods_box_lists_what_runs_and_why_not():
    p = subprocess.run([*BBPT, "methods", "--box", "hf:http://127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:]}
    assert set(rows) == set(SHIPPED)
    assert rows["bar"].split()[1] == "runs" and rows["zeroshot"].split()[1] == "runs"
    assert "refused: lacks soft_context (soft prompts)" in rows["zip"]
    assert "accepts pixels, templates; returns probabilities; bills requests" in p.stdout.splitlines()[0]


# ---- keys: never from the command line ---------------------------------------------------------------
def test_keys_come_from_a_file_the_environment_or_the_keys_file(tmp_path, monkeypatch):
    from bbpt.boxes.keys import resolve_key

    spec = boxes.parse("hf:http://h.example/a/b")
    monkeypatch.setenv("BBPT_KEYS_FILE", str(tmp_path / "keys.toml"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert resolve_key(spec, "HF_TOKEN") is None
    (tmp_path / "keys.toml").write_text('[keys]\n"http://h.example" = "short"\n"hf:http://h.example/a" = "long"\n')
    assert resolve_key(spec, "HF_TOKEN") == "long"  # the longest matching prefix
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert resolve_key(spec, "HF_TOKEN") == "from-env"
    (tmp_path / "k").write_text("from-file\nignored\n")
    assert resolve_key(spec, "HF_TOKEN", key_file=str(tmp_path / "k")) == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(BadInput, match=r"--key-file .*empty is empty; its first line must be the API key"):
        resolve_key(spec, "HF_TOKEN", key_file=str(tmp_path / "empty"))
    p = subprocess.run([*BBPT, "run", "--help"], capture_output=True, text=True, timeout=60,
                       env={"COLUMNS": "200", "PATH": ""})
    assert "--key-file" in p.stdout and "--key " not in p.stdout  # no option takes the key itself


# ---- the protocols, served ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "serve.db").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(server):
    return server.key("boxes")


@pytest.fixture(scope="module")
def local():
    return BlackBox(create_backbone("mini"), NAMES)


def _uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    a = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return torch.from_numpy(a).float() / 255  # exact in an 8-bit PNG


def _png(px: torch.Tensor) -> bytes:
    from bbpt.boxes._http import png_bytes

    return png_bytes(px)


def _usage(server, key) -> dict:
    return httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()["total"]


def test_huggingface_inference_client_gets_the_zero_shot_scores(server, key, local, monkeypatch):
    """huggingface_hub's own client, pointed at bbpt serve: the softmax of the model's logits,
    best first, each request charged one api_call."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # the suite runs with HF_HUB_OFFLINE=1, under which the client refuses every URL, this
    # server's on 127.0.0.1 too; lifted for this client alone (nothing here reaches the Hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    client = InferenceClient(model=server.url + "/v1/zero-shot-image-classification", token=key)
    px = _uint8_images(2)
    before = _usage(server, key)
    for i in range(2):
        out = client.zero_shot_image_classification(_png(px[i]), candidate_labels=NAMES,
                                                    hypothesis_template="a drawing of a {}.")
        want = torch.softmax(local.query(TextPrompt("a drawing of a {}."), Images(px[i:i + 1]))[0, 0].double(), -1)
        assert [o.label for o in out] == [NAMES[j] for j in torch.argsort(want, descending=True).tolist()]
        for o in out:
            assert abs(o.score - float(want[NAMES.index(o.label)])) < 1e-5
    after = _usage(server, key)
    assert {u: after[u] - before[u] for u in ("api_calls", "prompt_evals", "images_forwarded")} == \
        {"api_calls": 2, "prompt_evals": 2, "images_forwarded": 2}


def test_the_hf_box_matches_the_model_and_meters_exactly(server, key, local):
    from bbpt.boxes.hf import HFZeroShotBox

    meter = QueryMeter()
    box = boxes.open_box(f"hf:{server.url}/v1/zero-shot-image-classification", NAMES, meter, key=key, image_size=32)
    assert isinstance(box, HFZeroShotBox)
    px, prompt = _uint8_images(3, seed=1), TextPrompt(("a photo of a {}.", "a {} shape"))
    got = box.query(prompt, Images(px))  # (2, 3, C) log-probabilities
    want = torch.log_softmax(local.query(prompt, Images(px)), -1)
    assert got.shape == (2, 3, 3) and torch.allclose(got, want, atol=1e-5)
    assert meter.counts == {"api_calls": 2, "prompt_evals": 2, "images_forwarded": 6, "billed_requests": 6}
    tight = QueryMeter({"api_calls": 1})
    before = _usage(server, key)
    with pytest.raises(BudgetExhausted):
        box.for_classes(NAMES, tight).query(prompt, Images(px))  # 2 api_calls: refused before any request
    assert _usage(server, key) == before and tight.counts["api_calls"] == 0
    with pytest.raises(BadInput, match=r"takes text and images only: it has no word embeddings \(soft prompts\)"):
        box.embed_words("a photo of a")


def test_openai_client_gets_text_and_image_embeddings(server, key, local):
    """The openai package's own client (text; images as data URIs with modality=image, the
    documented form), in both encodings, equal to the model's embeddings."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    texts = ["a photo of a circle.", "square"]
    before = _usage(server, key)
    for fmt in ("float", "base64"):
        r = client.embeddings.create(model="mini", input=texts, encoding_format=fmt)
        got = torch.tensor([d.embedding for d in r.data]) if fmt == "float" else None
        if got is None:  # the client decodes base64 for us only when it chose the format itself
            got = torch.tensor(np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data]))
        assert torch.allclose(got, local.embed_texts(texts), atol=1e-6)
    px = _uint8_images(2, seed=2)
    uris = ["data:image/png;base64," + base64.b64encode(_png(x)).decode() for x in px]
    r = client.embeddings.create(model="mini", input=uris, extra_body={"modality": "image"})
    got = torch.tensor([d.embedding for d in r.data])
    assert torch.allclose(got, local.embed_images(Images(px)), atol=1e-5)
    after = _usage(server, key)
    m = QueryMeter()
    want = {u: 2 * m.embed_cost(2, 0)[u] + m.embed_cost(0, 2)[u] for u in ("api_calls", "prompt_evals", "images_forwarded")}
    assert {u: after[u] - before[u] for u in want} == want
    with pytest.raises(openai.UnprocessableEntityError, match="cannot be fetched here"):  # 422, as all of bbpt serve
        client.embeddings.create(model="mini", input=["http://example.com/x.png"], extra_body={"modality": "image"})


def test_the_embeddings_box_gives_embeddings_and_scale_x_cosine_logits(server, key, local):
    meter = QueryMeter()
    box = boxes.open_box(f"openai:{server.url}/v1", NAMES, meter, key=key, image_size=32, logit_scale=50.0)
    px = _uint8_images(3, seed=3)
    assert torch.allclose(box.embed_images(Images(px)), local.embed_images(Images(px)), atol=1e-5)
    got = box.query(TextPrompt("a photo of a {}."), Images(px))
    txt = local.embed_texts([f"a photo of a {c}." for c in NAMES])
    assert torch.allclose(got[0], 50.0 * local.embed_images(Images(px)) @ txt.T, atol=1e-4)
    c = meter.counts  # bbpt's units as on every box: an embedding call of 3 images, a query of 1 x 3
    assert {u: c[u] for u in ("api_calls", "prompt_evals", "images_forwarded")} == \
        {"api_calls": 1 + 1, "prompt_evals": 0 + 1, "images_forwarded": 3 + 3}
    assert c["billed_images"] == 6 and c["billed_requests"] == 3  # images twice; the 2 class texts once
    k = server.key("emb-meter")
    m2 = QueryMeter()
    b2 = boxes.open_box(f"openai:{server.url}/v1", NAMES, m2, key=k, image_size=32, batch=2)
    b2.query(TextPrompt(("a photo of a {}.", "a {}")), Images(px))  # 2 x 3 texts, 3 images: 2 x 2 + 2 requests
    assert {u: m2.counts[u] for u in ("api_calls", "prompt_evals", "images_forwarded")} == QueryMeter().cost(2, 3)
    used = _usage(server, k)  # what the API did is billed_*: the server's own counts
    assert (used["api_calls"], used["images_forwarded"]) == (m2.counts["billed_requests"], m2.counts["billed_images"]) \
        == (6, 3)
    assert used["prompt_evals"] == 6 and m2.counts["billed_tokens"] > 0  # texts embedded


# ---- methods end to end through the transports ----------------------------------------------------
def test_zeroshot_through_the_hf_protocol_equals_the_local_run(server, key, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", key)
    kw = dict(method="zeroshot", dataset="shapes", shots=1, seed=2, test_subset=60)
    here = run(make_run_config(**kw), out=tmp_path / "l", progress=False)
    there = run(make_run_config(**kw, box=f"hf:{server.url}/v1/zero-shot-image-classification",
                                box_options={"image_size": 32}), out=tmp_path / "hf", progress=False)
    assert there.accuracy == here.accuracy  # uint8 shapes: the PNGs carry the exact pixels
    e = there.eval_queries
    assert {u: e[u] for u in here.eval_queries} == here.eval_queries  # bbpt's units, as in process
    assert e["billed_requests"] == e["images_forwarded"] > 60  # one request per image (val + test)


def test_bar_trains_on_probabilities_only_metered_exactly(server, key, tmp_path, monkeypatch):
    """BAR through the Hugging Face protocol: pixel prompts in, probabilities out; the run's
    meters equal the server's counts, every request billed."""
    monkeypatch.setenv("HF_TOKEN", key)
    k = server.key("bar-hf")
    (tmp_path / "key").write_text(k + "\n")
    kw = dict(method="bar", dataset="shapes", shots=1, seed=3, test_subset=40, box_options={"image_size": 32},
              box=f"hf:{server.url}/v1/zero-shot-image-classification", options={"budget": 12, "batch_size": 8, "q": 2})
    r = run(make_run_config(**kw), out=tmp_path / "r", progress=False, key_file=str(tmp_path / "key"))
    q = r.queries
    assert q["api_calls"] == 12 and q["billed_requests"] == 12 * 8  # 3 candidates x 8 images a step, 4 steps
    used = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["purposes"]
    # the protocol bills per request (one image, one template): the server's count of them is the run's
    assert used["train"]["api_calls"] == q["billed_requests"] and used["train"]["images_forwarded"] == q["images_forwarded"]
    assert r.accuracy.test is not None


def test_the_readme_matrix_is_what_bbpt_methods_matrix_prints():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- methods --matrix -->\n")[1].split("\n<!-- /methods --matrix -->")[0]
    assert block == boxes.matrix({n: METHODS.get(n).needs for n in SHIPPED})
