"""Evaluation harnesses end to end on a tiny random model with a tiny trained tokenizer:
protocols (hidden fraction, holes, extraction), ROUGE oracle, resume, shard + merge, reports."""

from __future__ import annotations

import json
import types

import pytest
import torch

from asarm.cli import build_parser, main
from asarm.errors import InputError
from asarm.evaluation import run_from_args
from asarm.evaluation.common import (
    decode_configs,
    fit_infill,
    mean_ci,
    parse_shard,
    proportion_ci,
    read_records,
    unigram_entropy_bits,
)
from asarm.evaluation.humaneval import HumanEvalInfillingTask
from asarm.evaluation.report import merge
from asarm.evaluation.rocstories import RocStoriesTask, split_story
from asarm.evaluation.runner import fill_oracle
from asarm.evaluation.wikitext import SELF_LABEL, WikiTextTask
from asarm.tokenization import decode, train_tokenizer
from conftest import SHARED_DATA, tiny_model

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="offline data (shared/data) not found")

CORPUS = (
    "The cat sat on the mat. He went to the store and bought some bread. She was happy.\n"
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n"
    " = Robert <unk> = \n Robert is an English film , television and theatre actor . \n"
) * 30


@pytest.fixture(scope="module")
def model():
    tok = train_tokenizer([CORPUS], vocab_size=300, kind="code")
    m = tiny_model(seed=0, vocab_size=len(tok), d_model=16, n_head=2, d_inner=32, initializer_range=0.1)
    m.tokenizer = tok
    return m


def parse(*argv):
    return build_parser().parse_args(["eval", *argv, "--no-progress"])


def records_without_timing(path):
    out = []
    for r in read_records([path]):
        out.append({k: v for k, v in r.items() if k not in ("elapsed_s", "batch_elapsed_s")})
    return sorted(out, key=lambda r: (r["config"], r["index"]))


# --- protocols -------------------------------------------------------------------------------
def test_wikitext_hides_the_fraction_it_says(model):
    task = WikiTextTask(model, length=40, hidden_fraction=0.95, seed=3, evaluator="none")
    ex = task.examples(limit=3)
    assert len(ex) == 3
    for e in ex:
        assert len(e.ids) == 40 and e.num_hidden == round(0.95 * 40) == 38
    assert ex[0].hidden != ex[1].hidden  # positions drawn per chunk
    # chunks are consecutive pieces of one token stream, the same whatever --limit is
    more = task.examples(limit=5)
    assert [e.ids for e in more[:3]] == [e.ids for e in ex] and [e.hidden for e in more[:3]] == [e.hidden for e in ex]
    assert WikiTextTask(model, length=40, hidden_fraction=0.5, seed=3, evaluator="none").examples(1)[0].num_hidden == 20
    with pytest.raises(InputError):
        WikiTextTask(model, length=40, hidden_fraction=1.5, evaluator="none")
    # default length: 512, or the model's limit when it has a smaller one; longer is refused
    assert WikiTextTask(model, evaluator="none").length == 512
    capped = types.SimpleNamespace(tokenizer=model.tokenizer, config=types.SimpleNamespace(max_length=128))
    assert WikiTextTask(capped, evaluator="none").length == 128
    with pytest.raises(InputError):
        WikiTextTask(capped, length=512, evaluator="none")


def test_rocstories_hole_is_sentence_three_with_its_length(model):
    task = RocStoriesTask(model)
    ex = task.examples(limit=4)
    for e in ex:
        hole = [t for t, h in zip(e.ids, e.hidden) if h]
        assert decode(model.tokenizer, hole) == " " + e.info["reference"]
        # hidden positions form one contiguous span
        first, last = e.hidden.index(True), len(e.hidden) - e.hidden[::-1].index(True)
        assert all(e.hidden[first:last])
    prefix, hole, suffix = split_story(["A.", "B b.", "C c c.", "D.", "E."])
    assert prefix + hole + suffix == "A. B b. C c c. D. E."


def test_rouge_oracle(model):
    task = RocStoriesTask(model)
    s = "Rick got shot in a robbery after a long night."
    assert task.rouge(s, s) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert task.rouge("completely unrelated words", s)["rouge1"] == 0.0
    ex = task.examples(limit=3)
    outputs, generated = fill_oracle(ex)
    for r in task.score(ex, outputs, generated):
        assert r["rouge1"] == r["rouge2"] == r["rougeL"] == 100.0
        assert r["output"] == r["reference"]


@pytest.mark.parametrize("variant", ["single-line", "multi-line", "random-span", "random-span-light"])
def test_humaneval_extraction_round_trips_and_oracle_passes(model, variant):
    task = HumanEvalInfillingTask(model, variant=variant, workers=2)
    ex = task.examples(limit=2)
    for e in ex:
        p = e.info["problem"]
        hole = [t for t, h in zip(e.ids, e.hidden) if h]
        assert decode(model.tokenizer, hole) == p["canonical_solution"]
        assert decode(model.tokenizer, e.ids) == p["prompt"] + p["canonical_solution"] + p["suffix"]
    outputs, generated = fill_oracle(ex)
    recs = task.score(ex, outputs, generated)
    assert all(r["passed"] and r["exact_match"] for r in recs), [r["detail"] for r in recs]


def test_infill_context_is_trimmed_to_the_model_limit(model):
    p, s, fits = fit_infill(list(range(10)), [100, 101], list(range(20, 30)), 8)
    assert fits and len(p) + 2 + len(s) == 8 and p == [7, 8, 9] and s == [20, 21, 22]
    assert fit_infill([1], [2] * 5, [3], 4)[2] is False
    short = types.SimpleNamespace(tokenizer=model.tokenizer, config=types.SimpleNamespace(max_length=24))
    task = HumanEvalInfillingTask(short, variant="single-line", workers=1)
    ex = task.examples(limit=2)
    assert all(len(e.ids) <= 24 for e in ex)
    # the program uses the full original prompt and suffix even when the model saw less
    recs = task.score(ex, *fill_oracle(ex))
    assert all(r["passed"] or r["status"] == "skipped" for r in recs)
    capped = HumanEvalInfillingTask(model, variant="single-line", workers=1, max_tokens=30).examples(limit=3)
    assert all(len(e.ids) <= 30 for e in capped)


def test_statistics():
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and abs(s["ci95"] - 4.303 * (1 / 3) ** 0.5) < 1e-9
    assert mean_ci([5.0])["ci95"] is None
    p = proportion_ci(5, 10)
    assert p["mean"] == 0.5 and 0.2 < p["low"] < 0.5 < p["high"] < 0.8
    assert unigram_entropy_bits([1, 2, 3, 4]) == 2.0 and unigram_entropy_bits([7, 7]) == 0.0
    assert [c.name for c in decode_configs("all", "self", 5, None)] == ["sequential", "assd-self-k5", "assd-ngram-k5"]
    assert [c.name for c in decode_configs("assd", "self", 5, [1, 2])] == ["sequential", "assd-self-k1", "assd-self-k2"]
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


# --- end to end -------------------------------------------------------------------------------
def test_wikitext_end_to_end_with_self_ppl(model, tmp_path):
    out = tmp_path / "wt"
    summary = run_from_args(parse("wikitext", "--limit", "2", "--length", "16", "--evaluator", "self",
                                  "--output", str(out)), model=model)
    assert set(summary["configs"]) == {"sequential", "assd-self-k5", "assd-ngram-k5"}
    for name, c in summary["configs"].items():
        m = c["metrics"]
        assert c["n"] == 2 and m["gen_ppl"]["mean"] > 1 and m["generated_tokens"]["mean"] == 15
        if name == "sequential":
            assert m["nfe"]["mean"] == 15 and m["draft_calls"]["mean"] == 0
    assert "gen_ppl" in summary["configs"]["assd-self-k5"]["paired_vs_sequential"]
    md = (out / "summary.md").read_text()
    assert SELF_LABEL in md and "Paired difference from sequential" in md and "paper (XLNet-base AS-ARM, a different model)" in md and "107.9" in md
    recs = read_records([out / "records.jsonl"])
    assert len(recs) == 6 and all(r["text"] for r in recs)


def test_speedup_variants_run_side_by_side_and_stay_labelled(model, tmp_path):
    out = tmp_path / "fast"
    summary = run_from_args(parse("wikitext", "--limit", "2", "--length", "16", "--evaluator", "self",
                                  "--speedups", "--output", str(out)), model=model)
    names = set(summary["configs"])
    assert {"sequential", "assd-self-k5", "assd-self-k5+one-pass+adaptive-k", "assd-ngram-k5+bonus"} <= names
    for c in summary["configs"].values():
        assert c["n"] == 2 and c["metrics"]["generated_tokens"]["mean"] == 15
    one_pass = summary["configs"]["assd-self-k5+one-pass"]
    assert one_pass["variants"] == ["one-pass"] and one_pass["label"].endswith("+ one-pass")
    # a one-pass round is one pass: never more passes than tokens
    assert one_pass["metrics"]["nfe"]["mean"] <= 15
    assert "+ adaptive-k" in (out / "summary.md").read_text()
    flags = decode_configs("assd", "self", 3, [2, 3], bonus=True, adaptive_k=True)
    assert [c.name for c in flags] == ["sequential", "assd-self-k2+bonus+adaptive-k", "assd-self-k3+bonus+adaptive-k"]
    with pytest.raises(InputError, match="one-pass"):
        decode_configs("all", "self", 5, None, one_pass=True)
    with pytest.raises(InputError, match="--speedups"):
        run_from_args(parse("wikitext", "--speedups", "--sweep-k", "--output", str(out)), model=model)


def test_wikitext_with_a_transformers_evaluator(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch a hub in tests
    from transformers import GPT2Config, GPT2LMHeadModel

    ev = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(model.tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(ev)
    model.tokenizer.save_pretrained(ev)
    out = tmp_path / "wt"
    summary = run_from_args(parse("wikitext", "--limit", "1", "--length", "16", "--evaluator", str(ev),
                                  "--method", "assd", "--output", str(out)), model=model)
    m = summary["configs"]["assd-self-k5"]["metrics"]
    assert m["gen_ppl"]["mean"] > 1 and "entropy_eval_tokens_bits" in m
    assert f"gen-PPL under {ev}" in (out / "summary.md").read_text()
    with pytest.raises(InputError):
        run_from_args(parse("wikitext", "--limit", "1", "--evaluator", str(tmp_path / "missing"),
                            "--output", str(tmp_path / "x")), model=model)


def test_resume_skips_finished_records(model, tmp_path, monkeypatch):
    import asarm.sampling

    out = tmp_path / "roc"
    args = ("rocstories", "--output", str(out), "--batch-size", "2")
    run_from_args(parse(*args, "--limit", "3"), model=model)
    first = {(r["config"], r["index"]): r for r in read_records([out / "records.jsonl"])}
    assert len(first) == 3
    calls = []
    original = asarm.sampling.sample

    def spy(model_, ids, *a, **kw):
        calls.append(ids.shape[0])
        return original(model_, ids, *a, **kw)

    monkeypatch.setattr(asarm.sampling, "sample", spy)
    # a torn line from a crash is ignored; finished batches are not sampled again
    with open(out / "records.jsonl", "a") as f:
        f.write('{"config": "assd-self-k5", "ind')
    run_from_args(parse(*args, "--limit", "5"), model=model)
    # batches are [0, 1], [2, 3], [4]: the first is done and skipped; [2, 3] was partly done
    # (example 2 alone, under --limit 3) and runs again in full, keeping example 2's old record
    assert calls == [2, 1]
    recs = read_records([out / "records.jsonl"])
    again = {(r["config"], r["index"]): r for r in recs}
    assert len(again) == 5
    for key, r in first.items():
        assert again[key] == r  # untouched, timings included
    with pytest.raises(InputError):  # different settings in the same folder
        run_from_args(parse(*args, "--limit", "5", "--seed", "9"), model=model)


def test_shard_and_merge_equal_an_unsharded_run(model, tmp_path):
    common = ("humaneval-infilling", "--variant", "random-span-light", "--limit", "5", "--batch-size", "2",
              "--workers", "2")
    whole = tmp_path / "whole"
    run_from_args(parse(*common, "--output", str(whole)), model=model)
    shards = tmp_path / "shards"
    for i in range(2):
        run_from_args(parse(*common, "--output", str(shards), "--shard", f"{i}/2"), model=model)
    assert (shards / "records.shard-0-of-2.jsonl").is_file() and not (shards / "records.jsonl").exists()
    code = main(["eval", "merge", str(shards)])
    assert code == 0
    assert records_without_timing(shards / "records.jsonl") == records_without_timing(whole / "records.jsonl")
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((shards / "summary.json").read_text())
    for name in a["configs"]:
        for key in ("pass@1", "nfe", "rounds", "tokens_per_round"):
            assert a["configs"][name]["metrics"][key] == b["configs"][name]["metrics"][key]
    # torchrun-style environment variables select the shard too
    assert parse_shard(None) == (0, 1)


def test_torchrun_environment_selects_the_shard(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (2, 4)


def test_sweep_k_writes_a_plot(model, tmp_path):
    out = tmp_path / "sweep"
    summary = run_from_args(parse("rocstories", "--limit", "2", "--sweep-k", "1,3", "--output", str(out)), model=model)
    assert set(summary["configs"]) == {"sequential", "assd-self-k1", "assd-self-k3"}
    png = out / "sweep_k.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(model, tmp_path, capsys):
    assert main(["eval", "merge", str(tmp_path / "nothing")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(InputError):
        run_from_args(parse("rocstories", "--limit", "0", "--output", str(tmp_path / "a")), model=model)
    with pytest.raises(InputError):
        run_from_args(parse("rocstories", "--shard", "2/2", "--output", str(tmp_path / "b")), model=model)


def test_cli_end_to_end_on_a_saved_checkpoint(model, tmp_path, capsys):
    from asarm.checkpoint import save_model

    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, tokenizer=model.tokenizer)
    out = tmp_path / "he"
    code = main(["eval", "humaneval-infilling", "--model", str(ckpt), "--limit", "2", "--variant", "single-line",
                 "--output", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    assert "pass@1" in capsys.readouterr().out
    assert len(read_records([out / "records.jsonl"])) == 2


def test_hole_length_shards_side_by_side_equal_one_run(model, tmp_path):
    """Shards of a --hole-length run share one folder (a record file each); together they give
    the unsharded run's records and summary, and a rerun finds nothing left to do."""
    def records(folder):
        recs = read_records(sorted(folder.glob("records*.jsonl")))
        return sorted((json.dumps({k: v for k, v in r.items() if k != "elapsed_s"}, sort_keys=True) for r in recs))

    args = ("rocstories", "--hole-length", "posterior", "--limit", "3", "--no-progress")
    whole = run_from_args(parse(*args, "--output", str(tmp_path / "whole")), model=model)
    for i in (1, 0):
        sharded = run_from_args(parse(*args, "--shard", f"{i}/2", "--output", str(tmp_path / "shards")), model=model)
    assert sorted(p.name for p in (tmp_path / "shards").glob("records*.jsonl")) == [
        "records.shard-0-of-2.jsonl", "records.shard-1-of-2.jsonl"]
    assert len(read_records([tmp_path / "shards" / "records.shard-1-of-2.jsonl"])) == 1  # example 1 of 0, 1, 2
    assert records(tmp_path / "shards") == records(tmp_path / "whole") and len(records(tmp_path / "whole")) == 3
    assert sharded["modes"] == whole["modes"] and sharded["examples"] == 3
    run_from_args(parse(*args, "--output", str(tmp_path / "shards")), model=model)  # unsharded rerun: nothing left
    assert not (tmp_path / "shards" / "records.jsonl").exists() or not read_records([tmp_path / "shards" / "records.jsonl"])

# --- the batch path (asarm.batch.rows): one engine with continuous batching, or Ray actors ------------
def test_batch_path_records_equal_the_sequential_harness(model, tmp_path):
    """--max-batch runs every example as its batch's row on one engine, most hidden tokens first,
    rows joining in waves: the records (outputs, counts, metrics) are the sequential harness's."""
    common = ("rocstories", "--limit", "7", "--batch-size", "2", "--method", "all")
    run_from_args(parse(*common, "--output", str(tmp_path / "seq")), model=model)
    run_from_args(parse(*common, "--output", str(tmp_path / "eng"), "--max-batch", "3"), model=model)
    seq, eng = records_without_timing(tmp_path / "seq" / "records.jsonl"), \
        records_without_timing(tmp_path / "eng" / "records.jsonl")
    assert len(seq) == 21 and {r["config"] for r in seq} == {"sequential", "assd-self-k5", "assd-ngram-k5"}
    assert eng == seq
    meta = json.loads((tmp_path / "eng" / "meta.json").read_text())
    assert meta["runtime"]["decoding"] == {"path": "engine", "max_batch": 3, "admit_wave": None}
    # resumable as the sequential harness: a rerun with more examples runs only the new ones
    run_from_args(parse(*common[:2], "9", *common[3:], "--output", str(tmp_path / "eng"), "--max-batch", "3"),
                  model=model)
    assert len(records_without_timing(tmp_path / "eng" / "records.jsonl")) == 27


def test_batch_path_on_ray_equals_the_sequential_harness(model, tmp_path):
    pytest.importorskip("ray.data")
    common = ("rocstories", "--limit", "5", "--batch-size", "2")
    run_from_args(parse(*common, "--output", str(tmp_path / "seq")), model=model)
    run_from_args(parse(*common, "--output", str(tmp_path / "ray"), "--ray", "--ray-workers", "2",
                        "--max-batch", "2"), model=model)
    assert records_without_timing(tmp_path / "ray" / "records.jsonl") == \
        records_without_timing(tmp_path / "seq" / "records.jsonl")


def test_row_actors_pin_one_torch_thread_and_report_their_start_up(model):
    pytest.importorskip("ray.data")
    from asarm.batch.ray_runner import decode_rows_on_ray
    from asarm.batch.rows import RowTask, decode_rows
    from asarm.sampling.config import DecodeConfig

    ids = list(range(5, 25))
    tasks = [RowTask(f"r{i}", ids, [j % 3 == i % 3 for j in range(20)], DecodeConfig(k=3), seed=i) for i in range(6)]
    stats = {}
    on_ray = {r.key: r for r in decode_rows_on_ray(tasks, model=model, workers=2, max_batch=2, per_call=2,
                                                   stats=stats)}
    assert {k: r.output_ids for k, r in on_ray.items()} == {r.key: r.output_ids for r in decode_rows(model, tasks)}
    assert stats["torch_threads_per_actor"] == [1] and sum(stats["rows_per_actor"]) == 6
    assert stats["startup_s"] >= 0 and stats["decode_s"] >= 0 and stats["actor_load_s"]


def test_batch_path_options_are_checked(model, tmp_path):
    for argv, message in [(("--max-batch", "0"), "--max-batch"), (("--ray-workers", "2"), "--ray-workers"),
                          (("--max-batch", "4", "--admit-wave", "5"), "--admit-wave"),
                          (("--max-batch", "2", "--hole-length", "fixed"), "--hole-length")]:
        with pytest.raises(InputError, match=message):
            run_from_args(parse("rocstories", "--limit", "1", "--output", str(tmp_path / "x"), *argv), model=model)
