"""``asarm batch``: OpenAI batch lines in and out, bad lines, resume after kill -9, the same
outputs as the server, and Ray (a local instance) when it is installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from asarm.batch.format import OutputWriter, parse_request_line, read_requests, scan_output
from asarm.cli import main
from conftest import ROOT

STORY = "The old man walked to the [MASK:6] and sat down."


def request(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def read_output(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def by_id(lines):
    return {line["custom_id"]: line for line in lines}


def seeded_requests(n=6):
    """A mix of the three urls, every request seeded (so outputs are comparable)."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(request(f"inf-{i}", "/v1/infill", {"text": STORY, "seed": i, "k": 5}))
        elif i % 3 == 1:
            out.append(request(f"cmp-{i}", "/v1/completions",
                               {"prompt": "The old man walked to the", "suffix": " and sat down.",
                                "hole_length": 5, "seed": i, "logprobs": 1}))
        else:
            out.append(request(f"scr-{i}", "/v1/score", {"text": "The cat [[sat on]] the mat.", "seed": i}))
    return out


def run_batch(tmp_path, lines, *extra, name="in.jsonl", out="out.jsonl"):
    src = write_lines(tmp_path / name, lines)
    dst = str(tmp_path / out)
    code = main(["batch", src, "-o", dst, "--no-progress", "--max-batch", "4", *extra])
    return code, dst


# --- the format --------------------------------------------------------------------------------
def test_request_line_in_openais_shape_and_output_line_shape(tmp_path):
    # OpenAI's documented input line (the Batch API guide), our url
    line = '{"custom_id": "request-1", "method": "POST", "url": "/v1/completions", ' \
           '"body": {"model": "asarm-en-small", "prompt": "Hello", "max_tokens": 4, "seed": 0}}'
    req = parse_request_line(line, 1)
    assert (req.custom_id, req.url, req.error) == ("request-1", "/v1/completions", None)
    assert req.body["prompt"] == "Hello"

    code, dst = run_batch(tmp_path, [line])
    assert code == 0
    [out] = read_output(dst)
    # OpenAI's documented output line: id, custom_id, response {status_code, request_id, body}, error
    assert set(out) == {"id", "custom_id", "response", "error"}
    assert out["id"].startswith("batch_req_") and out["custom_id"] == "request-1" and out["error"] is None
    assert set(out["response"]) == {"status_code", "request_id", "body"}
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"].startswith("req_")
    body = out["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "asarm-en-small"
    assert body["usage"]["completion_tokens"] == 4 and isinstance(body["choices"][0]["text"], str)
    # the body parses as the openai client's own Completion type
    from openai.types import Completion

    assert Completion.model_validate(body).choices[0].finish_reason == "length"


def test_bad_lines_become_their_errors_and_the_batch_goes_on(tmp_path):
    lines = [
        request("ok", "/v1/infill", {"text": STORY, "seed": 0}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"method": "POST", "url": "/v1/infill", "body": {"text": STORY}}),  # no custom_id
        request("url", "/v1/chat/completions", {"messages": []}),
        request("field", "/v1/infill", {"text": STORY, "k": "five"}),
        request("holes", "/v1/infill", {"text": "no holes here"}),
        request("long", "/v1/infill", {"text": "word " * 200 + "[MASK:3]"}),
        json.dumps({"custom_id": "method", "method": "GET", "url": "/v1/infill", "body": {}}),
        "",  # blank lines are skipped
    ]
    code, dst = run_batch(tmp_path, lines)
    assert code == 0
    out = by_id(read_output(dst))
    assert set(out) == {"ok", "line-2", "line-3", "line-4", "url", "field", "holes", "long", "method"}
    assert out["ok"]["error"] is None and out["ok"]["response"]["status_code"] == 200
    assert out["line-2"]["response"] is None and out["line-2"]["error"]["code"] == "invalid_json"
    assert out["line-4"]["error"]["code"] == "invalid_custom_id"
    assert out["url"]["error"]["code"] == "invalid_url" and out["method"]["error"]["code"] == "invalid_method"
    for name, word in (("field", "k"), ("holes", "no holes"), ("long", "maximum length")):
        assert out[name]["response"]["status_code"] == 400, name
        assert word in out[name]["error"]["message"], out[name]["error"]
        assert out[name]["response"]["body"]["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("case", ["missing", "not-utf8", "exists", "unwritable", "duplicate", "defaults"])
def test_a_run_that_cannot_start_is_one_line_exit_2(tmp_path, capsys, case):
    src = write_lines(tmp_path / "in.jsonl", [request("a", "/v1/infill", {"text": STORY})])
    dst, extra = str(tmp_path / "out.jsonl"), []
    if case == "missing":
        src = str(tmp_path / "nope.jsonl")
    elif case == "not-utf8":
        (tmp_path / "in.jsonl").write_bytes(b'{"custom_id": "a\xff"}\n')
    elif case == "exists":
        (tmp_path / "out.jsonl").write_text("")
    elif case == "unwritable":
        dst = str(tmp_path / "no-such-folder" / "out.jsonl")
    elif case == "duplicate":
        write_lines(tmp_path / "in.jsonl", [request("a", "/v1/infill", {"text": STORY})] * 2)
    elif case == "defaults":
        extra = ["--defaults", "[1]"]
    code = main(["batch", src, "-o", dst, "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("asarm batch: error:"), err
    expected = {"missing": "cannot read", "not-utf8": "not UTF-8", "exists": "--resume",
                "unwritable": "cannot write", "duplicate": "repeats the custom_id", "defaults": "JSON object"}
    assert expected[case] in err


def test_ray_missing_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    src = write_lines(tmp_path / "in.jsonl", [request("a", "/v1/infill", {"text": STORY})])
    code = main(["batch", src, "-o", str(tmp_path / "out.jsonl"), "--ray", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "asarm batch: error: --ray needs Ray Data, which is not installed: " \
                                "pip install 'asarm[ray]'"
    assert not (tmp_path / "out.jsonl").exists()


def test_text_mode_and_defaults(tmp_path):
    code, dst = run_batch(tmp_path, ["A [MASK:3] day.", "", "She opened the [MASK:4] and smiled."],
                          "--text", "--defaults", '{"seed": 3, "k": 2}', name="in.txt")
    assert code == 0
    out = by_id(read_output(dst))
    assert set(out) == {"line-1", "line-3"}
    body = out["line-3"]["response"]["body"]
    assert body["object"] == "infill" and body["choices"][0]["text"].startswith("She opened the")
    # the defaults reached the request: the same body sent as a batch line gives the same text
    code, dst2 = run_batch(tmp_path, [request("x", "/v1/infill", {"text": "She opened the [MASK:4] and smiled.",
                                                                    "seed": 3, "k": 2})], out="two.jsonl")
    assert by_id(read_output(dst2))["x"]["response"]["body"]["choices"][0]["text"] == body["choices"][0]["text"]


# --- resume ------------------------------------------------------------------------------------
def test_torn_last_line_is_cut_and_redone(tmp_path):
    path = tmp_path / "out.jsonl"
    good = json.dumps({"custom_id": "a", "response": None, "error": None}) + "\n"
    path.write_text(good + '{"custom_id": "b", "resp')
    done, length = scan_output(str(path))
    assert done == {"a"} and length == len(good)
    with OutputWriter(str(path), resume=True) as writer:
        assert writer.done == {"a"}
        writer.write({"custom_id": "b", "response": None, "error": None})
    assert [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_resume_after_kill_9_runs_every_request_exactly_once(tmp_path):
    """A real ``asarm batch`` killed with SIGKILL mid-run, a torn line added, then --resume."""
    lines = [request(f"r{i}", "/v1/infill", {"text": STORY, "seed": i}) for i in range(24)]
    src = write_lines(tmp_path / "in.jsonl", lines)
    dst = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "asarm.cli", "batch", src, "-o", str(dst), "--no-progress", "--max-batch", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if dst.exists() and dst.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = dst.read_bytes()
    written = before.count(b"\n")
    assert 3 <= written < len(lines)
    with open(dst, "ab") as f:  # a kill in the middle of a write leaves a torn line
        f.write(b'{"id":"batch_req_x","custom_id":"r23","resp')
    code = main(["batch", src, "-o", str(dst), "--no-progress", "--max-batch", "4"])
    assert code == 2  # the output exists: without --resume nothing is touched
    assert dst.read_bytes().startswith(before)
    code = main(["batch", src, "-o", str(dst), "--no-progress", "--max-batch", "4", "--resume"])
    assert code == 0
    ids = [line["custom_id"] for line in read_output(dst)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(24)), "every custom_id exactly once"
    assert all(line["error"] is None for line in read_output(dst))
    # a second --resume has nothing left to do
    assert main(["batch", src, "-o", str(dst), "--no-progress", "--resume"]) == 0
    assert len(read_output(dst)) == 24


# --- the same outputs as the server ------------------------------------------------------------
# The equality tests run one row per pass: a request's tokens never depend on its batch mates
# except through float rounding (a pass over more rows sums in another order), which can, rarely,
# move a uniform draw across a boundary (1 of 20 ROCStories infills here between max-batch 1 and 8,
# fast pass); batch composition depends on timing, so only one row per pass is reproducible bit
# for bit.
def answers(lines):
    """What must match between runs: every choice's text and holes (exactly), and its log-probs or
    the score (to float rounding: a pass over a different batch sums in a different order)."""
    texts, numbers = {}, {}
    for line in lines:
        body, key = line["response"]["body"], line["custom_id"]
        if body["object"] == "score":
            numbers[key] = [body["log_prob"], *(t["logprob"] for t in body["tokens"])]
        else:
            texts[key] = [(c["text"], c["asarm"]["holes"]) for c in body["choices"]]
            numbers[key] = [x for c in body["choices"] if c.get("logprobs") for x in c["logprobs"]["token_logprobs"]]
    return texts, numbers


def same_answers(a, b):
    (texts_a, numbers_a), (texts_b, numbers_b) = answers(a), answers(b)
    assert texts_a == texts_b
    assert numbers_a.keys() == numbers_b.keys()
    for key in numbers_a:
        assert numbers_a[key] == pytest.approx(numbers_b[key], rel=1e-5, abs=1e-5), key


def test_same_body_and_seed_same_output_as_the_server(tmp_path):
    import httpx
    from serve_util import running_server

    lines = seeded_requests(6)
    code, dst = run_batch(tmp_path, lines, "--max-batch", "1")  # one row per pass, as the server here
    assert code == 0
    batch_lines = read_output(dst)
    served = []
    with running_server() as (url, _):
        for line in lines:
            req = json.loads(line)
            resp = httpx.post(url + req["url"], json=req["body"], timeout=120)
            assert resp.status_code == 200, resp.text
            served.append({"custom_id": req["custom_id"], "response": {"body": resp.json()}})
    same_answers(served, batch_lines)


def test_ray_local_run_gives_the_local_outputs(tmp_path):
    pytest.importorskip("ray.data")
    lines = seeded_requests(6)
    code, local = run_batch(tmp_path, lines, "--max-batch", "1")
    assert code == 0
    summary = tmp_path / "summary.json"
    code, on_ray = run_batch(tmp_path, lines, "--ray", "--workers", "2", "--max-batch", "1", "--summary",
                             str(summary), out="ray.jsonl")
    assert code == 0
    same_answers(read_output(on_ray), read_output(local))
    actors = json.loads(summary.read_text())["actors"]  # every actor pinned to one torch thread
    assert actors["torch_threads_per_actor"] == [1] and sum(actors["rows_per_actor"]) == 6
    assert 1 <= actors["actors"] <= 2 and actors["startup_s"] > 0 and len(actors["actor_load_s"]) == actors["actors"]


def test_rows_joining_a_running_engine_fit_the_cache_and_keep_their_outputs():
    """Rows joining mid-run: a long-running row's committed slots plus a newcomer's first pass
    (all its visible tokens) once overflowed the content cache. Each row's output is still the
    one it has alone."""
    import torch

    from asarm.sampling import Engine
    from asarm.sampling.config import DecodeConfig
    from asarm.text import plan_rows, read_markup, text_only
    from serve_util import shipped_model

    model = shipped_model()
    markup = read_markup(model, STORY)
    config = text_only(model.tokenizer, DecodeConfig.from_user())
    plans = plan_rows(model, markup, list(range(10)))

    def alone(plan):
        engine = Engine(model, cache=True)
        handle = engine.add(plan.input_ids, plan.masked, config, seed=plan.seed, order="left-to-right")
        while engine.active:
            engine.step()
        return handle.result().input_ids.tolist()

    engine, handles, waiting = Engine(model, cache=True), [], list(plans)
    while waiting or engine.active:
        while waiting and engine.active < 3:
            plan = waiting.pop(0)
            handles.append(engine.add(plan.input_ids, plan.masked, config, seed=plan.seed, order="left-to-right"))
        engine.step()
    assert [h.result().input_ids.tolist() for h in handles] == [alone(p) for p in plans]
    assert torch.is_tensor(handles[0].result().input_ids)


def test_requests_with_the_most_tokens_to_generate_are_admitted_first():
    from asarm.batch.format import parse_request_line
    from asarm.batch.local import by_generation, generation_hint

    lines = [request("short", "/v1/infill", {"text": "A [MASK:2] b [MASK]."}),
             request("range", "/v1/infill", {"text": "A [MASK:4-8] b.", "n": 2}),
             request("completion", "/v1/completions", {"prompt": "A", "hole_length": 9}),
             request("default", "/v1/completions", {"prompt": "A"}),
             request("score", "/v1/score", {"text": "A [[b]]."}),
             request("bad", "/v1/infill", {"text": 3})]
    reqs = [parse_request_line(line, i + 1) for i, line in enumerate(lines)]
    assert [generation_hint(r) for r in reqs] == [2, 12, 9, 16, 0, 0]
    assert [r.custom_id for r in by_generation(reqs)] == ["default", "range", "completion", "short", "score", "bad"]


def test_a_json_string_may_hold_a_line_separator(tmp_path):
    """U+2028 is valid unescaped inside a JSON string: it must not split the line."""
    line = json.dumps({"custom_id": "sep", "method": "POST", "url": "/v1/score",
                       "body": {"text": "The cat\u2028 [[sat]] on the mat."}}, ensure_ascii=False)
    [req] = read_requests(write_lines(tmp_path / "in.jsonl", [line]))
    assert req.error is None and "\u2028" in req.body["text"]


def test_engine_loop_admits_in_waves():
    """admit_wave = 4 of max_batch 4: waiting rows join only once 4 slots are free (or when all
    that waits fits); admit_wave 1 (the server) lets each join at once."""
    import asyncio

    from asarm.serve.loop import Channel, EngineLoop, Job, RowSpec
    from asarm.serve.metrics import Metrics

    class Adapter:  # rows finish after as many passes as their seed says
        def __init__(self):
            self.rows, self.joined = [], []

        def add(self, input_ids, masked, config, *, seed, order, on_round, return_logprobs, **options):
            row = {"left": seed}
            self.rows.append(row)
            self.joined[-1] += 1
            return row

        def step(self):
            self.joined.append(0)
            for row in self.rows:
                row["left"] -= 1
            done = [r for r in self.rows if r["left"] <= 0]
            self.rows = [r for r in self.rows if r["left"] > 0]
            return done

        def cancel(self, row):
            self.rows.remove(row)

        @property
        def active(self):
            return len(self.rows)

        @staticmethod
        def result(row):
            return row

    async def run(wave):
        adapter = Adapter()
        adapter.joined.append(0)
        loop = EngineLoop(adapter, max_batch=4, max_queue=100, metrics=Metrics(), admit_wave=wave)
        jobs = [Job(1, (lambda s=s: ([RowSpec(None, None, None, seed=s)], None)), Channel(), rounds=False)
                for s in (1, 2, 3, 4, 1, 1, 1, 1)]
        for job in jobs:
            loop.submit(job)
        loop.start()
        for job in jobs:
            while (await job.channel.get(30))[0] != "end":
                pass
        await asyncio.to_thread(loop.stop)
        return [n for n in adapter.joined if n]

    assert asyncio.run(run(4)) == [4, 4]  # the second wave waits for the whole first one
    assert asyncio.run(run(1))[:2] == [4, 1]  # the server: a row joins as soon as one leaves
