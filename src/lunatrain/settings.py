"""One settings class: the ASSISTANT_* environment variables and every path under the data root.

The data root defaults to the current directory so that `data/…` and `reports/…` land where the guide
says; `ASSISTANT_HOME` moves it. Settings are read fresh on each `load_settings()` call (cheap) so that
tests and services that change the environment never see a stale copy.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import UsageError, pattern

# Adapter, profile, version and model names: no separators, no leading dot, never `..`, at most NAME_MAX
# characters. The one rule for every entry point: pydantic fields and FastAPI path parameters use
# NAME_PATTERN with max_length=NAME_MAX, everything else check_name(). A dot must be followed by another
# allowed character or end the name; written without lookarounds so that pydantic's Rust regex engine and
# OpenAPI clients read the same pattern.
NAME_MAX = 64
NAME_PATTERN = pattern(
    r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$",
    "should be ASCII letters (A-Z, a-z), digits, '.', '_' or '-', starting with a letter or digit and without '..'",
)
_NAME_RE = re.compile(NAME_PATTERN)


def check_name(value: str, what: str = "name") -> str:
    """Return `value` if it is a safe name, else raise a UsageError naming the rule."""
    if not isinstance(value, str) or len(value) > NAME_MAX or not _NAME_RE.fullmatch(value):
        raise UsageError(
            f"Invalid {what} {value!r}: use 1-64 ASCII letters (A-Z, a-z), digits, '.', '_' or '-', starting with a letter or digit "
            "and without '..'."
        )
    return value


def inside(root: Path, *parts: str) -> Path:
    """Join `parts` under `root` and verify the result stays inside it (no traversal, no symlink escape)."""
    root_resolved = root.resolve()
    path = root_resolved.joinpath(*parts).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise UsageError(f"Path {'/'.join(parts)!r} leaves the data root.")
    return path


# Where `lunatrain trainer` listens unless ASSISTANT_LORA_TRAINER_URL says otherwise. A trainer found there
# serving another data root makes this one start its own on a free port (service/ensure.py).
DEFAULT_TRAINER_URL = "http://127.0.0.1:5051"
# The latest preflight and gate reports (the guide's names), under reports/training and reports/eval.
PREPARE_REPORT = "prepare-latest.json"
TRAINER_DIR = "trainer"  # under data/: the trainer's own files (Settings.trainer_dir)
EVAL_REPORT = "eval-gate-latest.json"


class Settings(BaseSettings):
    # NaN is "a finite number expected", not "should be less than 1" (as the LoRA parameters say it)
    # Values without the spaces around them (a quoted .env line, `export X= Y`): " " was a data root folder
    # named by a space, and " 127.0.0.1" a host that was refused as not loopback.
    model_config = SettingsConfigDict(
        env_prefix="ASSISTANT_", extra="ignore", allow_inf_nan=False, str_strip_whitespace=True
    )

    home: Path = Field(default_factory=Path.cwd, description="data root; data/ and reports/ live under it")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite file data/assistant.db")
    train_val_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    train_test_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Not empty: "" was read as the current directory ("Base model '' has no config.json in /here").
    base_model: str = Field(default="luna-tiny", min_length=1, description="hub id, local directory, or luna-tiny")
    lora_trainer_url: str = Field(default_factory=lambda: DEFAULT_TRAINER_URL)
    lora_ensure_on_demand: bool = True
    lora_trainer_start_cmd: str | None = None
    # At most a day: a larger wait (or inf) for a trainer that never answers is no timeout at all.
    lora_ensure_timeout: float = Field(default=60.0, gt=0, le=86400)
    lora_gpus: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="processes per LoRA job, one per GPU (torchrun); default every visible GPU on CUDA, 1 on CPU; "
        "a number > 1 on CPU runs that many gloo processes",
    )
    lora_warm_worker: bool = Field(
        default=True,
        description="on a machine without CUDA, start each single-process job by fork from a worker that "
        "imported torch, transformers and PEFT once (seconds sooner); false: a fresh process per job",
    )
    # Not empty: "" binds every interface (the socket's INADDR_ANY), the riskiest reading of no address.
    api_host: str = Field(default="127.0.0.1", min_length=1, description="bind address of `lunatrain serve`")
    api_port: int = Field(default=5050, ge=0, le=65535, description="0: a free port, recorded in data/api/api.url")
    api_token: str | None = None
    allowed_hosts: str = Field(default="127.0.0.1,localhost,::1,[::1]", description="comma-separated Host allowlist")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Retention (`lunatrain gc`, see retention.py): what is kept of finished work.
    retain_exports: int = Field(default=3, ge=1, le=1000, description="export directories kept (current included)")
    retain_jobs: int = Field(default=50, ge=0, description="finished jobs whose events and log are kept")
    # At most 100 years: a larger age (or inf) is no date at all, and date arithmetic overflows on it.
    retain_job_days: float = Field(
        default=30.0, ge=0, le=36500, description="events and logs of finished jobs older than this go"
    )
    retain_checkpoint_days: float = Field(
        default=7.0, ge=0, le=36500, description="idle run work dirs (checkpoints) older than this go"
    )
    infer_max_concurrent: int = Field(
        default=8, ge=1, le=256, description="chat answers generated at once; more get 429"
    )
    infer_max_tokens: int = Field(default=1024, ge=1, le=131072, description="cap on a chat request's max_tokens")
    infer_max_adapters: int = Field(
        default=4, ge=1, le=64, description="adapters kept loaded (least recently used out)"
    )
    # A base trained in 4 bits (QLoRA) on a card that holds it only so is served so too, as its gate judged it.
    chat_quantize: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="how `serve` loads the base model for chat: none, 4bit or 8bit (bitsandbytes)"
    )
    hub_download: bool = Field(
        default=False,
        description="fetch a hub id the local Hugging Face cache lacks (one it holds is never updated unasked)",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _stripped(cls, v: object) -> object:
        """Every value as text without its surrounding spaces, whatever its type (`true `, `4bit `, a path)."""
        return v.strip() if isinstance(v, str) else v

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        try:
            home = v.expanduser().resolve()
        except RuntimeError:  # "~user/..." for a user this machine does not have
            raise ValueError(f"cannot find the home directory in {str(v)!r}") from None
        # A file where the data root (or a folder above it) belongs: say so now, not as a traceback from the
        # first mkdir deep inside whichever stage runs first.
        for path in (home, *home.parents):
            if path.exists():
                if not path.is_dir():
                    raise ValueError(f"{home} is not a directory" + (f" ({path} is a file)" if path != home else ""))
                break
        return home

    @field_validator("api_token", mode="after")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        # HTTP drops the spaces around a header's value, so a token with them could never be presented; and a
        # token of spaces alone is no token (a non-loopback bind must refuse it, not accept it and lock out all).
        token = v.strip() or None if v is not None else None
        if token is not None and not re.fullmatch(r"[\x20-\x7e]+", token):
            # HTTP clients send a header's bytes as ASCII (httpx cannot send others, curl sends UTF-8 that the
            # server reads as Latin-1): such a token could never be presented. Inner spaces are sent as they are.
            raise ValueError(
                "ASSISTANT_API_TOKEN must be printable ASCII (letters, digits, spaces and signs such as -._~+/=; "
                "no accented letters or control characters), as a bearer token is sent"
            )
        return token

    @field_validator("lora_trainer_url", mode="after")
    @classmethod
    def _trainer_url(cls, v: str) -> str:
        url = urlsplit(v)
        try:
            url.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
        except ValueError as exc:
            raise ValueError(f"{v!r} has an invalid port ({exc})") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{v!r} is not an http://HOST:PORT address")
        if url.username is not None or url.password is not None:
            # Shown wherever the address is (status, the API), and sent as Basic auth in place of the trainer's
            # bearer token: the trainer takes ASSISTANT_API_TOKEN, never a user and password. Not echoed.
            raise ValueError(
                "must be http://HOST:PORT without a user or password (the trainer takes ASSISTANT_API_TOKEN)"
            )
        # Requests go to the address's own paths, and a trainer started for it listens on its host and port
        # only: with a path (or a query, a fragment) every request missed it.
        if url.path not in ("", "/") or url.query or url.fragment or v.rstrip("/").endswith(("?", "#")):
            raise ValueError(f"{v!r} must be http://HOST:PORT without a path, query or fragment")
        return v

    # --- paths under the data root -------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def training_dir(self) -> Path:
        return self.data_dir / "training"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    def shown(self, path: Path) -> Path:
        """`path` as messages and records name it: relative to the data root when under it (a path there does
        not leak the machine's layout, and stays true when the root moves), else as it is."""
        return path.relative_to(self.home) if path.is_relative_to(self.home) else path

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def merged_dir(self) -> Path:
        """`lunatrain merge`'s output: one folder per merged adapter version, marked by registry.MERGE_FILE."""
        return self.models_dir / "merged"

    @property
    def eval_dir(self) -> Path:
        return self.data_dir / "eval"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def trainer_dir(self) -> Path:
        """The trainer's own files: its job database, its lock, the jobs' logs, its address."""
        return self.data_dir / TRAINER_DIR

    @property
    def trainer_logs_dir(self) -> Path:
        """One log per job (`service.jobs.job_log_path`), and torchrun's per-rank logs beside it."""
        return self.trainer_dir / "logs"

    # Where each running service records the address it serves (its port may be one the OS chose).
    @property
    def trainer_url_file(self) -> Path:
        return self.trainer_dir / "trainer.url"

    @property
    def api_url_file(self) -> Path:
        return self.data_dir / "api" / "api.url"

    @property
    def reports_training_dir(self) -> Path:
        return self.home / "reports" / "training"

    @property
    def reports_eval_dir(self) -> Path:
        return self.home / "reports" / "eval"

    # The reports the guide names, each written by one stage and read by status, the flows and the API.
    @property
    def prepare_report(self) -> Path:
        return self.reports_training_dir / PREPARE_REPORT

    @property
    def lora_latest_report(self) -> Path:
        return self.reports_training_dir / "lora-latest.json"

    @property
    def registry_file(self) -> Path:
        return self.reports_training_dir / "lora-adapters.json"

    @property
    def eval_report(self) -> Path:
        return self.reports_eval_dir / EVAL_REPORT

    @property
    def database_url(self) -> str:
        if self.db_url:
            return _rooted_sqlite(self.db_url, self.home)
        return "sqlite:///" + _url_path(self.data_dir / "assistant.db")


def _url_path(path: Path) -> str:
    """`path` in a SQLite URL. Escaped: a data root named `luna%20a` or `root?x=1` would otherwise keep its
    database elsewhere (URLs decode %XX, start a query at ? and a fragment at #); SQLAlchemy decodes the path
    back to the file's own name. Only these three: a name that is no UTF-8 (a Latin-1 byte) has no %-encoding."""
    return str(path).replace("%", "%25").replace("?", "%3F").replace("#", "%23")


_SQLITE_FILE = re.compile(r"(sqlite(?:\+\w+)?:///)([^?]+)(\?.*)?", re.S)


def _rooted_sqlite(url: str, home: Path) -> str:
    """A SQLite URL whose file is relative (`sqlite:///assistant.db`) names it under the data root, and `~` the
    user's home, as ASSISTANT_HOME reads them: SQLAlchemy would take it from the working directory, and one data
    root run from two directories (the on-demand trainer starts in the data root) kept two databases."""
    m = _SQLITE_FILE.fullmatch(url)
    if not m or m.group(2).startswith(("/", "file:")) or m.group(2) == ":memory:":  # file: a SQLite URI (uri=true)
        return url
    path = Path(os.path.expanduser(unquote(m.group(2))))
    return m.group(1) + _url_path(path if path.is_absolute() else home / path) + (m.group(3) or "")


def check_data_root(settings: Settings) -> None:
    """Refuse to start a service on a data root it cannot write: one sentence (UsageError, exit 2) instead
    of a traceback from the first write. Creates data/ and reports/training/ and writes a probe file in each."""
    from .fsio import probe_writable

    for directory in (settings.data_dir, settings.reports_training_dir):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe_writable(directory)
        except OSError as exc:
            raise UsageError(
                f"The data root {settings.home} is not usable: cannot write in {directory} ({exc.strerror or exc}); "
                "make it writable or point ASSISTANT_HOME at another directory."
            ) from None


def load_settings(**overrides: object) -> Settings:
    """Fresh settings from the environment, with explicit overrides (flags) on top."""
    _warn_unknown(tuple(sorted(n for n in os.environ if n.upper().startswith("ASSISTANT_") and n not in _KNOWN)))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise UsageError(f"Invalid configuration: {_first_error(exc)}") from exc
    except FileNotFoundError:
        # The data root is the working directory, or relative to it, and that was deleted or moved away under
        # the shell: it has no path any more.
        try:
            os.getcwd()
        except FileNotFoundError:
            raise UsageError(
                "The working directory no longer exists (deleted or moved away), so the data root cannot be "
                "found; cd to the data root again, or set ASSISTANT_HOME to its absolute path."
            ) from None
        raise


# Every ASSISTANT_ name is lunatrain's (README "Configuration"): one it does not know is a typo whose setting
# would be ignored without a word (ASSISTANT_API_TOKENS: an API without its token). The test suite's own
# database URL is the one name that is not a setting.
_KNOWN = {f"ASSISTANT_{name.upper()}" for name in Settings.model_fields} | {"ASSISTANT_TEST_PG_URL"}


# What other tools call a data root: the nearest spelling of ASSISTANT_DATA_DIR is ASSISTANT_DB_URL, a database.
_DATA_ROOT_NAMES = {
    f"ASSISTANT_{n}": "ASSISTANT_HOME"
    for n in ("DATA", "DATA_DIR", "DATA_ROOT", "DATA_PATH", "DATA_HOME", "ROOT", "DIR", "HOME_DIR", "WORKDIR")
}


@functools.cache
def _warn_unknown(names: tuple[str, ...]) -> None:
    """Once per process and set of names: settings are read again for every command step and request."""
    for name in names:
        if name.upper() in _KNOWN:  # the environment is read without regard to case (pydantic-settings)
            print(
                f"warning: {name} is read as {name.upper()}; spell it in capitals (with both set, which one counts "
                "depends on the order of the environment).",
                file=sys.stderr,
            )
            continue
        near = [_DATA_ROOT_NAMES[name.upper()]] if name.upper() in _DATA_ROOT_NAMES else []
        near = near or difflib.get_close_matches(name.upper(), sorted(_KNOWN - {"ASSISTANT_TEST_PG_URL"}), n=1)
        meant = f" (did you mean {near[0]}?)" if near else ""
        print(f"warning: {name} is not a lunatrain setting and is ignored{meant}.", file=sys.stderr)


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for a validator's own ValueError
        name = f"ASSISTANT_{loc.upper()}"
        # `export ASSISTANT_LORA_GPUS=` (an .env file's empty line) reads as "not a valid integer": say it is
        # empty, and that unsetting it gives the default
        if loc and first.get("input") == "" and os.environ.get(name) is not None and not os.environ[name].strip():
            return f"{name} is set but empty ({msg}); unset it for its default (`unset {name}`), or give it a value"
        return f"{name}: {msg}" if loc else msg
    return str(exc)
