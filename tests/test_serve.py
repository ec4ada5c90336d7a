"""asarm serve over real HTTP on loopback: every endpoint, streaming, the OpenAI client, 32
concurrent same-seed requests, the bad-input table, 429, disconnects, timeouts, the API key."""

from __future__ import annotations

import itertools

import concurrent.futures as cf
import sys
import time

import httpx
import pytest
import torch

import asarm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from serve_util import running_server, shipped_model, sse_events  # noqa: E402

PROMPT = "The old man walked to the"


@pytest.fixture(scope="module")
def server():
    with running_server(max_batch=32, max_queue=256) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def test_health_models_metrics(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "asarm-en-small"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "asarm-en-small"
    assert models["data"][0]["max_length"] == 128
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "seed": 0})
    text = client.get("/metrics").text
    for name in ("asarm_requests_total", "asarm_queue_depth", "asarm_batch_size_bucket",
                 "asarm_tokens_per_pass_bucket", "asarm_acceptance_rate", "asarm_request_latency_seconds_bucket"):
        assert name in text, name
    assert 'asarm_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_completion_shape_and_stats(client):
    r = client.post("/v1/completions", json={"model": "asarm-en-small", "prompt": PROMPT, "max_tokens": 8, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert isinstance(choice["text"], str) and choice["text"] and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    stats = choice["asarm"]
    assert stats["tokens"] == 8 and stats["nfe"] >= 1 and stats["tokens_per_pass"] == round(8 / stats["nfe"], 4)
    assert sum(stats["tokens_per_round"]) == 8 and len(stats["tokens_per_round"]) == stats["rounds"]
    assert body["asarm"]["nfe"] == stats["nfe"]
    # the same seed gives the same text
    again = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "seed": 3}).json()
    assert again["choices"][0]["text"] == choice["text"]


def test_completion_stream_equals_whole(client):
    req = {"prompt": PROMPT, "max_tokens": 12, "seed": 5, "n": 2}
    whole = client.post("/v1/completions", json=req).json()
    r = client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in whole["choices"]]
    finals = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(ch["index"] for ch in finals) == [0, 1] and all(ch["asarm"]["tokens"] == 12 for ch in finals)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24


def test_completion_with_suffix_and_logprobs(client):
    req = {"prompt": PROMPT, "suffix": " and sat down.", "hole_length": 5, "seed": 1, "logprobs": 1}
    body = client.post("/v1/completions", json=req).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["asarm"]["holes"][0]["length"] == 5
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 5 and "".join(lp["tokens"]) == choice["text"]
    assert all(v < 0 for v in lp["token_logprobs"])


def test_infill_stream_positions(client):
    text = "The [MASK:3] walked to the [MASK:4] and sat."
    whole = client.post("/v1/infill", json={"text": text, "seed": 2}).json()
    events = sse_events(client.post("/v1/infill", json={"text": text, "seed": 2, "stream": True}).text)
    assert events[0]["object"] == "infill.start" and events[-1] == "[DONE]"
    start = events[0]["choices"][0]
    hidden = [i for i, t in enumerate(start["tokens"]) if t["hidden"]]
    assert [h["length"] for h in start["holes"]] == [3, 4]
    rounds = [e for e in events if isinstance(e, dict) and e["object"] == "infill.round"]
    filled = [p for e in rounds for p in e["positions"]]
    assert sorted(filled) == hidden  # every hole position exactly once
    assert [e["round"] for e in rounds] == list(range(1, len(rounds) + 1))
    done = next(e for e in events if isinstance(e, dict) and e["object"] == "infill.done")
    assert done["text"] == whole["choices"][0]["text"] and "[MASK" not in done["text"]
    assert done["text"].startswith("The ") and done["text"].endswith(" and sat.")
    assert [h["length"] for h in done["holes"]] == [3, 4]
    assert "".join(e["text"] for e in rounds) == done["text"]  # the final prefix, grown round by round
    assert events[-2]["object"] == "infill.end"


def test_score_equals_library(client):
    r = client.post("/v1/score", json={"text": "The cat [[sat on]] the mat.", "seed": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    model = shipped_model()
    from asarm.text import parse_scored_text

    ids, hidden = parse_scored_text(model.tokenizer, "The cat [[sat on]] the mat.")
    ref = asarm.score(model, ids, hidden, seed=0)
    assert abs(body["log_prob"] - float(ref.log_prob)) < 1e-6
    assert body["num_tokens"] == int(hidden.sum()) == len(body["tokens"])
    assert abs(sum(t["logprob"] for t in body["tokens"]) - body["log_prob"]) < 1e-6


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")
    out = oa.completions.create(model="asarm-en-small", prompt=PROMPT, max_tokens=6, seed=4,
                                extra_body={"method": "assd", "k": 3})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.model_extra["asarm"]["tokens"] == 6
    pieces = [c.choices[0].text for c in oa.completions.create(model="asarm-en-small", prompt=PROMPT,
              max_tokens=6, seed=4, stream=True, extra_body={"method": "assd", "k": 3}) if c.choices]
    assert "".join(pieces) == out.choices[0].text
    fim = oa.completions.create(model="asarm-en-small", prompt=PROMPT, suffix=" and sat down.", max_tokens=8,
                                temperature=0, extra_body={"hole_length": 4})
    assert fim.choices[0].finish_reason == "stop" and fim.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model="asarm-en-small", prompt=PROMPT, max_tokens=-3)
    assert "max_tokens" in str(err.value)


def test_32_concurrent_same_seed_same_output(server):
    url = server[0]
    reqs = [{"prompt": PROMPT if i % 2 else "She opened the door and", "max_tokens": 10 + i % 5, "seed": 100 + i,
             "method": "sequential" if i % 4 == 0 else "assd", "k": 1 + i % 5, "temperature": 0 if i % 7 == 0 else 1.0}
            for i in range(32)]
    with httpx.Client(base_url=url, timeout=120) as c:
        alone = [c.post("/v1/completions", json=r).json()["choices"][0]["text"] for r in reqs]
    metrics_before = httpx.get(url + "/metrics").text

    def one(r):
        with httpx.Client(base_url=url, timeout=120) as c:
            return c.post("/v1/completions", json=r)

    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, reqs))
    assert [a.status_code for a in answers] == [200] * 32
    assert len({a.json()["id"] for a in answers}) == 32
    # they really were batched: some pass had more than one row
    after = httpx.get(url + "/metrics").text
    assert _bucket(after, "asarm_batch_size_bucket", "1.0") - _bucket(metrics_before, "asarm_batch_size_bucket", "1.0") \
        < _count(after, "asarm_batch_size_count") - _count(metrics_before, "asarm_batch_size_count")
    together = [a.json()["choices"][0]["text"] for a in answers]
    differ = [i for i in range(32) if together[i] != alone[i]]
    # A broken seed or a row reading its neighbours' state changes many requests: that fails here.
    assert len(differ) <= 1, f"requests {differ} differ alone vs among 31 others"
    if differ:  # KNOWN: fp32 passes differ in the last bits with the batch's shape, which can (rarely)
        # flip one draw of a 8192-token vocabulary; reported, never hidden (docs/design.md, "Exact cache")
        pytest.xfail(f"request {differ[0]} differs alone vs among 31 others: fp32 batch-shape numerics")


def test_engine_keeps_no_autograd_graph(server, client):
    """A pass must not record autograd history: chained through the cache it grows without bound."""
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "seed": 9})
    assert r.status_code == 200
    cache = server[1].state.asarm.loop.adapter.engine.cache
    assert cache is not None and not any(t.requires_grad for t in [*cache.keys, *cache.values])


def _bucket(text, name, le):
    for line in text.splitlines():
        if line.startswith(f'{name}{{le="{le}"}}'):
            return float(line.split()[-1])
    return 0.0


def _count(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


BAD = [  # (path, raw body, status, param or None)
    ("/v1/completions", "not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", "", 400, None),
    ("/v1/completions", '{"max_tokens": 4}', 400, "prompt"),
    ("/v1/completions", '{"prompt": 3}', 400, "prompt"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": -1}', 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 10000000}', 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 1000}', 400, None),
    ("/v1/completions", '{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "a", "n": 100}', 400, "n"),
    ("/v1/completions", '{"prompt": "a", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", '{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
    ("/v1/completions", '{"prompt": "a", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", '{"prompt": "a", "k": 0}', 400, "k"),
    ("/v1/completions", '{"prompt": "a", "method": "beam"}', 400, "method"),
    ("/v1/completions", '{"prompt": "a", "frobnicate": 1}', 400, "frobnicate"),
    ("/v1/completions", '{"prompt": "a", "echo": 1}', 400, "echo"),
    ("/v1/completions", '{"prompt": "a", "logprobs": 6}', 400, "logprobs"),
    ("/v1/completions", '{"prompt": []}', 400, "prompt"),
    ("/v1/completions", '{"prompt": ["a", 5]}', 400, "prompt"),
    ("/v1/completions", '{"prompt": "a", "model": "gpt-4"}', 404, None),
    ("/v1/completions", '{"prompt": "' + "word " * 200 + '"}', 400, None),
    ("/v1/completions", '{"prompt": "' + "x" * 200_000 + '"}', 400, "prompt"),
    ("/v1/infill", '{"text": "no holes here"}', 400, None),
    ("/v1/infill", '{"text": "a [MASK:0] b"}', 400, None),
    ("/v1/infill", '{"text": "a [MASK:5-2] b"}', 400, None),
    ("/v1/infill", '{"text": "a [MASK:x] b"}', 400, None),
    ("/v1/infill", '{"text": "a [MASK:100000] b"}', 400, None),
    ("/v1/infill", '{"text": "a [MASK:3"}', 400, None),
    ("/v1/infill", '{"text": ["a"]}', 400, "text"),
    ("/v1/score", '{"text": ""}', 400, "text"),
    ("/v1/score", '{"text": "a [[]] b"}', 400, None),
    ("/v1/score", '{"text": "' + "word " * 200 + '"}', 400, None),
]


@pytest.mark.parametrize("path,raw,status,param", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input(client, path, raw, status, param):
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in r.text
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_not_found_and_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/completions").status_code == 405


def test_api_key():
    with running_server(api_key="s3cret") as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the static page; the API behind it needs the key
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 401


def test_full_queue_answers_429():
    with running_server(max_batch=1, max_queue=2, pass_delay=0.05) as (url, _):
        def one(i):
            return httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "seed": i,
                                                              "method": "sequential"}, timeout=120)

        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 429} and codes.count(200) >= 3, codes
        refused = [a for a in answers if a.status_code == 429]
        assert all(int(a.headers["Retry-After"]) >= 1 and a.json()["error"]["type"] == "rate_limit_error" for a in refused)
        metrics = httpx.get(url + "/metrics").text
        assert _count(metrics, "asarm_rejected_total") == len(refused)


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_the_row():
    with running_server(pass_delay=0.1) as (url, _):
        req = {"prompt": "Once", "max_tokens": 100, "method": "sequential", "stream": True, "seed": 0}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/completions", json=req) as r:
                lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
                next(lines)  # the first token arrived: the row is in the batch
                assert httpx.get(url + "/health").json()["active_rows"] == 1
        # the client hung up after ~1 of 100 passes (10 s of work): its row must leave the batch
        assert _wait(lambda: httpx.get(url + "/health").json()["active_rows"] == 0, timeout=5)
        metrics = httpx.get(url + "/metrics").text
        assert _count(metrics, "asarm_rows_cancelled_total") == 1
        assert _count(metrics, "asarm_rows_finished_total") == 0
        # a non-streaming request whose client gives up is dropped too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**req, "stream": False}, timeout=0.5)
        assert _wait(lambda: _count(httpx.get(url + "/metrics").text, "asarm_rows_cancelled_total") == 2, timeout=5)


def test_request_timeout():
    with running_server(pass_delay=0.1, request_timeout=0.5) as (url, _):
        req = {"prompt": "Once", "max_tokens": 60, "method": "sequential", "seed": 0}
        r = httpx.post(url + "/v1/completions", json=req, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        events = sse_events(httpx.post(url + "/v1/completions", json={**req, "stream": True}, timeout=30).text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout_error"
        assert _wait(lambda: httpx.get(url + "/health").json()["active_rows"] == 0, timeout=5)


def test_unknown_length_uses_the_posterior(monkeypatch, server):
    """[MASK] and a suffix without hole_length go through the library's length choice
    (asarm.text.choose_plan -> asarm.lengths.joint_posterior, the markup parsed by asarm.text,
    a space before the hole moved into it): greedy takes the argmax and the answer reports the
    length and its probability; the completion leaves out the prompt's own trailing space."""
    import asarm.lengths

    calls = []

    def joint_posterior(model, segments, candidates, *, prior=None, temperature=1.0, factorization="right-given-left"):
        calls.append((segments, candidates))
        cells = [tuple(c) for c in itertools.product(*candidates)]
        probs = torch.full((len(cells),), 0.5 / (len(cells) - 1))
        probs[[c[0] for c in cells].index(3)] = 0.5
        return cells, probs

    monkeypatch.setattr(asarm.lengths, "joint_posterior", joint_posterior)
    url = server[0]
    r = httpx.post(url + "/v1/infill", json={"text": "The [MASK] sat on the mat.", "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    hole = r.json()["choices"][0]["holes"][0]
    assert hole["length"] == 3 and abs(hole["probability"] - 0.5) < 1e-6
    assert r.json()["choices"][0]["text"].startswith("The ") and "  " not in r.json()["choices"][0]["text"]
    model = shipped_model()
    enc = asarm.tokenization.encode
    assert calls[-1] == ([enc(model.tokenizer, "The"), enc(model.tokenizer, " sat on the mat.")], [list(range(1, 33))])
    body = httpx.post(url + "/v1/completions", json={"prompt": "The cat sat on the ", "suffix": " and sat.",
                                                      "max_tokens": 6, "temperature": 0}, timeout=60).json()
    assert body["choices"][0]["asarm"]["holes"][0]["length"] == 3 and calls[-1][1] == [list(range(1, 7))]
    assert calls[-1][0][0] == enc(model.tokenizer, "The cat sat on the")  # the space moved into the hole
    assert not body["choices"][0]["text"].startswith(" ")  # the client already has that space


def test_loadtest_runs_and_writes_results(server, tmp_path):
    import json

    from asarm.bench import loadtest

    rc = loadtest.main(["--url", server[0], "--clients", "1,2", "--duration", "1", "--repeats", "1",
                        "--max-tokens", "4", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["clients"] for r in data["summary"]] == [1, 2]
    assert all(r["errors"] == 0 and r["tokens_per_s"] > 0 for r in data["summary"])
    assert data["summary"][0]["speedup_vs_one_at_a_time"] == 1.0
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_bench_serve_is_the_load_test(server, tmp_path):
    """`asarm bench serve` runs the same load test from the main command line."""
    import json

    from asarm.cli import main

    rc = main(["bench", "serve", "--url", server[0], "--clients", "1", "--duration", "1", "--repeats", "1",
               "--max-tokens", "4", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["setup"]["command"].startswith(f"asarm bench serve --url {server[0]} --clients 1")
    assert data["summary"][0]["clients"] == 1 and data["summary"][0]["errors"] == 0


def test_length_prior_in_requests(server):
    """length_prior (weights of lengths 1, 2, ..., as `asarm length-prior` writes them) goes to the
    length posterior of [MASK] holes and of a suffix's middle; bad priors are a 400."""
    url = server[0]
    r = httpx.post(url + "/v1/infill", json={"text": "The [MASK] sat on the mat.", "temperature": 0,
                                             "length_prior": [0, 0, 1]}, timeout=60)
    assert r.status_code == 200, r.text
    hole = r.json()["choices"][0]["holes"][0]
    assert hole["length"] == 3 and abs(hole["probability"] - 1.0) < 1e-9  # the only length with weight
    body = httpx.post(url + "/v1/completions", json={"prompt": "The cat sat on the ", "suffix": " and sat.",
                                                      "max_tokens": 8, "seed": 3, "length_prior": [0, 1, 0, 0, 1]},
                      timeout=60).json()
    assert body["choices"][0]["asarm"]["holes"][0]["length"] in (2, 5)
    for bad, where in [([-1.0], "length_prior"), ([], "length_prior"), (["1"], "length_prior"),
                       ([0.0, 0.0], "prior")]:
        r = httpx.post(url + "/v1/infill", json={"text": "The [MASK:1-2] sat.", "length_prior": bad}, timeout=60)
        assert r.status_code == 400 and where in r.text, (bad, r.status_code, r.text)


# ---------------------------------------------------------------- reliability (issue 30)

def test_unclosed_spans_are_parsed_in_linear_time_off_the_event_loop(client):
    """50,000 unclosed ``[[`` took 70 s on the event loop (/health waited as long)."""
    from asarm.text.markup import find_spans

    start = time.perf_counter()
    with pytest.raises(asarm.InputError, match="unclosed"):
        find_spans("[[" * 200_000)
    assert time.perf_counter() - start < 1.0
    with cf.ThreadPoolExecutor(1) as pool:
        # 16,000 (not 50,000): longer texts are now refused by their length before any parsing
        slow = pool.submit(client.post, "/v1/score", json={"text": "[[" * 16_000})
        time.sleep(0.05)
        start = time.perf_counter()
        assert client.get("/health").status_code == 200
        health = time.perf_counter() - start
        r = slow.result()
    assert r.status_code == 400 and "unclosed" in r.json()["error"]["message"]
    assert health < 2.0


def test_infinite_perplexity_is_null_not_a_500(client):
    r = client.post("/v1/score", json={"text": "The cat [[sat on]] the mat.", "temperature": 0.001})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["perplexity"] is None or isinstance(body["perplexity"], float)


def test_body_limits_at_the_transport(server):
    import socket
    from urllib.parse import urlparse

    url = urlparse(server[0])
    with httpx.Client(base_url=server[0], timeout=30) as c:
        # a declared length over the limit: 413 before a byte of the body is read
        with socket.create_connection((url.hostname, url.port)) as s:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 300000000\r\n\r\n")
            s.settimeout(10)
            assert b" 413 " in s.recv(4096).split(b"\r\n")[0] + b" "
        # a chunked body (no length): counted as it streams
        def chunks():
            for _ in range(40):
                yield b"x" * 50_000
        r = c.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_a_client_gone_while_sending_its_body_is_a_quiet_499(server, caplog):
    import socket
    from urllib.parse import urlparse

    url = urlparse(server[0])
    for _ in range(3):
        with socket.create_connection((url.hostname, url.port)) as s:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"text\": ")
        time.sleep(0.1)
    with httpx.Client(base_url=server[0], timeout=30) as c:
        metrics = c.get("/metrics").text
    assert 'endpoint="/v1/score",status="500"' not in metrics
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "ClientDisconnect" in str(r.exc_info)]


def test_hole_length_planning_is_off_the_engine_once_per_request_and_bounded(server, monkeypatch):
    """Two holes of up to 64 tokens (4,096 exact cells) took 66 s on the engine thread, once
    per choice; a 4-token completion waited as long."""
    from asarm import lengths

    calls = []
    real = lengths.evidence_log_likelihoods

    def counted(model, segments, cells, **kw):
        calls.append(len(cells))
        return real(model, segments, cells, **kw)

    monkeypatch.setattr(lengths, "evidence_log_likelihoods", counted)
    with httpx.Client(base_url=server[0], timeout=120) as c, cf.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(c.post, "/v1/infill", json={"text": "The [MASK] and the [MASK] end.", "max_hole": 64,
                                                       "seed": 1, "n": 3})
        time.sleep(0.2)
        start = time.perf_counter()
        quick = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "seed": 0})
        quick_s = time.perf_counter() - start
        r = slow.result()
    assert quick.status_code == 200 and r.status_code == 200, r.text
    # capped: hole by hole (64 + 64 rows), computed once for the three choices' shared posterior
    assert max(calls) <= 64 and sum(calls) <= 3 * 128, calls
    assert quick_s < 30


def test_planning_stops_at_the_request_timeout():
    from asarm.lengths import PlanningTimeout, length_posterior, planning_budget

    model = shipped_model()
    with planning_budget(deadline=time.monotonic() - 1):
        with pytest.raises(PlanningTimeout):
            length_posterior(model, [5, 6, 7], [8, 9], lengths=range(1, 20))


def test_ten_masks_in_a_short_text_fit():
    """The hole-by-hole approximation parked later holes at their median length and refused."""
    model = shipped_model()
    text = "A " + " ".join(["[MASK]"] * 10) + " end."
    out = asarm.infill(model, text, seed=0, max_hole=32)
    assert isinstance(out, str) and out.endswith("end.")


@pytest.mark.parametrize("argv, message", [
    (["--api-key", ""], "API key is empty"),
    (["--request-timeout", "nan"], "--request-timeout"),
    (["--grace", "inf"], "--grace"),
    (["--port", "70000"], "--port must be between 1 and 65535"),
])
def test_serve_option_values_are_one_line_errors(argv, message, capsys):
    from asarm.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_busy_port_is_one_line_exit_2(capsys):
    import socket

    from asarm.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1
