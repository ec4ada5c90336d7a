"""OpenAI batch files, line by line: request lines in, output lines out, and the resume scan.

A request line (OpenAI's batch input format, also vLLM's ``run_batch``)::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/infill", "body": {"text": "A [MASK:3] day."}}

An output line (OpenAI's batch output format)::

    {"id": "batch_req_…", "custom_id": "req-1",
     "response": {"status_code": 200, "request_id": "req_…", "body": {…the server's answer…}},
     "error": null}

A request the server answers with an error keeps its ``response`` (status code and OpenAI's error
object, as the server sends it) and repeats the message in ``error``; a line that never reaches
the server (not JSON, no custom_id, an unknown url) has ``"response": null`` and an ``error``.
A line without a readable custom_id is named ``line-N`` (its 1-based line number).

The resume scan (``scan_output``) reads an output file written by an earlier, possibly killed run:
every complete line (ending in a newline, valid JSON with a custom_id) counts as done; a torn last
line is cut off, so it is redone and never duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

from ..errors import InputError

URLS = ("/v1/completions", "/v1/infill", "/v1/score")
MAX_CUSTOM_ID = 512


@dataclasses.dataclass
class BatchRequest:
    """One input line: either a request to run (``body`` a dict) or the line's ``error``."""

    lineno: int
    custom_id: str
    url: str | None = None
    body: dict | None = None
    error: dict | None = None  # {"code", "message"}: the line is answered without running
    line: str = ""  # the input line as read (what a Ray actor re-reads)


def line_id(lineno: int) -> str:
    """The custom_id of a line that has no readable one."""
    return f"line-{lineno}"


def parse_request_line(line: str, lineno: int) -> BatchRequest:
    """One input line as a ``BatchRequest``; whatever is wrong with it becomes its ``error``."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return _bad(lineno, line_id(lineno), "invalid_json", f"line {lineno} is not valid JSON: {msg}")
    if not isinstance(obj, dict):
        return _bad(lineno, line_id(lineno), "invalid_request", f"line {lineno} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return _bad(lineno, line_id(lineno), "invalid_custom_id",
                    f"line {lineno}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        return _bad(lineno, custom_id, "invalid_request", f"line {lineno}: unknown field {unknown[0]!r}")
    if obj.get("method", "POST") != "POST":
        return _bad(lineno, custom_id, "invalid_method", f"line {lineno}: method must be \"POST\"")
    url = obj.get("url")
    if url not in URLS:
        return _bad(lineno, custom_id, "invalid_url",
                    f"line {lineno}: url must be one of {', '.join(URLS)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _bad(lineno, custom_id, "invalid_request", f"line {lineno}: body must be a JSON object")
    return BatchRequest(lineno, custom_id, url, body)


def text_request(line: str, lineno: int, defaults: dict) -> BatchRequest:
    """``--text`` mode: a line of text with hole markup is an /v1/infill request named line-N."""
    return BatchRequest(lineno, line_id(lineno), "/v1/infill", {**defaults, "text": line})


def read_line(line: str, lineno: int, *, text: bool = False, defaults: dict | None = None) -> BatchRequest:
    """One input line as a request: ``--text`` markup or a batch request line, with ``defaults``
    filling the body fields the line does not set."""
    request = text_request(line, lineno, defaults or {}) if text else parse_request_line(line, lineno)
    if request.body is not None and defaults and not text:
        request.body = {**defaults, **request.body}
    request.line = line
    return request


def _bad(lineno: int, custom_id: str, code: str, message: str) -> BatchRequest:
    return BatchRequest(lineno, custom_id, error={"code": code, "message": message})


def read_requests(path: str, *, text: bool = False, defaults: dict | None = None) -> list[BatchRequest]:
    """Every non-blank line of the input file as a request (bad lines carry their error).

    The whole run cannot start (InputError, one line): an unreadable or non-UTF-8 file, or a
    custom_id that repeats (its results could not be told apart)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read the input {path}: {exc.strerror or exc}") from None
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"the input {path} is not UTF-8 text (line {line}, byte {exc.start})") from None
    if content.startswith("\ufeff"):  # a byte-order mark some editors write
        content = content[1:]
    requests, seen = [], {}
    # lines end at "\n" only: str.splitlines would also cut at U+2028 and the like, which JSON
    # strings may hold unescaped
    for lineno, line in enumerate(content.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        request = read_line(line, lineno, text=text, defaults=defaults)
        if request.custom_id in seen:
            raise InputError(f"the input {path}: line {lineno} repeats the custom_id {request.custom_id!r} "
                             f"of line {seen[request.custom_id]}; custom_ids must be unique")
        seen[request.custom_id] = lineno
        requests.append(request)
    return requests


def parse_defaults(text: str | None) -> dict:
    """``--defaults``: a JSON object of body fields."""
    if text is None:
        return {}
    from ..cli_args import json_option

    return json_option(text, "--defaults", "a JSON object of body fields, e.g. '{\"seed\": 0, \"k\": 5}'")


def output_line(custom_id: str, status_code: int | None, body: dict | None, error: dict | None = None) -> dict:
    """An output line in OpenAI's batch shape. ``status_code`` None: the request never ran."""
    response = None
    if status_code is not None:
        response = {"status_code": status_code, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
        if error is None and status_code >= 400:
            detail = (body or {}).get("error") or {}
            error = {"code": detail.get("code") or detail.get("type") or f"http_{status_code}",
                     "message": detail.get("message") or f"HTTP {status_code}"}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def dumps(line: dict) -> bytes:
    """One output line, newline-terminated (non-ASCII text kept as it is)."""
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def scan_output(path: str) -> tuple[set[str], int]:
    """(custom_ids already written, byte length of the complete lines) of an earlier run's output.
    What follows the last complete line (a line torn by a kill) is to be cut off and redone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read the output {path} to resume it: {exc.strerror or exc}") from None
    done, good = set(), 0
    for raw in data.split(b"\n")[:-1]:  # what follows the last newline is torn (or nothing)
        raw += b"\n"
        try:
            custom_id = json.loads(raw).get("custom_id")
        except (ValueError, AttributeError):
            break
        if not isinstance(custom_id, str):
            break
        done.add(custom_id)
        good += len(raw)
    return done, good


class OutputWriter:
    """Appends output lines durably: one ``write`` per line, then flush and fsync, so a line is
    either whole on disk or (killed mid-write) the torn tail that ``scan_output`` cuts off."""

    def __init__(self, path: str, *, resume: bool = False, overwrite: bool = False):
        self.path = path
        self.done: set[str] = set()
        exists = os.path.exists(path)
        if exists and os.path.isdir(path):
            raise InputError(f"the output {path} is a directory")
        if exists and not (resume or overwrite):
            raise InputError(f"the output {path} exists: --resume to continue it, --overwrite to replace it")
        if exists and resume:
            self.done, good = scan_output(path)
            if good != os.path.getsize(path):
                os.truncate(path, good)  # a torn last line: redone below
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if overwrite else 0), 0o644)
        except OSError as exc:
            raise InputError(f"cannot write the output {path}: {exc.strerror or exc}") from None

    def write(self, line: dict) -> None:
        data = dumps(line)
        view = memoryview(data)
        while view:  # a regular file takes it in one go; loop for the rare short write
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        self.done.add(line["custom_id"])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
