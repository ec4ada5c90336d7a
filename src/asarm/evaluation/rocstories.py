"""``asarm eval rocstories``: story infilling, the paper's ROUGE table (docs/design.md, "Paper results", from DiffuLLaMA).

Protocol: the first 1,000 stories of the Story Cloze Test validation file (cloze_test_val__spring2016);
a story is InputSentence1..4 plus its right ending (RandomFifthSentenceQuiz1 or 2, per
AnswerRightEnding). Sentence 3 is hidden with its true length in tokens; the context is
sentences 1, 2, 4, 5, joined with single spaces:

    prefix = s1 + " " + s2      hole = " " + s3      suffix = " " + s4 + " " + s5

(each piece encoded separately, so the hole is exactly the tokens of " " + s3). The generated
hole is decoded alone, stripped of surrounding white space and scored with `rouge-score`
(ROUGE-1/2/L F-measure x 100, Porter stemming) against the true sentence 3.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import InputError
from .common import Example, find_shared_data, fit_infill, open_text

DEFAULT_STORIES = 1000


def read_stories(path: Path) -> list[dict]:
    with open_text(path) as f:
        rows = list(csv.DictReader(f))
    need = {"InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4"}
    if rows and not need <= set(rows[0]):
        raise InputError(f"{path}: not a Story Cloze / ROCStories CSV (needs columns {sorted(need)})")
    stories = []
    for r in rows:
        if "AnswerRightEnding" in r:
            s5 = r["RandomFifthSentenceQuiz1"] if str(r["AnswerRightEnding"]).strip() == "1" else r["RandomFifthSentenceQuiz2"]
        else:  # the ROCStories corpus itself: sentence1..sentence5
            s5 = r.get("InputSentence5") or r.get("sentence5", "")
        stories.append({"id": r["InputStoryid"], "sentences": [r["InputSentence1"], r["InputSentence2"],
                        r["InputSentence3"], r["InputSentence4"], s5]})
    return stories


class RocStoriesTask:
    name = "rocstories"

    def __init__(self, model, *, data=None, stories: int = DEFAULT_STORIES, use_stemmer: bool = True,
                 max_tokens: int | None = None):
        from .humaneval import model_max_tokens

        self.model = model
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise InputError("this model has no tokenizer files; evaluations need text in and out")
        self.tokenizer = tok
        path = Path(data) if data is not None else find_shared_data("rocstories", "cloze_test_val__spring2016.csv.gz")
        if path is None:
            raise InputError("no ROCStories file found: pass --data PATH (cloze_test_val__spring2016.csv[.gz])")
        if not path.is_file():
            raise InputError(f"{path}: no such ROCStories file")
        self.path = path
        self.stories = stories
        self.use_stemmer = use_stemmer
        self._scorer = None
        self.max_tokens = model_max_tokens(model, max_tokens)

    def settings(self) -> dict:
        return {"data": str(self.path), "stories": self.stories, "hidden": "sentence 3, true token length",
                "rouge": {"use_stemmer": self.use_stemmer}, "max_tokens": self.max_tokens}

    def examples(self, limit: int | None) -> list[Example]:
        from ..tokenization import encode

        stories = read_stories(self.path)[: self.stories]
        if limit is not None:
            stories = stories[:limit]
        out = []
        for i, st in enumerate(stories):
            s1, s2, s3, s4, s5 = st["sentences"]
            prefix, middle, suffix = split_story(st["sentences"])
            p, m, s = encode(self.tokenizer, prefix), encode(self.tokenizer, middle), encode(self.tokenizer, suffix)
            p, s, fits = fit_infill(p, m, s, self.max_tokens)
            if not fits:
                raise InputError(f"story {st['id']}: sentence 3 alone is longer than the model's limit")
            out.append(Example(i, st["id"], p + m + s, [False] * len(p) + [True] * len(m) + [False] * len(s),
                               {"reference": s3}))
        return out

    def rouge(self, prediction: str, reference: str) -> dict:
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=self.use_stemmer)
        s = self._scorer.score(reference, prediction)
        return {"rouge1": 100 * s["rouge1"].fmeasure, "rouge2": 100 * s["rouge2"].fmeasure,
                "rougeL": 100 * s["rougeL"].fmeasure}

    def score(self, examples, outputs, generated) -> list[dict]:
        from ..tokenization import decode

        recs = []
        for e, g in zip(examples, generated):
            pred = decode(self.tokenizer, g).strip()
            recs.append({**self.rouge(pred, e.info["reference"]), "output": pred, "reference": e.info["reference"]})
        return recs


def split_story(sentences: list[str]) -> tuple[str, str, str]:
    """(prefix, hole, suffix) strings of a five-sentence story; their concatenation is the story
    with single spaces between sentences."""
    s1, s2, s3, s4, s5 = (x.strip() for x in sentences)
    return f"{s1} {s2}", f" {s3}", f" {s4} {s5}"


def add_arguments(p) -> None:
    p.add_argument("--data", default=None, help="Story Cloze CSV (.csv or .csv.gz; default: the project's offline copy)")
    p.add_argument("--stories", type=int, default=DEFAULT_STORIES, help="first N stories (paper: 1000)")
    p.add_argument("--no-stemmer", action="store_true", help="ROUGE without Porter stemming")
    p.add_argument("--max-tokens", type=int, default=None, help="trim the context to at most this many tokens "
                   "(default: the model's limit, if it has one)")


def build_task(model, args) -> RocStoriesTask:
    return RocStoriesTask(model, data=args.data, stories=args.stories, use_stemmer=not args.no_stemmer,
                          max_tokens=args.max_tokens)
