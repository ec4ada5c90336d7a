"""Editor-ready endpoints: llama.cpp's POST /infill as llama.vim and llama.vscode send it, and on
/v1/completions a list of prompts, echo and exact top-n log-probs."""

from __future__ import annotations

import math

import httpx
import pytest

from serve_util import running_server, sse_events

PREFIX = "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n"
LINE = "    return "
SUFFIX = "\n\ndef sub(a, b):\n    return a - b\n"


@pytest.fixture(scope="module")
def server():
    with running_server() as (url, app):
        yield url


def llama_vim_request(**overrides):
    """The body llama.vim's llama#fim sends (autoload/llama.vim), fields and types as it sends them."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX,
            "input_extra": [{"text": "import math\n", "time": [1700000000, 1], "filename": "util.py"}],
            "prompt": LINE, "n_predict": 8, "n_indent": 4, "top_k": 40, "top_p": 0.90, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 250,
            "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                                "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                                "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                                "tokens_cached"]}
    body.update(overrides)
    return body


def test_llama_vim_fim_request(server):
    resp = httpx.post(server + "/infill", json=llama_vim_request(seed=0), timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) == {"content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                        "tokens_cached"}
    assert isinstance(out["content"], str) and 1 <= out["timings/predicted_n"] <= 8
    assert out["truncated"] is False
    again = httpx.post(server + "/infill", json=llama_vim_request(seed=0), timeout=120).json()
    assert again["content"] == out["content"]  # the same seed, the same text


def test_llama_vim_ring_update_request(server):
    """llama.vim's background context warm-up: n_predict 0, response_fields [""]."""
    body = {"input_prefix": "", "input_suffix": "", "input_extra": [{"text": "x = 1\n", "time": 0, "filename": "a.py"}],
            "prompt": "", "n_predict": 0, "temperature": 0.0, "stream": False, "samplers": [],
            "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
    resp = httpx.post(server + "/infill", json=body, timeout=60)
    assert resp.status_code == 200 and resp.json() == {}


def test_llama_vscode_request_full_answer_and_model_placeholder(server):
    """llama.vscode's shape (no response_fields: the whole llama.cpp answer), model placeholder."""
    body = {"model": " ", "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [],
            "prompt": LINE, "n_predict": 6, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 1000, "t_max_predict_ms": 1000, "seed": 3}
    resp = httpx.post(server + "/infill", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    for field in ("content", "stop", "stop_type", "tokens_predicted", "tokens_evaluated", "truncated", "timings",
                  "generation_settings", "model", "tokens_cached"):
        assert field in out, field
    assert out["stop"] is True and out["stop_type"] == "eos" and 1 <= out["tokens_predicted"] <= 6
    assert out["generation_settings"]["top_p"] == 0.99 and out["generation_settings"]["seed"] == 3


def test_infill_without_suffix_generates_n_predict_tokens(server):
    out = httpx.post(server + "/infill", json={"input_prefix": "The old man", "n_predict": 5, "seed": 1},
                     timeout=120).json()
    assert out["tokens_predicted"] == 5 and out["stop_type"] == "limit"


def test_infill_streams_llama_cpp_events(server):
    with httpx.stream("POST", server + "/infill", json=llama_vim_request(stream=True, seed=0, response_fields=None),
                      timeout=120) as resp:
        assert resp.status_code == 200
        events = sse_events(resp.read().decode())
    assert events and all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    whole = httpx.post(server + "/infill", json=llama_vim_request(seed=0, response_fields=None), timeout=120).json()
    assert "".join(e["content"] for e in events) == whole["content"]
    assert events[-1]["tokens_predicted"] == whole["tokens_predicted"]


def test_infill_cuts_long_context_to_the_limit(server):
    long_prefix = "".join(f"x{i} = {i}\n" for i in range(400))
    body = llama_vim_request(input_prefix=long_prefix, input_extra=[{"filename": "b.py", "text": "y = 2\n" * 300}],
                             seed=0, response_fields=None)
    out = httpx.post(server + "/infill", json=body, timeout=120).json()
    assert out["truncated"] is True and out["tokens_evaluated"] + out["tokens_predicted"] <= 128


def test_infill_bad_field_is_a_400(server):
    resp = httpx.post(server + "/infill", json={"input_prefix": "a", "n_predict": "many"}, timeout=60)
    assert resp.status_code == 400 and "n_predict" in resp.json()["error"]["message"]


# --- /v1/completions: prompt lists, echo, logprobs ------------------------------------------------
def test_prompt_list_gives_each_prompts_choices_in_order(server):
    prompts = ["The old man walked to the", "She opened the"]
    out = httpx.post(server + "/v1/completions", json={"prompt": prompts, "max_tokens": 4, "n": 2, "seed": 10},
                     timeout=120).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 16
    # prompt i alone with seed + i·n gives choices i·n, i·n + 1
    for i, prompt in enumerate(prompts):
        alone = httpx.post(server + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 2,
                                                             "seed": 10 + 2 * i}, timeout=120).json()
        assert [c["text"] for c in alone["choices"]] == [c["text"] for c in out["choices"][2 * i:2 * i + 2]]


def test_prompt_list_with_a_bad_prompt_names_it(server):
    resp = httpx.post(server + "/v1/completions", json={"prompt": ["ok", "word " * 300], "max_tokens": 4}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt.1"


def test_echo_puts_the_prompt_first(server):
    body = {"prompt": "The old man walked to the", "max_tokens": 4, "seed": 2, "echo": True, "logprobs": 0}
    out = httpx.post(server + "/v1/completions", json=body, timeout=120).json()
    plain = httpx.post(server + "/v1/completions", json=dict(body, echo=False), timeout=120).json()
    choice = out["choices"][0]
    assert choice["text"] == body["prompt"] + plain["choices"][0]["text"]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and lp["token_logprobs"][0] is None
    assert lp["text_offset"][-4:] == [o + len(body["prompt"]) for o in plain["choices"][0]["logprobs"]["text_offset"]]


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 20}, {"method": "sequential"},
                                     {"order": "random"}])
def test_top_logprobs_are_exact_alternatives(server, options):
    """The sampled token's log-prob is its entry among the alternatives (when it is among the n
    likeliest), the alternatives are sorted, normalised within 1, and the same for the same seed."""
    body = {"prompt": "The old man walked to the", "suffix": " and sat down.", "hole_length": 5, "seed": 4,
            "logprobs": 5, **options}
    out = httpx.post(server + "/v1/completions", json=body, timeout=120).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == len(lp["tokens"]) == 5
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        values = list(top.values())
        assert 1 <= len(values) <= 5 and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        if token in top:
            assert top[token] == pytest.approx(value, abs=1e-4)
        else:
            assert value <= min(values) + 1e-4
    again = httpx.post(server + "/v1/completions", json=body, timeout=120).json()
    for top_again, top in zip(again["choices"][0]["logprobs"]["top_logprobs"], lp["top_logprobs"]):
        assert top_again == pytest.approx(top)


def test_greedy_top_logprobs_hold_only_the_choice(server):
    body = {"prompt": "The old man walked to the", "max_tokens": 3, "temperature": 0, "logprobs": 3}
    lp = httpx.post(server + "/v1/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
    assert all(top == {token: 0.0} for token, top in zip(lp["tokens"], lp["top_logprobs"]))


def test_openai_client_reads_prompt_lists_echo_and_logprobs(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    out = client.completions.create(model="asarm-en-small", prompt=["A quiet", "The old"], max_tokens=3, seed=0,
                                    echo=True, logprobs=2)
    assert len(out.choices) == 2 and out.choices[1].text.startswith("The old")
    assert len(out.choices[0].logprobs.top_logprobs[-1]) <= 2
