"""dms_jax.serve.api through a real `python -m experiments.serve` process on loopback, driven by the official
`openai` client (and raw HTTP for what the client cannot send): the tiny Llama with its byte tokenizer
(train_helpers), vanilla policy, prefix cache off so that every page must be back in the pool at the end.

Greedy answers are compared with the same prompts run in this process through Engine.generate (an independent
path: one batch, its own cache); streamed deltas add up to the whole answer; concurrent requests do not disturb
each other; bad requests get OpenAI-style 400s naming the parameter; a client that goes away mid-stream frees its
pages. Stop strings cut the text.
"""

import contextlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402

CONTEXT, PAGE, CHUNK = 256, 4, 16
MODEL = "tiny-test"
PROMPTS = ["The quick brown fox", "Lists are mutable sequences", "def f(x):\n    return", "Hello, world. " * 4]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return th.tiny_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


@contextlib.contextmanager
def _running_server(assets, extra=(), devices=1):
    """A `python -m experiments.serve` process on a free loopback port (vanilla, tiny model); yields its URL."""
    port = th.free_port()
    cmd = [sys.executable, "-m", "experiments.serve", "--model", str(assets["model"]), "--policy", "vanilla",
           "--name", MODEL, "--port", str(port), "--context", str(CONTEXT), "--max-seqs", "4", "--page-size",
           str(PAGE), "--prefill-chunk", str(CHUNK), "--segment-steps", "4", "--no-prefix-cache", *extra]
    proc = subprocess.Popen(cmd, cwd=th.REPO, env=th.cli_env(assets, devices=devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert th.wait_for(up, timeout=120, interval=0.5, proc=proc), proc.stdout.read() if proc.poll() else ""
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(assets):
    with _running_server(assets) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(assets):
    """Greedy answers of the same model through the engine, in this process."""
    from dms_jax import weights
    from dms_jax.serve.engine import Engine

    model, tok = weights.load_model(assets["model"]), weights.load_tokenizer(assets["model"])
    eng = Engine(model, "vanilla", page_size=PAGE, prefill_chunk=CHUNK)

    def answer(prompt_ids, n):
        return eng.generate([prompt_ids], max_new_tokens=n, context=CONTEXT).requests[0].tokens

    return tok, answer


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_concurrent_greedy_completions_equal_the_engine(client, reference):
    tok, answer = reference
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                                                  temperature=0), PROMPTS))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        want = answer(ids, 10)
        assert out.choices[0].text == _text(tok, want)
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
        assert out.choices[0].finish_reason == ("stop" if len(want) < 10 else "length")


def test_streamed_chat_adds_up_to_the_whole_answer(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.choices[0].message.role == "assistant"


def test_stop_string_cuts_the_text(client, reference):
    tok, answer = reference
    prompt = PROMPTS[0]
    full = _text(tok, answer(tok(prompt, add_special_tokens=False)["input_ids"], 12))
    stop = full[3:5]  # two characters from inside the answer
    assert stop and full.find(stop) >= 0
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw, param", [
    (dict(model="no-such-model"), "model"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=5.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(prompt="x" * (CONTEXT + 10)), "prompt"),
    (dict(max_tokens=CONTEXT), "max_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
])
def test_bad_requests_get_a_400_naming_the_parameter(client, kw, param):
    import openai

    args = dict(model=MODEL, prompt="Hello", max_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_malformed_json_and_a_bad_message_list(server):
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def _metric(server, name):
    text = httpx.get(server + "/metrics").text
    line = next(li for li in text.splitlines() if li.startswith(f"dms_{name}{{"))
    return float(line.split()[-1])


def test_disconnect_mid_stream_frees_the_pages(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert json.loads(line[len("data: "):])["choices"][0]["finish_reason"] is None
                break  # one delta arrived; now go away
    deadline = time.time() + 60
    while time.time() < deadline and (_metric(server, "running") or _metric(server, "pages_used")):
        time.sleep(0.5)
    assert _metric(server, "running") == 0 and _metric(server, "pages_used") == 0
    assert _metric(server, "cancelled_total") >= 1
    assert np.isfinite(_metric(server, "tokens_per_s"))


def test_mixed_load_loses_corrupts_and_leaks_nothing(server):
    """The load test's library (dms_jax.eval.serve_load, behind benchmarks/load_test_serve.py) on this server: a
    mix of completions, streamed chats, abandoned streams and invalid requests from 6 clients at once."""
    from dms_jax.eval.serve_load import make_requests, run_load, tally

    reqs = make_requests(18, CONTEXT, seed=3, model=MODEL, max_chars=120)
    assert {r["kind"] for r in reqs} == {"completion", "chat_stream", "abandon", "invalid"}
    run = run_load(server, reqs, clients=6, timeout=300)
    assert tally(reqs, run["loaded"], run["alone"]) == {"lost": 0, "hung": 0, "corrupted": 0, "bad_errors": 0}
    assert run["pages_leaked"] == 0


def test_tensor_parallel_server_gives_the_same_answers(assets, reference):
    """`--tensor-parallel 2` on 2 fake CPU devices (the tiny model's 2 KV heads, one per device): the greedy
    answers of the single-device engine, concurrent requests included."""
    from openai import OpenAI

    tok, answer = reference
    with _running_server(assets, ["--tensor-parallel", "2"], devices=2) as base:
        tp = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda p: tp.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                                                  temperature=0), PROMPTS))
    for prompt, out in zip(PROMPTS, outs):
        assert out.choices[0].text == _text(tok, answer(tok(prompt, add_special_tokens=False)["input_ids"], 10))
