"""The eval suite of the gate: golden cases in data/eval/*.jsonl, validated with file and line.

When data/eval has no suite, the shipped Luna suite (resources/eval) is copied there first, so a user can
edit it. One JSON object per line: {"id", "prompt" (optionally "system") or "messages" ending with a user
turn, "checks": [{"type", "value", "ignoreCase"?, "description"?}], "maxNewTokens"?, "tags"?,
"description"?, "lang"?}. `lang`: the prompt's language (`de`, `en`; the dashboard marks its example so). Check types: contains / not_contains (value: a string or a list: any of / none of),
equals (whole answer, trimmed), regex (`re.search`, at most 1 s per answer), max_chars (answer length), stops (the answer
ended with the end-of-turn token before the token limit). Every problem in every file is collected and
reported with file and line, then loading fails once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

from .errors import JSON_FAULTS, LISTED_PROBLEMS, UsageError, json_fault, some
from .formats import MAX_TEXT_LEN, NOT_UNICODE, is_unicode, normalize_text
from .fsio import atomic_write_bytes
from .messages import counted
from .settings import Settings

CHECK_TYPES = ("contains", "not_contains", "equals", "regex", "max_chars", "stops")
DEFAULT_MAX_NEW_TOKENS = 128
# How long one regex check may take on one answer (see `EvalCheck.run`).
REGEX_SECONDS = 1.0
_CASE_KEYS = {"id", "prompt", "system", "messages", "checks", "maxNewTokens", "tags", "description", "lang"}
# A language tag as HTML's lang takes it (de, en, pt-BR); tags are case-insensitive, so `EN` is read as `en`.
_LANG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")
_CHECK_KEYS = {"type", "value", "ignoreCase", "description"}
_ROLES = {"system", "user", "assistant"}


# --- the suite ----------------------------------------------------------------------------------


# `re` warns of a set that a future Python may read otherwise (`[[:digit:]]`, `[a--b]`) as it compiles a pattern: a
# FutureWarning with a source line from this module in the middle of the command's output, about today's
# meaning, which the check keeps.
warnings.filterwarnings("ignore", message=r"Possible (nested set|set \w+)", category=FutureWarning)

# The child that runs regex checks: nothing imported but `re` and `json`, one search per line in, one out.
# It ends with the process that started it (a gate killed by SIGTERM left a runaway search at full CPU): asked
# of the kernel (PR_SET_PDEATHSIG), then checked once, for a parent gone before that took hold. "ready" once it
# runs, so that its start-up counts against no search. It shares the gate's process group, so it ignores what a
# job's cancel, a stopping trainer or Ctrl-C sends the group: the gate decides how it ends, not a check.
_SEARCHER = (
    "import ctypes, json, os, re, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1): signal.signal(s, signal.SIG_IGN)\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit()\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    pattern, flags, text = json.loads(line)\n"
    "    print(json.dumps(re.search(pattern, text, flags) is not None), flush=True)\n"
)
_START_SECONDS = 60.0  # the child's start-up, on a machine as loaded as it may be


def _cpu_seconds(pid: int) -> float:
    """CPU seconds process `pid` has used (0.0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


class BoundedSearch:
    """Python's `re.search`, with a bound on each search. A pattern that backtracks without end (`(a|aa)+$`)
    on a long answer held the gate for good, and `serve` with it: `re` never lets go of the interpreter while
    it matches, so no other request and no signal got through. So the searches run in a child interpreter
    (one per gate, started at its first regex), each search given at most REGEX_SECONDS of the child's own CPU
    time; one that ran out of it is killed, its search raises TimeoutError (the check fails, saying so), and
    the next search starts a new child. The patterns keep `re`'s syntax and meaning exactly."""

    def __init__(self, seconds: float = REGEX_SECONDS) -> None:
        self.seconds = seconds
        self._child: subprocess.Popen[str] | None = None

    def __call__(self, pattern: str, flags: int, text: str, *, tries: int = 2) -> bool:
        child = self._child or self._start()
        assert child.stdin is not None and child.stdout is not None
        used = 0.0
        try:
            before = _cpu_seconds(child.pid)
            child.stdin.write(json.dumps([pattern, flags, text]) + "\n")
            child.stdin.flush()

            def going() -> bool:
                nonlocal used
                used = max(used, _cpu_seconds(child.pid) - before)
                return used < self.seconds

            answer = self._answer(child, going)
        except OSError:  # the child is gone
            answer = ""
        if not answer:
            self.close()
            if used < self.seconds and tries > 1:  # it ended before its time was up (killed from outside): again
                return self(pattern, flags, text, tries=tries - 1)
            raise TimeoutError(f"the regex took longer than {self.seconds:g} s")
        return bool(json.loads(answer))

    @staticmethod
    def _answer(child: subprocess.Popen[str], going: Callable[[], bool], most: float = _START_SECONDS) -> str:
        """The child's next line, while `going()` holds. The bound is the child's own CPU time, not the clock:
        on a machine loaded by other work a quick search waits for the CPU, and must not count as runaway."""
        assert child.stdout is not None
        deadline = time.monotonic() + most
        while time.monotonic() < deadline:
            ready, _, _ = select.select([child.stdout], [], [], 0.1)
            if ready:
                return child.stdout.readline()
            if child.poll() is not None or not going():
                return ""
        return ""

    def _start(self) -> subprocess.Popen[str]:
        try:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _SEARCHER, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                encoding="utf-8",
                errors="surrogatepass",
            )
        except OSError as exc:  # this process's interpreter is gone (its environment moved or rebuilt)
            raise UsageError(
                f"The eval gate's regex checks need this Python ({sys.executable or 'unknown'}), which cannot be "
                f"started ({exc.strerror or exc}); run lunatrain again from its environment."
            ) from None
        self._child = child
        if self._answer(child, lambda: True) != "ready\n":
            self.close()
            raise UsageError(f"The eval gate's regex checks could not start {sys.executable}; run lunatrain again.")
        return child

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            for stream in (self._child.stdin, self._child.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):  # a write the child never read (BrokenPipeError)
                        stream.close()
            self._child = None

    def __enter__(self) -> BoundedSearch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class EvalCheck:
    type: str
    value: Any = None
    ignore_case: bool = False
    description: str = ""

    def run(self, output: str, stopped: bool, search: BoundedSearch | None = None) -> bool:
        """Whether `output` passes; a regex runs in `search` (one of its own when None), and raises
        TimeoutError past its bound."""
        if self.type == "stops":
            return stopped
        if self.type == "max_chars":
            return len(output) <= self.value
        output = unicodedata.normalize("NFC", output)  # as the check's value was read
        if self.type == "regex":
            flags = re.IGNORECASE if self.ignore_case else 0
            if search is not None:
                return any(search(pattern, flags, text) for pattern, text in _regex_searches(self.value, output))
            with BoundedSearch() as own:
                return any(own(pattern, flags, text) for pattern, text in _regex_searches(self.value, output))
        fold = (lambda s: s.casefold()) if self.ignore_case else (lambda s: s)
        text = fold(output)
        if self.type == "equals":
            return text.strip() == fold(self.value).strip()
        values = [self.value] if isinstance(self.value, str) else list(self.value)
        found = any(fold(v) in text for v in values)
        return found if self.type == "contains" else not found

    def outcome(self, output: str, stopped: bool, search: BoundedSearch | None = None) -> dict[str, Any]:
        """The check as the report shows it, with whether it passed (and `timedOut` where a regex ran out of
        its time on this answer)."""
        try:
            return {**self.to_dict(), "passed": self.run(output, stopped, search)}
        except TimeoutError:
            return {**self.to_dict(), "passed": False, "timedOut": True}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.value is not None:
            out["value"] = self.value
        if self.ignore_case:
            out["ignoreCase"] = True
        return out


@dataclass(frozen=True)
class EvalCase:
    id: str
    messages: list[dict[str, str]]
    checks: list[EvalCheck]
    max_new_tokens: int
    source: str  # file:line
    lang: str | None = None  # the prompt's language, where the case says it


def shipped_suite_dir() -> Any:
    return resources.files("lunatrain") / "resources" / "eval"


def _suite_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(suite files, misnamed ones) in `folder`. A suite file ends in .jsonl (any case); one that names JSON
    otherwise (`golden.json`, `golden.jsonl.txt`, `golden.ndjson`) looks like a suite saved under another name.
    A hidden file is an editor's lock or an OS's leftover (`.#golden.jsonl` of Emacs, `._golden.jsonl` copied
    from a Mac), never a suite; notes beside a suite (a README) are neither."""
    suite, misnamed = [], []
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if name.startswith("."):
            continue
        if path.suffix.lower() == ".jsonl":
            suite.append(path)
        elif ".json" in name:
            misnamed.append(path)
    return suite, misnamed


def ensure_suite(settings: Settings) -> list[Path]:
    """data/eval/*.jsonl; when the folder holds none, the shipped golden suite is copied there first. A folder
    whose only suite is misnamed (golden.json) is refused, not given the shipped one (which would decide in
    its place without a word)."""
    folder = settings.eval_dir
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise UsageError(
            f"{folder} is not a folder (a file, or a link to nothing): the golden suite lives in a folder of .jsonl "
            "files there; move it away to get the shipped suite."
        )
    folder.mkdir(parents=True, exist_ok=True)
    files, other = _suite_files(folder)
    if not files and other:
        names = ", ".join(p.name for p in other[:5]) + (", …" if len(other) > 5 else "")
        raise UsageError(
            f"{settings.eval_dir} holds {names} but no suite file: golden suite files end in .jsonl (one JSON "
            "case per line); rename yours, or empty the folder to get the shipped suite.",
            code="eval.no_suite_file",
            params={"dir": str(settings.eval_dir), "files": [p.name for p in other[:5]]},
        )
    if not files:
        for entry in shipped_suite_dir().iterdir():
            if entry.name.endswith(".jsonl"):
                # Whole or not at all: another gate starting at the same moment (a second thread of `serve`,
                # a scheduled flow beside the dashboard) sees the file as soon as it exists, and must never
                # read it half written ("has no cases", "not valid JSON" about the shipped suite).
                atomic_write_bytes(settings.eval_dir / entry.name, entry.read_bytes())
        files = _suite_files(settings.eval_dir)[0]
    return files


def check_suite(settings: Settings) -> None:
    """The suite the gate will read, checked as `load_suite` checks it, writing nothing: the user's files;
    with none, the shipped suite, valid as shipped (the gate copies it in when it runs)."""
    folder = settings.eval_dir
    if (folder.exists() or folder.is_symlink()) and (not folder.is_dir() or _suite_files(folder) != ([], [])):
        load_suite(settings)


def load_suite(settings: Settings) -> list[EvalCase]:
    """Every case of every suite file, validated; all problems of all files raise one UsageError."""
    cases: list[EvalCase] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for path in ensure_suite(settings):
        named: list[tuple[str, str]] = []  # every line's id, those with other mistakes too
        file_cases, file_problems = parse_suite_file(path, named)
        problems += file_problems
        valid = {case.source: case for case in file_cases}
        for case_id, where in named:
            if case_id in first_seen:
                problems.append(f"{where}: duplicate case id {case_id!r} (first at {first_seen[case_id]})")
                continue
            first_seen[case_id] = where
            if where in valid:
                cases.append(valid[where])
    if problems:  # the first few in the sentence, as every refusal: thousands would make a page of it
        raise UsageError(
            f"The eval suite has {counted(len(problems), 'problem')}: {some(problems)}.",
            details=problems[:LISTED_PROBLEMS],
            params={"count": len(problems)},
        )
    if not cases:
        raise UsageError(
            f"The eval suite in {settings.eval_dir} has no cases; add some or delete the files "
            "to get the shipped suite back."
        )
    return cases


def parse_suite_file(path: Path, named: list[tuple[str, str]] | None = None) -> tuple[list[EvalCase], list[str]]:
    """The cases of one JSONL file and a `file:line: problem` entry for each problem found. `named` gets each
    line's id and place, also of a line with other mistakes: its id may repeat another's, which is said with
    them, not on the next try once they are fixed."""
    cases: list[EvalCase] = []
    problems: list[str] = []
    try:
        # A BOM, as Windows editors save it, is read. Lines end at "\n" alone (JSON Lines): splitlines() also
        # ends one at U+2028 or U+0085, which JSON strings may hold as they are.
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        return [], [f"{path}:{line}: not UTF-8 text (byte {exc.start})"]
    except IsADirectoryError:
        return [], [f"{path}: a folder, not a suite file"]
    except FileNotFoundError:  # a link whose target is gone
        return [], [f"{path}: a link to a file that does not exist"]
    except OSError as exc:
        return [], [f"{path}: cannot be read ({exc.strerror or exc})"]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except JSON_FAULTS as exc:
            at = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            problems.append(f"{where}: not valid JSON ({json_fault(exc).removesuffix(' at')}{at})")
            continue
        case, errs = _parse_case(obj, where)
        problems += [f"{where}: {e}" for e in errs]
        if case is not None and not errs:
            cases.append(case)
        cid = obj.get("id") if isinstance(obj, dict) else None
        if named is not None and isinstance(cid, str) and cid.strip() and is_unicode(cid):
            named.append((case.id if case is not None and not errs else nfc(cid), where))
    return cases, problems


def _parse_case(obj: Any, where: str) -> tuple[EvalCase | None, list[str]]:
    if not isinstance(obj, dict):
        return None, ["a case must be a JSON object"]
    errs = [f"unknown key {k!r} (allowed: {', '.join(sorted(_CASE_KEYS))})" for k in sorted(set(obj) - _CASE_KEYS)]
    # No UTF-8 form (a lone surrogate escape, valid JSON): nothing could tokenize, hash or show it.
    garbled = [f"{k!r} {NOT_UNICODE}" for k, v in obj.items() if not all(is_unicode(t) for t in _texts([k, v]))]
    if garbled:
        return None, errs + garbled
    # Every other text is bounded as the prompt is (a check's value, a tag, a description): a megabyte of them
    # would be read, hashed and written into every report.
    errs += [
        f"{k!r} holds a text longer than {MAX_TEXT_LEN} characters"
        for k, v in obj.items()
        if k not in ("prompt", "system", "messages") and any(len(t) > MAX_TEXT_LEN for t in _texts(v))
    ]
    cid = obj.get("id")
    if cid is None:
        errs.append("missing 'id' (a non-empty string)")
    elif not isinstance(cid, str) or not cid.strip():
        errs.append(f"'id' must be a non-empty string, got {cid!r}")
    # As chat reads each turn (and training data is stored): the gate judges the answer a user would get.
    messages = [m | {"content": normalize_text(m["content"])} for m in _case_messages(obj, errs)]
    checks_raw = obj.get("checks")
    checks: list[EvalCheck] = []
    if checks_raw is None:
        errs.append("missing 'checks' (a non-empty list)")
    elif not isinstance(checks_raw, list) or not checks_raw:
        errs.append(f"'checks' must be a non-empty list of checks, got {checks_raw!r}")
    else:
        for i, raw in enumerate(checks_raw, 1):
            check = _parse_check(raw, f"check {i}", errs)
            if check is not None:
                checks.append(check)
    max_new = obj.get("maxNewTokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 4096:
        errs.append(f"'maxNewTokens' must be an integer from 1 to 4096, got {max_new!r}")
    tags, description = obj.get("tags"), obj.get("description")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errs.append(f"'tags' must be a list of strings, got {tags!r}")
    if description is not None and not isinstance(description, str):
        errs.append(f"'description' must be a string, got {description!r}")
    lang = obj.get("lang")
    if lang is not None and not (isinstance(lang, str) and _LANG.fullmatch(lang)):
        errs.append(f'\'lang\' must be a language tag such as "de" or "en", got {lang!r}')
    if errs:
        return None, errs
    if lang is not None:
        primary, _, rest = lang.partition("-")
        lang = primary.lower() + (f"-{rest}" if rest else "")
    # Ids are unique as they look: "bär" composed and decomposed are one id (the second is a duplicate).
    return EvalCase(nfc(cid), messages, checks, max_new, where, lang), []


def _case_messages(obj: dict, errs: list[str]) -> list[dict[str, str]]:
    prompt, messages, system = obj.get("prompt"), obj.get("messages"), obj.get("system")
    if prompt is not None and messages is not None:
        errs.append("give either 'prompt' or 'messages', not both")
        return []
    if messages is None:
        if prompt is None:
            errs.append("missing 'prompt' (a non-empty string) or 'messages'")
            return []
        if not isinstance(prompt, str) or not prompt.strip():
            errs.append(f"'prompt' must be a non-empty string, got {prompt!r}")
            return []
        if system is not None and not isinstance(system, str):
            errs.append("'system' must be a string")
            return []
        if system and not system.strip():  # chat refuses a blank turn, and so would the dashboard's example
            errs.append("'system' is blank: leave it out or write the system prompt")
            return []
        for key, text in (("system", system or ""), ("prompt", prompt)):
            if len(text) > MAX_TEXT_LEN:  # as an example's text: a megabyte prompt would keep the gate for hours
                errs.append(f"{key!r} is longer than {MAX_TEXT_LEN} characters")
                return []
            if "\x00" in text:  # chat refuses it: the gate would judge an answer no user can get
                errs.append(f"{key!r} contains a NUL character")
                return []
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if system is not None:
        errs.append("'system' goes with 'prompt'; put a system message into 'messages' instead")
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and m["role"] in _ROLES
            and isinstance(m["content"], str)
            for m in messages
        )
    )
    if not ok:
        errs.append('\'messages\' must be a non-empty list of {"role": system|user|assistant, "content": string}')
        return []
    if messages[-1]["role"] != "user":
        errs.append("'messages' must end with a user message (the gate generates the answer)")
    for i, m in enumerate(messages, 1):
        if m["role"] != "assistant" and not m["content"].strip():  # as chat refuses it (an empty turn)
            errs.append(f"message {i} ({m['role']}) has no text")
        if len(m["content"]) > MAX_TEXT_LEN:
            errs.append(f"message {i} ({m['role']}) is longer than {MAX_TEXT_LEN} characters")
        if "\x00" in m["content"]:
            errs.append(f"message {i} ({m['role']}) contains a NUL character")
    return [dict(m) for m in messages]


def _parse_check(raw: Any, label: str, errs: list[str]) -> EvalCheck | None:
    if not isinstance(raw, dict):
        errs.append(f"{label} must be an object")
        return None
    bad = sorted(set(raw) - _CHECK_KEYS)
    if bad:
        errs.append(f"{label}: unknown key {bad[0]!r} (allowed: {', '.join(sorted(_CHECK_KEYS))})")
    kind, value, ignore = raw.get("type"), raw.get("value"), raw.get("ignoreCase", False)
    if kind not in CHECK_TYPES:
        errs.append(f"{label}: unknown check type {kind!r} (use one of {', '.join(CHECK_TYPES)})")
        return None
    if not isinstance(ignore, bool):
        errs.append(f"{label}: 'ignoreCase' must be true or false")
    n = len(errs)
    # Blank text is no expectation: `equals ""` passes only a blank answer, `contains " "` nearly every one
    # (`not_contains "\n"`, an answer on one line, is one: only the empty text is refused there).
    if kind in ("contains", "not_contains"):
        filled = (lambda v: bool(v.strip())) if kind == "contains" else (lambda v: bool(v))
        if not (isinstance(value, str) and filled(value)) and not (
            isinstance(value, list) and value and all(isinstance(v, str) and filled(v) for v in value)
        ):
            blank = "not blank" if kind == "contains" else "not empty"
            errs.append(f"{label} ({kind}): 'value' must be text that is {blank}, or a list of such texts")
    elif kind == "equals":
        if not isinstance(value, str) or not value.strip():
            errs.append(f"{label} (equals): 'value' must be text that is not blank")
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            errs.append(f"{label} (regex): 'value' must be a non-empty string")
        else:
            try:
                re.compile(value, re.IGNORECASE if ignore is True else 0)
            except (re.error, OverflowError, RecursionError, ValueError) as exc:  # a{99999999999}, (((…)))
                said = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
                errs.append(f"{label}: bad regex {_shortened(value)!r}: {said}")
    elif kind == "max_chars":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errs.append(f"{label} (max_chars): 'value' must be a positive integer")
    elif value not in (None, True):  # stops
        errs.append(f"{label} (stops): takes no value (or true)")
    description = raw.get("description")
    description = "" if description is None else description  # null as left out, as a case's own
    if not isinstance(description, str):
        errs.append(f"{label}: 'description' must be a string, got {description!r}")
    if len(errs) > n:
        return None
    if kind in ("contains", "not_contains", "equals"):  # as answers and examples are read: NFC (a value pasted
        # from a PDF or a Mac's file name in decomposed form looks the same and never matched)
        value = [nfc(v) for v in value] if isinstance(value, list) else nfc(value)
    return EvalCheck(kind, None if kind == "stops" else value, bool(ignore), description)


def _regex_searches(pattern: str, answer: str) -> list[tuple[str, str]]:
    """(pattern, text) pairs a regex check tries on a composed `answer`, passing when one matches. A pattern
    holding combining marks (pasted from a Mac's file name or a PDF: `Ba\u0308r`, or written so: `[aeiou]\u0301`)
    is also searched in the answer decomposed, and one that composes otherwise (`Café Ba\u0308r`, partly
    composed) also composed. Composing it alone would change what its classes and escapes mean (`[aeiou\u0301]`
    would become `[aeioú]`, `\\w\u0301` a literal `ẃ`)."""
    searches = [(pattern, answer)]
    if any(unicodedata.category(ch)[0] == "M" for ch in pattern):
        searches.append((pattern, unicodedata.normalize("NFD", answer)))
    if nfc(pattern) != pattern:
        searches.append((nfc(pattern), answer))
    return searches


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _texts(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (k, *_texts(v))]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def suite_hash(cases: list[EvalCase]) -> str:
    ident = [
        {
            "id": c.id,
            "messages": c.messages,
            "checks": [k.to_dict() for k in c.checks],
            "maxNewTokens": c.max_new_tokens,
        }
        for c in cases
    ]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
