"""Training corpora: reading documents, tokenizing, packing into fixed-length chunks.

A *source* is one of
- a path to a text file (``.txt`` or anything else readable as UTF-8), a ``.gz`` of one, a
  ``.jsonl`` (one document per line, field "text" or "content"), a ``.jsonl.gz``;
- a ``.zip`` archive (every member a document; NLTK corpora such as ``brown.zip`` are recognised
  and cleaned: Brown's ``word/tag`` tokens are untagged and rebuilt into readable sentences);
- a folder (every file below it, recursively, in sorted order; ``*.py`` only when ``kind`` is
  "code" or the source says ``{"path": ..., "glob": "*.py"}``);
- ``"python-stdlib"``: the ``*.py`` files of this Python's standard library (test folders skipped);
  ``"python-stdlib-tests"``: its ``test/test_*.py`` files (held out from "python-stdlib");
- ``"python-package:NAME"``: the ``*.py`` files of the installed package NAME (test folders
  skipped), e.g. ``python-package:networkx``;
- ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face ``datasets`` data set (needs the package and
  network access).

WikiText files (a ``.txt``/``.gz`` whose lines have `` = Title = `` headings) are split into
articles and detokenized (`` @-@ `` -> ``-``, no spaces before punctuation or inside brackets and
quotes; sentences with the ``<unk>`` placeholder dropped, see ``detokenize_wikitext_line``), other
long plain-text files into paragraph groups, so that the held-out validation split (chosen by
document) holds whole documents, never pieces of training ones.

Packing: each document's token ids followed by ``</s>`` are concatenated in document order and cut
into chunks of ``seq_len`` tokens. ``ChunkStream`` serves those chunks in a deterministic
per-epoch shuffled order from a seed, with a position (``epoch``, ``index``) that a checkpoint
can store and restore, and a disjoint shard per data-parallel rank.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import sysconfig
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

SKIP_MEMBER = re.compile(r"(^|/)(readme[^/]*|license[^/]*|cats\.txt|contents|\.[^/]*)$", re.IGNORECASE)
# Plain-text documents longer than this are split into groups of paragraphs/lines.
MAX_DOC_CHARS = 8000
WIKI_TITLE = re.compile(r"^ = [^=].* = $")
BROWN_MEMBER = re.compile(r"(^|/)brown/c[a-r]\d\d$")


# --- cleaning ----------------------------------------------------------------------------------
def _detokenize(words: list[str]) -> str:
    """Rebuild a readable sentence from Penn-style tokens (Brown): quotes, punctuation spacing."""
    text = " ".join(words)
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'t|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    # paired double quotes: no space inside
    out, open_quote = [], True
    for piece in re.split(r'( ?" ?)', text):
        if piece.strip() == '"':
            out.append(' "' if open_quote else '" ')
            open_quote = not open_quote
        else:
            out.append(piece)
    text = "".join(out)
    text = re.sub(r" {2,}", " ", text).strip()
    text = re.sub(r'" ([,.;:!?])', r'"\1', text)
    return text


# WikiText's tokenized release: " @-@ " etc. join numbers and compounds; "<unk>" replaced rare words.
WIKI_JOINERS = {"@-@": "-", "@,@": ",", "@.@": "."}
WIKI_UNK = "<unk>"
WIKI_HEADING = re.compile(r"^ *(=(?: =)*) (.*?) \1 *$")
SENTENCE_END = frozenset({".", "!", "?"})


def detokenize_wikitext_line(line: str) -> str:
    """One WikiText line -> readable text (the standard detokenization), sentences that contain
    ``<unk>`` dropped: a model must never learn to write the literal placeholder, and no word can
    be put back in its place. Headings (`` = = Title = = ``) become their bare title."""
    heading = WIKI_HEADING.match(line)
    tokens = heading.group(2).split() if heading else line.split()
    if heading and WIKI_UNK in tokens:
        return ""
    sentences, current, glue = [], [], False
    for token in tokens:
        if token in WIKI_JOINERS and current:  # "3 @.@ 1" -> "3.1": glued to both neighbours
            current[-1] += WIKI_JOINERS[token]
            glue = True
            continue
        if glue:
            current[-1] += token
            glue = False
        else:
            current.append(token)
        if token in SENTENCE_END:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    kept = [words for words in sentences if not any(WIKI_UNK in word for word in words)]
    return " ".join(_detokenize(words) for words in kept).replace(". . .", "...")


def detokenize_wikitext(text: str) -> str:
    """A WikiText document -> readable paragraphs (one per line, blank lines dropped)."""
    lines = (detokenize_wikitext_line(line) for line in text.splitlines())
    return "".join(line + "\n" for line in lines if line)


def wikitext_articles(text: str) -> list[str]:
    """A WikiText file's text -> its articles as clean documents (empty ones dropped)."""
    articles = (detokenize_wikitext(doc) for doc in split_wikitext(text))
    return [article for article in articles if article.strip()]


def untag_brown(raw: str) -> str:
    """Brown corpus file -> readable text: tags stripped, one paragraph per line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        sentences = []
        for line in block.splitlines():
            tokens = line.split()
            if not tokens:
                continue
            words = [t.rsplit("/", 1)[0] if "/" in t else t for t in tokens]
            sentences.append(_detokenize(words))
        if sentences:
            paragraphs.append(" ".join(sentences))
    # Brown's sentence lines are separated by blank lines; group sentences into paragraphs of ~5.
    merged = [" ".join(paragraphs[i:i + 5]) for i in range(0, len(paragraphs), 5)]
    return "\n".join(merged) + ("\n" if merged else "")


def split_wikitext(text: str) -> list[str]:
    """WikiText release -> one document per article (split at `` = Title = `` lines)."""
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if WIKI_TITLE.match(line.rstrip("\n")) and any(l.strip() for l in current):
            docs.append("".join(current))
            current = []
        current.append(line)
    if any(l.strip() for l in current):
        docs.append("".join(current))
    return docs


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """A long plain text -> pieces of at most ~max_chars, cut at blank lines, else at newlines."""
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    sep = "\n\n" if text.count("\n\n") >= len(text) // max_chars else "\n"
    pieces, current, size = [], [], 0
    for part in text.split(sep):
        if size and size + len(part) > max_chars:
            pieces.append(sep.join(current) + sep)
            current, size = [], 0
        current.append(part)
        size += len(part) + len(sep)
    if current:
        pieces.append(sep.join(current))
    return [p for p in pieces if p.strip()]


def _decode_bytes(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _text_documents(text: str, name: str) -> list[str]:
    text = text.replace("\r\n", "\n")  # Windows line endings (NLTK webtext) -> newlines
    if BROWN_MEMBER.search(name):
        text = untag_brown(text)
        return [text] if text.strip() else []
    lines = text.splitlines()[:50]
    if any(WIKI_TITLE.match(l) for l in lines):
        return wikitext_articles(text)
    return split_long(text)


def _jsonl_documents(lines: Iterable[str], name: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}: line {n} is not valid JSON ({exc.msg})") from None
        text = record.get("text", record.get("content")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{name}: line {n} has no string field 'text' or 'content'")
        if text.strip():
            yield text


# --- sources -----------------------------------------------------------------------------------
def python_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_package_dir(name: str) -> Path:
    """The folder of an installed package (``python-package:NAME`` sources)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"python-package:{name}: no installed package named {name!r} "
                         f"(pip install {name}, or give its folder as a path)")
    return Path(next(iter(spec.submodule_search_locations)))


def _is_test_path(path: Path) -> bool:
    return any(part in ("test", "tests", "idle_test", "site-packages", "__pycache__") for part in path.parts)


def _file_documents(path: Path, code: bool = False) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(".zip"):
        yield from _zip_documents(path, code)
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
            inner = name[:-3]
        else:
            data = path.read_bytes()
            inner = name
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    text = _decode_bytes(data)
    if inner.endswith(".jsonl"):
        yield from _jsonl_documents(text.splitlines(), str(path))
    elif code or inner.endswith(".py"):
        if text.strip():
            yield text
    else:
        yield from _text_documents(text, str(path))


def _zip_documents(path: Path, code: bool = False) -> Iterator[str]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.is_dir() or SKIP_MEMBER.search(info.filename):
                continue
            data = archive.read(info)
            member = info.filename.lower()
            if member.endswith(".gz"):
                data = gzip.decompress(data)
                member = member[:-3]
            text = _decode_bytes(data)
            if member.endswith(".jsonl"):
                yield from _jsonl_documents(text.splitlines(), f"{path}:{info.filename}")
            elif code or member.endswith(".py"):
                if text.strip():
                    yield text
            else:
                yield from _text_documents(text, info.filename)


def _hf_documents(spec: str) -> Iterator[str]:
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        raise InputError(f"{spec}: reading hub data sets needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, ...
        raise InputError(f"{spec}: could not load the data set ({type(exc).__name__}: {exc}); "
                         "offline? pass local files instead") from None
    field = "text" if "text" in ds.column_names else "content" if "content" in ds.column_names else None
    if field is None:
        raise InputError(f"{spec}: data set has no 'text' or 'content' column (columns: {ds.column_names})")
    texts = ds[field]
    if name.startswith("wikitext") or (texts and any(WIKI_TITLE.match(t.rstrip("\n")) for t in texts[:50])):
        yield from wikitext_articles("".join(texts))
    else:
        yield from (t for t in texts if t and t.strip())


def source_spec(source) -> tuple[str, dict]:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), {}
    if isinstance(source, dict) and "path" in source:
        return str(source["path"]), {k: v for k, v in source.items() if k != "path"}
    raise InputError(f"a data source must be a path, 'python-stdlib', 'hf:NAME[:CONFIG][:SPLIT]' or "
                     f"{{'path': ...}}, got {source!r}")


def read_documents(source, kind: str = "text") -> Iterator[str]:
    """Documents (strings) of one source, in a deterministic order."""
    spec, options = source_spec(source)
    if spec.startswith("hf:"):
        yield from _hf_documents(spec)
        return
    code = kind == "code"
    if spec == "python-stdlib":
        spec, options = str(python_stdlib_dir()), {"glob": "*.py", "skip_tests": True, **options}
    elif spec.startswith("python-package:"):
        spec, options = str(python_package_dir(spec.split(":", 1)[1])), {"glob": "*.py", "skip_tests": True, **options}
    elif spec == "python-stdlib-tests":  # Lib/test/test_*.py: held out from "python-stdlib"
        spec, options = str(python_stdlib_dir() / "test"), {"glob": "test_*.py", "skip_tests": False, **options}
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"data source {spec} does not exist")
    if path.is_file():
        yield from _file_documents(path, code)
        return
    pattern = options.get("glob", "*.py" if code else "*")
    skip_tests = options.get("skip_tests", code)
    files = sorted(p for p in path.rglob(pattern) if p.is_file() and not SKIP_MEMBER.search(p.name))
    if skip_tests:
        files = [p for p in files if not _is_test_path(p.relative_to(path))]
    for p in files:
        try:
            yield from _file_documents(p, code)
        except InputError:
            if code:  # unreadable files in a source tree: skip
                continue
            raise


def load_documents(sources, kind: str = "text", max_chars: int | None = None) -> list[str]:
    """Every document of every source (in order); clear errors for no sources / empty corpora."""
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    if not sources:
        raise InputError("no data sources given")
    docs: list[str] = []
    total = 0
    for source in sources:
        before = len(docs)
        for doc in read_documents(source, kind):
            docs.append(doc)
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                break
        if len(docs) == before:
            raise InputError(f"data source {source_spec(source)[0]} holds no text (empty corpus)")
        if max_chars is not None and total >= max_chars:
            break
    return docs


def split_documents(docs: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) by whole document, chosen by a seeded shuffle; order kept within each."""
    if not 0 <= valid_fraction < 1:
        raise InputError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n_valid = int(round(len(docs) * valid_fraction))
    if valid_fraction > 0:
        n_valid = max(1, n_valid)
    if n_valid >= len(docs):
        raise InputError(f"corpus has {len(docs)} document(s): too few to hold out a validation split")
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    valid_idx = set(idx[:n_valid])
    train = [d for i, d in enumerate(docs) if i not in valid_idx]
    valid = [d for i, d in enumerate(docs) if i in valid_idx]
    return train, valid


def tokenize_documents(tokenizer, docs: Iterable[str]) -> list[list[int]]:
    """Token ids per document (exact round trip with our byte-level tokenizers), batched."""
    docs = list(docs)
    out: list[list[int]] = []
    backend = getattr(tokenizer, "_tokenizer", None)
    for start in range(0, len(docs), 256):
        batch = docs[start:start + 256]
        if backend is not None:
            out.extend([list(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False)])
        else:
            from .tokenization import encode

            out.extend(encode(tokenizer, d) for d in batch)
    return out


def pack(token_docs: Iterable[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by eos, into [N, seq_len] chunks (tail dropped)."""
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2, got {seq_len}")
    flat: list[int] = []
    for ids in token_docs:
        if ids:
            flat.extend(ids)
            flat.append(eos_id)
    n = len(flat) // seq_len
    if n == 0:
        raise InputError(f"corpus has {len(flat)} tokens: too few for one chunk of {seq_len} (empty corpus?)")
    return torch.tensor(flat[: n * seq_len], dtype=torch.int32).view(n, seq_len)


# --- the chunk stream --------------------------------------------------------------------------
@dataclass
class StreamState:
    epoch: int = 0
    index: int = 0  # chunks of this epoch's order already served (all ranks together)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        return cls(int(d["epoch"]), int(d["index"]))


class ChunkStream:
    """Chunks in a per-epoch shuffled order (from ``seed`` and the epoch number).

    Each step all ranks together take ``world * batch`` consecutive chunks of the order; rank r
    gets the r-th block of ``batch``. So the shards of all ranks are disjoint and together they
    cover the order exactly once per epoch (an epoch's tail shorter than a full global batch is
    skipped). ``state`` is the position; restoring it continues the same sequence.
    """

    def __init__(self, chunks: torch.Tensor, batch: int, seed: int, rank: int = 0, world: int = 1):
        if batch < 1:
            raise InputError(f"batch size must be >= 1, got {batch}")
        if len(chunks) < batch * world:
            raise InputError(f"training data has {len(chunks)} chunk(s), fewer than one global batch of "
                             f"{batch * world}: use more data, a smaller batch or a shorter seq_len")
        self.chunks, self.batch, self.seed, self.rank, self.world = chunks, batch, seed, rank, world
        self.state = StreamState()
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._order = torch.randperm(len(self.chunks), generator=g)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> torch.Tensor:
        """Chunk indices of this rank's next batch (advances the position)."""
        step = self.batch * self.world
        if self.state.index + step > len(self.chunks):
            self.state = StreamState(self.state.epoch + 1, 0)
        order = self.order(self.state.epoch)
        start = self.state.index + self.rank * self.batch
        idx = order[start:start + self.batch]
        self.state = StreamState(self.state.epoch, self.state.index + step)
        return idx

    def next_batch(self) -> torch.Tensor:
        return self.chunks[self.next_indices()].long()
