"""Training data: sources, cleaning, packing, the sharded chunk stream, training masks."""

from __future__ import annotations

import gzip
import json
import zipfile

import pytest
import torch

from asarm.data import (ChunkStream, StreamState, detokenize_wikitext, detokenize_wikitext_line, load_documents,
                        pack, read_documents, split_documents, split_wikitext, tokenize_documents, untag_brown)
from asarm.errors import InputError
from asarm.ranks import decoding_order, ranks_from_order, training_ranks
from asarm.tokenization import decode, train_tokenizer

BROWN = ("\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
         "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at "
         "evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n\n\n"
         "\tIt/pps did/dod n't/* matter/vb ,/, he/pps said/vbd ./.\n")


def test_brown_tags_stripped_and_sentences_rebuilt():
    text = untag_brown(BROWN)
    assert text.startswith('The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent '
                           'primary election produced "no evidence" that any irregularities took place.')
    assert "It didn't matter, he said." in text
    assert "/" not in text


def test_sources_zip_gz_jsonl_folder(tmp_path):
    z = tmp_path / "corpus.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("brown/README", "not a document")
        f.writestr("brown/ca01", BROWN)
        f.writestr("brown/cats.txt", "ca01 news")
        f.writestr("plain/a.txt", "Hello there.\r\n")
    docs = load_documents(z)
    assert len(docs) == 2 and docs[0].startswith("The Fulton") and docs[1] == "Hello there.\n"

    j = tmp_path / "d.jsonl.gz"
    with gzip.open(j, "wt") as f:
        f.write(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"content": "second"}) + "\n")
    assert load_documents(j) == ["first", "second"]

    src = tmp_path / "src"
    (src / "pkg" / "tests").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("def f():\n\treturn 1\n")
    (src / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (src / "pkg" / "notes.md").write_text("not code")
    assert load_documents(src, kind="code") == ["def f():\n\treturn 1\n"]


def test_wikitext_split_into_articles_and_held_out_split():
    text = " \n = A = \n \n a text . \n = = Sub = = \n more . \n \n = B = \n \n b text . \n"
    docs = split_wikitext(text)
    assert len(docs) == 2 and "Sub" in docs[0] and docs[1].startswith(" = B = ")
    many = [f"doc {i}" for i in range(50)]
    train, valid = split_documents(many, 0.1, seed=3)
    assert len(valid) == 5 and not set(train) & set(valid) and set(train) | set(valid) == set(many)
    assert split_documents(many, 0.1, seed=3) == (train, valid)


@pytest.mark.parametrize("raw, clean", [
    (" It weighs 0 @.@ 7 – 2 @.@ 2 kg ( 1 @,@ 500 lb ) , and is north @-@ eastern . ",
     "It weighs 0.7 – 2.2 kg (1,500 lb), and is north-eastern."),
    (""" He said " I don 't know " ; the city 's mayor agreed : yes ! """, """He said "I don't know"; the city's mayor agreed: yes!"""),
    (" = = Taxonomy , phylogeny = = ", "Taxonomy, phylogeny"),  # a heading becomes its title
    (" The <unk> is blue . It is big . A <unk> b . ", "It is big."),  # sentences with <unk> dropped
    (" = = <unk> = = ", ""),
    (" July 1 , 1919 . Wait . . . ok . ", "July 1, 1919. Wait... ok."),
])
def test_wikitext_detokenized(raw, clean):
    assert detokenize_wikitext_line(raw) == clean


def test_wikitext_files_are_read_as_clean_text(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(" \n = A = \n \n The <unk> went . It rained @-@ hard . \n \n = B = \n \n b text . \n")
    docs = load_documents(str(path))
    assert docs == ["A\nIt rained-hard.\n", "B\nb text.\n"]
    assert detokenize_wikitext(" = A = \n \n x . \n") == "A\nx.\n"


def test_shipped_training_corpora_are_clean_text():
    """What the shipped English model trains on: no literal <unk>, no WikiText joiners, no
    tokenized lower-case reviews (the config's own sources, read as training reads them)."""
    from asarm.train.config import load_config

    cfg = load_config("asarm-en-small")
    assert not any("movie_reviews" in str(source) for source in cfg.data)
    docs = load_documents(cfg.data, kind=cfg.tokenizer_kind)
    assert sum(map(len, docs)) > 10_000_000
    for doc in docs:
        assert "<unk>" not in doc and " @-@ " not in doc and " @,@ " not in doc and " @.@ " not in doc
    # tokenized text has a " , " every ~100 characters; a handful remain from Brown's own gaps
    assert sum(doc.count(" , ") for doc in docs) < sum(map(len, docs)) / 100_000


def test_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty corpus"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InputError, match="'text' or 'content'"):
        list(read_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="too few"):
        pack([[7, 8]], seq_len=16, eos_id=2)
    with pytest.raises(InputError):  # no `datasets` or no network: a clear message either way
        list(read_documents("hf:surely-not-a-real-dataset-name-xyz"))


def test_tokenizer_round_trip_and_packing(tmp_path):
    docs = ["The Fulton County  Grand Jury said.\n", "def f(x):\n\tif x:\n        return 'é'  # ok\n",
            "<mask> literal and </s> text"]
    tok = train_tokenizer(docs * 5, 300, kind="code")
    ids = tokenize_documents(tok, docs)
    assert [decode(tok, d) for d in ids] == docs
    chunks = pack(ids, seq_len=8, eos_id=2)
    flat = chunks.flatten().tolist()
    n = len(ids[0])
    assert flat[:n] == ids[0] and flat[n] == 2
    assert chunks.shape[1] == 8 and chunks.dtype == torch.int32


def test_chunk_stream_shards_disjoint_deterministic_resumable():
    chunks = torch.arange(40).view(40, 1)
    single = ChunkStream(chunks, batch=6, seed=1)
    ranks = [ChunkStream(chunks, batch=3, seed=1, rank=r, world=2) for r in range(2)]
    seen = []
    for _ in range(12):  # crosses epochs (6 global batches per epoch of 40)
        a, b = ranks[0].next_indices(), ranks[1].next_indices()
        assert not set(a.tolist()) & set(b.tolist())
        assert torch.equal(torch.cat([a, b]), single.next_indices())
        seen.append(a)
    epoch0 = torch.cat([torch.cat([x]) for x in seen[:6]]).tolist()
    assert len(set(epoch0)) == len(epoch0)
    again = ChunkStream(chunks, batch=3, seed=1, rank=0, world=2)
    again.state = StreamState.from_dict(StreamState(1, 12).to_dict())
    assert torch.equal(again.next_indices(), seen[8])
    with pytest.raises(InputError, match="fewer than one global batch"):
        ChunkStream(chunks, batch=30, seed=0, world=2)


def test_training_ranks_semantics():
    g = torch.Generator().manual_seed(0)
    frac = torch.tensor([0.0, 0.3, 0.95, 1.0])
    r = training_ranks(4, 20, frac, g)
    for row, f in zip(r, frac):
        hidden = row > 0
        n = max(1, round(float(f) * 20))
        assert int(hidden.sum()) == n
        # visible first (rank 0), then hidden left to right: exactly ranks_from_order's structure
        order = decoding_order(hidden, "left-to-right")
        assert torch.equal(row, ranks_from_order(20, order))
    r = training_ranks(4, 20, frac, g, random_order=True)
    for row in r:
        hidden = row > 0
        assert sorted(row[hidden].tolist()) == list(range(1, int(hidden.sum()) + 1))
    # uniform choice of hidden positions: every position hidden about equally often
    many = training_ranks(2000, 10, torch.full((2000,), 0.3), g)
    freq = (many > 0).float().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.3), atol=0.05)


def test_training_ranks_order_mixture():
    """random_order=p: each row independently in a uniformly random order with probability p,
    else left to right; 0 and 1 draw exactly what False and True draw."""
    frac = torch.full((4000,), 0.5)
    for flag, p in ((False, 0.0), (True, 1.0)):
        a = training_ranks(4000, 12, frac, torch.Generator().manual_seed(5), random_order=flag)
        b = training_ranks(4000, 12, frac, torch.Generator().manual_seed(5), random_order=p)
        assert torch.equal(a, b)
    r = training_ranks(4000, 12, frac, torch.Generator().manual_seed(5), random_order=0.3)
    left_to_right = torch.tensor([torch.equal(row, ranks_from_order(12, decoding_order(row > 0, "left-to-right")))
                                  for row in r])
    # a random order of the 6 hidden positions is left to right with probability 1/6! = 1/720
    share = 1 - float(left_to_right.float().mean())
    expected = 0.3 * (1 - 1 / 720)
    assert abs(share - expected) < 4 * (expected * (1 - expected) / 4000) ** 0.5
    for row in r:  # every row is still a valid chain: ranks 1..n on the hidden positions
        hidden = row > 0
        assert sorted(row[hidden].tolist()) == list(range(1, int(hidden.sum()) + 1))
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(InputError, match="random_order"):
            training_ranks(2, 12, torch.full((2,), 0.5), torch.Generator(), random_order=bad)
