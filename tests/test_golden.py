"""Same seed, same output: values recorded from the code before the issue-25 refactor.

A tiny model built here from a fixed seed (no files), every sampler family, ``asarm.infill`` on
a markup text and one server request of each generating kind. A refactor that changes a single
draw, pass count or hole length fails this test. To look at the current values (not to paper
over a difference): ``python tests/test_golden.py``.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_model  # noqa: E402

CORPUS = (
    "Once upon a time there was a small cat. The cat sat on the warm mat and purred.\n"
    "def add(a, b):\n    return a + b\n\n"
) * 10

SAMPLERS = {
    "sequential": dict(method="sequential"),
    "assd-self": dict(method="assd", draft="self", k=3),
    "assd-ngram": dict(method="assd", draft="ngram", k=3),
    "one-pass": dict(method="assd", k=3, one_pass=True),
    "adaptive-k": dict(method="assd", k=2, adaptive_k=True, bonus=True),
    "bonus-ngram": dict(method="assd", draft="ngram", k=4, bonus=True),
    "greedy": dict(method="assd", k=4, greedy=True),
    "top-k-top-p": dict(method="assd", k=3, top_k=5, top_p=0.9, temperature=0.8),
    "no-cache": dict(method="assd", k=3, cache=False),
}


def _rows():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 30, (2, 20), generator=g)
    ids[ids == 6] = 7
    masked = torch.zeros(2, 20, dtype=torch.bool)
    masked[0, [1, 2, 3, 5, 8, 9, 10, 11, 12, 15, 16, 19]] = True
    masked[1, 4:18] = True
    return ids, masked


def sampler_outputs() -> dict:
    from asarm.sampling import sample

    model = tiny_model(seed=21, vocab_size=30)
    ids, masked = _rows()
    out = {}
    for name, options in SAMPLERS.items():
        for seed in (0, 5):
            r = sample(model, ids, masked, seed=seed, return_logprobs=True, **options)
            out[f"{name}/{seed}"] = (r.input_ids[masked].tolist(), r.nfe.tolist(), r.draft_calls.tolist(),
                                     r.accepted, [round(float(x), 5) for x in r.token_logprobs.sum(1)])
    single = sample(model, ids[1], masked[1], seed=3, method="assd", k=3, order="random")
    out["single-random-order"] = (single.input_ids[masked[1]].tolist(), int(single.nfe), single.accepted)
    return out


def _text_model():
    from asarm.tokenization import train_tokenizer

    model = tiny_model(seed=7, vocab_size=300)
    model.tokenizer = train_tokenizer([CORPUS], vocab_size=300)
    return model


def infill_outputs() -> dict:
    from asarm.text import infill, stream_infill

    model = _text_model()
    out = {}
    for name, options in {"assd": dict(k=3), "greedy": dict(temperature=1.0, greedy=True, k=2),
                          "sequential": dict(method="sequential")}.items():
        text, result = infill(model, "The cat [MASK] on the [MASK:2] mat and [MASK:1-4].", return_result=True,
                              seed=4, **options)
        out[name] = (text, [(c.length, round(c.probability, 5)) for c in result.lengths], int(result.nfe))
    pieces = []
    text, _ = stream_infill(model, "Once upon a [MASK:3] there", pieces.append, seed=9)
    out["stream"] = (text, "".join(pieces) == text)
    out["stop_at"] = infill(model, "def add(a, b):\n[MASK]", seed=2, stop_at="\n")
    return out


def server_outputs() -> dict:
    import httpx
    from serve_util import running_server, sse_events

    out = {}
    with running_server(_text_model(), model_name="tiny") as (url, _):
        body = httpx.post(url + "/v1/completions", json={"prompt": "The cat sat on the ", "suffix": " and purred.",
                                                         "max_tokens": 6, "seed": 8, "n": 2}, timeout=60).json()
        out["completion"] = [(c["text"], c["asarm"]["holes"][0]["length"], c["asarm"]["nfe"]) for c in body["choices"]]
        body = httpx.post(url + "/v1/completions", json={"prompt": "The cat", "suffix": " mat.", "hole_length": 5,
                                                         "max_tokens": 8, "seed": 2, "one_pass": True, "k": 3,
                                                         "temperature": 0.7, "top_p": 0.9}, timeout=60).json()
        out["completion-hole-length"] = (body["choices"][0]["text"], body["asarm"]["nfe"])
        body = httpx.post(url + "/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 7, "seed": 6,
                                                         "method": "sequential", "logprobs": 1}, timeout=60).json()
        c = body["choices"][0]
        out["continuation"] = (c["text"], round(sum(c["logprobs"]["token_logprobs"]), 4))
        body = httpx.post(url + "/v1/infill", json={"text": "Once upon a [MASK:4] was a [MASK] cat.", "seed": 1,
                                                    "draft": "ngram", "k": 3, "logprobs": True}, timeout=60).json()
        (c,) = body["choices"]
        out["infill"] = (c["text"], [(h["length"], h["text"]) for h in c["holes"]],
                         round(sum(x["logprob"] for x in c["logprobs"]), 4))
        r = httpx.post(url + "/v1/completions", json={"prompt": "Once upon", "max_tokens": 5, "seed": 3, "stream": True,
                                                      "temperature": 0}, timeout=60)
        out["stream"] = "".join(e["choices"][0]["text"] for e in sse_events(r.text)[:-1] if e["choices"])
    return out


# Recorded from main at 9b06877 (before the issue-25 refactor) with `python tests/test_golden.py`.
GOLDEN_SAMPLERS = {'adaptive-k/0': ([20, 0, 0, 24, 23, 20, 10, 10, 23, 0, 12, 23, 20, 20, 10, 20, 20, 20, 23, 0, 23, 21, 23, 20,
                   23, 23],
                  [6, 7], [3, 4], [[3, 5, 4], [3, 5, 5, 1]], [-25.58107, -20.16639]),
 'adaptive-k/5': ([20, 20, 10, 20, 27, 23, 0, 23, 23, 20, 23, 0, 23, 20, 20, 20, 20, 20, 20, 20, 20, 20, 23,
                   11, 20, 2],
                  [8, 6], [4, 3], [[3, 3, 4, 2], [3, 5, 6]], [-20.12295, -17.47369]),
 'assd-ngram/0': ([10, 0, 23, 16, 20, 11, 20, 24, 9, 7, 12, 23, 20, 20, 20, 23, 20, 20, 10, 20, 20, 20, 20,
                   23, 23, 0],
                  [7, 9], [7, 9], [[3, 2, 2, 1, 1, 2, 1], [1, 1, 1, 3, 3, 2, 1, 1, 1]],
                  [-30.88661, -13.16421]),
 'assd-ngram/5': ([23, 23, 0, 20, 21, 29, 24, 10, 9, 23, 23, 23, 20, 20, 20, 20, 20, 20, 20, 20, 24, 20, 20,
                   20, 20, 23],
                  [9, 8], [9, 8], [[1, 1, 1, 1, 3, 1, 2, 1, 1], [1, 1, 1, 3, 3, 1, 3, 1]],
                  [-18.56361, -9.84645]),
 'assd-self/0': ([20, 0, 20, 20, 10, 20, 20, 10, 23, 16, 10, 20, 20, 20, 20, 20, 20, 20, 20, 7, 20, 23, 20,
                  23, 20, 20],
                 [8, 10], [4, 5], [[3, 3, 3, 3], [3, 3, 3, 3, 2]], [-19.12065, -12.09186]),
 'assd-self/5': ([20, 20, 20, 23, 24, 23, 20, 20, 20, 20, 20, 20, 23, 23, 20, 20, 20, 20, 20, 20, 20, 20, 20,
                  20, 23, 23],
                 [8, 10], [4, 5], [[3, 3, 3, 3], [2, 3, 3, 3, 3]], [-14.09415, -8.47308]),
 'bonus-ngram/0': ([10, 0, 20, 10, 20, 10, 10, 27, 0, 0, 23, 20, 20, 20, 20, 20, 20, 29, 20, 20, 9, 20, 23,
                    20, 20, 20],
                   [6, 8], [6, 8], [[3, 3, 1, 1, 3, 1], [1, 1, 1, 1, 3, 3, 1, 3]], [-20.57672, -17.71382]),
 'bonus-ngram/5': ([0, 20, 23, 20, 20, 10, 23, 9, 20, 10, 23, 20, 20, 20, 10, 23, 20, 20, 20, 20, 23, 26, 23,
                    23, 20, 23],
                   [9, 11], [9, 11], [[1, 1, 1, 1, 2, 1, 1, 1, 3], [1, 1, 2, 1, 1, 1, 2, 2, 1, 1, 1]],
                   [-16.15849, -14.31456]),
 'greedy/0': ([23, 23, 23, 20, 10, 10, 24, 24, 24, 23, 23, 23, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,
               20, 20],
              [6, 8], [3, 4], [[4, 4, 4], [4, 4, 4, 2]], [0.0, 0.0]),
 'greedy/5': ([23, 23, 23, 20, 10, 10, 24, 24, 24, 23, 23, 23, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,
               20, 20],
              [6, 8], [3, 4], [[4, 4, 4], [4, 4, 4, 2]], [0.0, 0.0]),
 'no-cache/0': ([20, 0, 20, 20, 10, 20, 20, 10, 23, 16, 10, 20, 20, 20, 20, 20, 20, 20, 20, 7, 20, 23, 20, 23,
                 20, 20],
                [8, 10], [4, 5], [[3, 3, 3, 3], [3, 3, 3, 3, 2]], [-19.12065, -12.09186]),
 'no-cache/5': ([20, 20, 20, 23, 24, 23, 20, 20, 20, 20, 20, 20, 23, 23, 20, 20, 20, 20, 20, 20, 20, 20, 20,
                 20, 23, 23],
                [8, 10], [4, 5], [[3, 3, 3, 3], [2, 3, 3, 3, 3]], [-14.09415, -8.47308]),
 'one-pass/0': ([20, 0, 23, 20, 0, 25, 20, 9, 23, 19, 23, 23, 20, 20, 20, 20, 11, 23, 23, 20, 20, 23, 20, 20,
                 20, 20],
                [5, 6], [1, 1], [[4, 3, 3, 2], [4, 2, 4, 3, 1]], [-24.81528, -13.84423]),
 'one-pass/5': ([20, 20, 20, 20, 10, 20, 20, 24, 24, 12, 20, 23, 23, 20, 25, 20, 20, 20, 20, 20, 20, 20, 23,
                 23, 20, 20],
                [6, 6], [1, 1], [[4, 3, 3, 1, 1], [4, 3, 3, 2, 2]], [-19.83218, -13.67403]),
 'sequential/0': ([20, 23, 20, 23, 29, 16, 23, 23, 20, 23, 20, 20, 20, 20, 10, 20, 20, 20, 20, 20, 20, 3, 23,
                   20, 20, 20],
                  [12, 14], [0, 0],
                  [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
                  [-17.91036, -13.3828]),
 'sequential/5': ([20, 20, 23, 11, 20, 23, 20, 20, 20, 16, 20, 0, 23, 25, 20, 10, 20, 20, 20, 20, 20, 23, 20,
                   20, 23, 20],
                  [12, 14], [0, 0],
                  [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
                  [-20.73075, -15.30101]),
 'single-random-order': ([20, 20, 20, 25, 20, 10, 23, 20, 20, 20, 20, 23, 20, 8], 10, [3, 3, 3, 3, 2]),
 'top-k-top-p/0': ([20, 0, 20, 20, 10, 20, 20, 10, 24, 20, 10, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,
                    23, 20, 20],
                   [8, 10], [4, 5], [[3, 3, 3, 3], [3, 3, 3, 3, 2]], [-15.30067, -2.30671]),
 'top-k-top-p/5': ([20, 23, 20, 23, 23, 20, 20, 23, 20, 20, 23, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20,
                    20, 20, 23, 23],
                   [8, 10], [4, 5], [[3, 3, 3, 3], [3, 3, 3, 3, 2]], [-14.92803, -2.44987])}

GOLDEN_INFILL = {'assd': ('The catal\n  ɅYu,ɅɫɧA on theonal mat and.', [(28, 0.56343), (2, 1.0), (1, 0.56343)], 22),
 'greedy': ('The cat on the mat and.', [(28, 0.56343), (2, 1.0), (1, 0.56343)], 31),
 'sequential': ('The catalSddk\x0f;ɠ$\\\x13 on the mat and.', [(28, 0.56343), (2, 1.0), (1, 0.56343)], 31),
 'stop_at': 'def add(a, b):\n\x06 the|\x18catatat.\x18at{\x18</s>rek</s>atreԅ3at{poni',
 'stream': ('Once upon apurpur there', True)}

GOLDEN_SERVER = {'completion': [('', 1, 1), ('', 1, 1)],
 'completion-hole-length': ('֘l3', 3),
 'continuation': ('at\x07pur\x0f\x0f', -14.2235),
 'infill': ('Once upon a+ was ae\x13\x08\x07\x0f\x0f\x10Dܘ\x08\x0f cat.',
            [(4, '+��'), (20, '�e\x13\x08\x07\x0f�\x0f���\x10�Dܘ�\x08�\x0f')], -94.9446),
 'stream': '333i'}



def test_samplers_match_the_recorded_outputs():
    assert sampler_outputs() == GOLDEN_SAMPLERS


def test_infill_matches_the_recorded_outputs():
    assert infill_outputs() == GOLDEN_INFILL


def test_server_matches_the_recorded_outputs():
    assert server_outputs() == GOLDEN_SERVER


if __name__ == "__main__":
    import pprint

    torch.set_num_threads(1)
    for name, fn in (("GOLDEN_SAMPLERS", sampler_outputs), ("GOLDEN_INFILL", infill_outputs),
                     ("GOLDEN_SERVER", server_outputs)):
        print(f"{name} = " + pprint.pformat(fn(), width=110, compact=True))
