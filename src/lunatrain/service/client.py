"""A small typed client for the trainer service, used by the CLI and the assistant API.

Every function takes the settings (trainer URL, token) first. An unreachable trainer raises
ServiceUnavailable; the trainer's 4xx answers come back as the matching LunaError (422 -> UsageError,
404 -> NotFound, 409 -> Conflict) carrying the trainer's own message. Reads of jobs are never a conflict: when
what answers at the trainer's address is not this data root's trainer (another project's, or no lunatrain
trainer at all), this root's trainer is not running, and a read raises ServiceUnavailable saying so.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, TypeVar, get_args
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from ..errors import PATTERN_RULES, CheckFailed, Conflict, LunaError, NotFound, ServiceUnavailable, UsageError
from ..fsio import OUT_OF_FILES, out_of_files
from ..params import FlowOptions, LoraParams
from ..settings import Settings
from ..web.security import TRAINER_REALM, bearer_realm, is_loopback
from .jobs import (
    DATA_ROOT_HEADER,
    JOB_ID_PATTERN,
    EventPage,
    Health,
    Job,
    JobCheck,
    JobList,
    ProviderHealth,
    Status,
    data_root_id,
)

LABEL_CUDA = "Aktiv (CUDA)"
LABEL_CPU = "Online (CPU)"
LABEL_OFFLINE = "Offline"

_M = TypeVar("_M", bound=BaseModel)


def explicit_url(settings: Settings) -> bool:
    """Whether the user chose the trainer's address (ASSISTANT_LORA_TRAINER_URL or an override)."""
    return "lora_trainer_url" in settings.model_fields_set


def chosen_address(settings: Settings) -> bool:
    """Whether the user chose where the trainer listens: an explicit URL with a port; port 0 is any free one,
    found through this data root's record, which may name another root's trainer (a copied data root, a port
    reused after ours was killed): not an address to refuse over."""
    return explicit_url(settings) and not _any_port(settings.lora_trainer_url)


def base_url(settings: Settings) -> str:
    """The trainer for this data root: the configured URL when one was chosen; else the address the data
    root's trainer recorded when it last started (a port of its own when the default port served another
    data root); else the default. A chosen URL with port 0 ("any free port") also goes by the record."""
    configured = settings.lora_trainer_url
    if not explicit_url(settings) or _any_port(configured):
        recorded = _recorded_url(settings)
        if recorded:
            return recorded
    return configured


def _any_port(url: str) -> bool:
    with contextlib.suppress(ValueError):
        return urlsplit(url).port == 0
    return False


def where(settings: Settings) -> str:
    """Where the trainer is looked for, in a sentence ("The trainer {where} is not reachable"): `at URL`; a
    URL with port 0 and no record is no address (any free port), so name the data root and the record."""
    url = base_url(settings)
    if _any_port(url):
        return (
            f"for {settings.home} (ASSISTANT_LORA_TRAINER_URL {url}: a free port, which a running trainer "
            "records in data/trainer/trainer.url)"
        )
    return f"at {url}"


def _recorded_url(settings: Settings) -> str | None:
    """The recorded address, if it is a loopback http:// URL with a port: a file under the data root never
    sends this client (and its token) to another host."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        recorded = settings.trainer_url_file.read_text(encoding="utf-8").strip()
        url = urlsplit(recorded)
        if url.scheme == "http" and url.hostname and is_loopback(url.hostname) and url.port and not url.path:
            return recorded
    return None


def trainer_address(settings: Settings) -> tuple[str, int]:
    """Host and port of the configured trainer URL: where `lunatrain trainer` listens by default (port 0: a
    free port). Where a running trainer is comes from `base_url`, which follows its record."""
    url = urlsplit(settings.lora_trainer_url)  # its scheme, host and port were checked when the settings loaded
    port = url.port
    assert url.hostname, settings.lora_trainer_url
    if port is None:  # none given: the scheme's (0 stays 0: any free port)
        port = 443 if url.scheme == "https" else 80
    return url.hostname, port


def label(health: Health | None) -> str:
    """The guide's provider label: `Aktiv (CUDA)`, `Online (CPU)` or `Offline` (health None)."""
    if health is None:
        return LABEL_OFFLINE
    return LABEL_CUDA if health.cuda_available else LABEL_CPU


def provider_health(url: str, health: Health | None, problem: str | None = None) -> ProviderHealth:
    """The provider-health document for the trainer at `url`: its `health`, or offline with `problem` (the
    sentence that says why) when it did not answer."""
    if health is None:
        return ProviderHealth(status="offline", reachable=False, label=LABEL_OFFLINE, trainer_url=url, error=problem)
    return ProviderHealth.model_validate(health.wire() | {"reachable": True, "label": label(health), "trainerUrl": url})


_shared: httpx.Client | None = None
_shared_lock = threading.Lock()


def _client() -> httpx.Client:
    """One connection pool per process: building a client (its TLS context) costs tens of milliseconds, and
    the API and `lora` poll the trainer every second. trust_env=False: a proxy from the environment must
    never intercept a loopback trainer. httpx clients are safe to share between threads."""
    global _shared
    with _shared_lock:
        if _shared is None:
            # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive ends on the server
            # side: a request never goes out on a connection the trainer is closing.
            _shared = httpx.Client(trust_env=False, limits=httpx.Limits(keepalive_expiry=2.0))
        return _shared


def _failure(exc: httpx.HTTPError, timeout: float) -> str:
    """How a request failed, in words (httpx's class names, "ConnectError", are no sentence for a user)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return "nothing accepts connections there"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "the connection broke off"
    return "the request failed"


def _out_of_files(exc: BaseException) -> bool:
    """Whether a failed request failed for want of a file descriptor (EMFILE/ENFILE) in this process."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in OUT_OF_FILES:
            return True
        if "too many open files" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _request(settings: Settings, method: str, path: str, *, timeout: float = 10.0, **kwargs: Any) -> httpx.Response:
    trainer_address(settings)  # a malformed URL is a usage error, not "unreachable"
    headers = {DATA_ROOT_HEADER: data_root_id(settings.home)}
    headers |= {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    url = base_url(settings).rstrip("/") + path
    try:
        response = _client().request(method, url, headers=headers, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        if _out_of_files(exc):  # this process could not open a socket: the trainer may well be there
            raise out_of_files(f"a connection to the trainer {where(settings)}") from None
        raise ServiceUnavailable(
            f"The trainer {where(settings)} is not reachable ({_failure(exc, timeout)}); start it with "
            "`lunatrain trainer`.",
            params={"detail": "trainer.unreachable"},
        ) from None
    if response.status_code >= 400:
        raise _error(settings, response)
    return response


def _error(settings: Settings, response: httpx.Response) -> LunaError:
    err: dict[str, Any] = {}
    try:
        body = response.json()
        err = body.get("error") or {}
        message, details = str(err.get("message") or body.get("detail") or ""), err.get("details")
    except (ValueError, AttributeError):
        message, details = response.text[:300], None
    message = message or f"The trainer answered HTTP {response.status_code}."
    # The trainer's code and params pass on (the dashboard says `device.no_cuda` in the reader's language, not
    # the trainer's English sentence); the class, and so the status and exit code, follows the HTTP status.
    coded: dict[str, Any] = {}
    if isinstance(err, dict) and isinstance(err.get("code"), str) and err["code"]:
        coded = {"code": err["code"], "params": err["params"] if isinstance(err.get("params"), dict) else None}
    status = response.status_code
    if status == 404:
        return NotFound(message, **coded)
    if status == 409:
        other = details.get("dataRoot") if isinstance(details, dict) else None
        if isinstance(other, dict):  # the trainer at our address serves another project's data root
            return other_data_root(settings, another_root(str(other.get("path") or "unknown")))
        # e.g. a job too large for its device: a failed check (exit 1), as prepare says it
        if isinstance(err, dict) and err.get("code") == CheckFailed.code:
            return CheckFailed(message, details=details, **coded)
        return Conflict(message, **coded)
    if status == 401:
        realm = bearer_realm(response.headers.get("www-authenticate"))
        if realm == TRAINER_REALM:
            return UsageError(f"{message} Set ASSISTANT_API_TOKEN to the trainer's token.")
        if realm is None:  # a trainer from before the realm, or a service that names none: say both
            return UsageError(
                f"{message} If it is this data root's trainer, set ASSISTANT_API_TOKEN to its token; if not, "
                f"another service holds {base_url(settings)}."
            )
        # Another service wants a token of its own: asking for "the trainer's token" would mislead.
        return Conflict(f"What answers {where(settings)} refused us (401): {FOREIGN}.")
    if status < 500:
        return UsageError(message, details=details, **coded)
    if status == 503 and coded.get("code") == ServiceUnavailable.code:  # it refused knowingly: its own words
        return ServiceUnavailable(message, **coded)
    return ServiceUnavailable(f"The trainer failed to answer ({status}): {message}")


def health(settings: Settings, *, timeout: float = 3.0) -> Health:
    """The health of whatever answers at the trainer's address. An answer that is no trainer's health (a
    404 page, JSON of another shape) is a Health that names no data root: no data root's trainer answered."""
    try:
        return Health.model_validate(_request(settings, "GET", "/health", timeout=timeout).json())
    except (NotFound, Conflict, ValueError):
        return Health(status="unknown")


def own_health(settings: Settings, *, timeout: float = 3.0) -> Health:
    """The health of this data root's trainer: ServiceUnavailable when nothing answers, and the
    other-data-root Conflict when another project's trainer (or another service) holds the address."""
    answer = health(settings, timeout=timeout)
    if not serves_this_root(settings, answer):
        raise other_data_root(settings, holder(answer))
    return answer


def probe(settings: Settings, *, timeout: float = 3.0) -> Health | None:
    """Health, or None when the trainer cannot be reached."""
    try:
        return health(settings, timeout=timeout)
    except ServiceUnavailable:
        return None


def serves_this_root(settings: Settings, health: Health) -> bool:
    """Whether the trainer that answered serves this data root (an older trainer that does not say: no)."""
    return health.data_root is not None and health.data_root.id == data_root_id(settings.home)


FOREIGN = "a service that is not a lunatrain trainer (or a trainer too old to name its data root)"


def holder(health: Health) -> str:
    """Words naming what answered at our address when it is not this data root's trainer."""
    return another_root(health.data_root.path) if health.data_root else FOREIGN


def another_root(path: str) -> str:
    return f"the trainer of another data root ({path})"


class OtherDataRoot(Conflict):
    """The trainer's address is held by another project's trainer or another service (`holder` names it)."""

    def __init__(self, message: str, holder: str, params: dict[str, object] | None = None) -> None:
        super().__init__(message, params=params)
        self.holder = holder


def other_data_root(settings: Settings, holder: str) -> OtherDataRoot:
    """The one sentence for "our address is held by another project's trainer" (or by another service:
    `holder` names it), naming both roots and the way out: with a chosen address, point it elsewhere; else
    this root's own trainer is not running, and the next job (or `lunatrain trainer --port 0`) starts it on a
    free port. Refusing to act there is a conflict; for reads see `held_by_another`."""
    if _chosen(settings):
        fix = _point_elsewhere(settings)
    elif not settings.lora_ensure_on_demand:  # then no job starts it (ensure.py): only the user can
        fix = "this data root's trainer is not running: start it with `lunatrain trainer --port 0`"
    else:
        fix = "this data root's trainer is not running: the next job starts it, or `lunatrain trainer --port 0`"
    url = base_url(settings)
    message = (
        f"The trainer address {url} is held by {holder}, not by this data root's trainer ({settings.home}); {fix}."
    )
    return OtherDataRoot(message, holder, held_detail(settings))


def held_by_another(settings: Settings, holder: str) -> ServiceUnavailable:
    """What a read of jobs says when `holder` answers at our address instead of this data root's trainer:
    that trainer is not running, so there is nothing to read (503, not a conflict), and how to start it."""
    if _chosen(settings):
        fix = _point_elsewhere(settings)
    else:
        fix = "start this data root's trainer on another port with `lunatrain trainer --port 0`"
        if settings.lora_ensure_on_demand:  # with on-demand ensure off no job starts it (ensure.py)
            fix += " (the next job starts it there too)"
    return ServiceUnavailable(
        f"The trainer address {base_url(settings)} is held by {holder}, and this data root's trainer "
        f"({settings.home}) is not running; {fix}.",
        params=held_detail(settings),
    )


def held_detail(settings: Settings) -> dict[str, object]:
    """The case of "our address is held by something else", for a reader in another language: an address the
    user chose (point it elsewhere), or the default one with on-demand starts off or on."""
    if _chosen(settings):
        case = "trainer.address_held_chosen"
    else:
        case = "trainer.address_held" if settings.lora_ensure_on_demand else "trainer.address_held_off"
    return {"detail": case, "url": base_url(settings)}


def _chosen(settings: Settings) -> bool:
    """Whether the user chose where the trainer is: a URL with a port (port 0 is any free one, found through
    this root's record: a copied root's record names the original's trainer, no setting of theirs) or a
    start command."""
    return chosen_address(settings) or bool(settings.lora_trainer_start_cmd)


def _point_elsewhere(settings: Settings) -> str:
    return (
        f"point ASSISTANT_LORA_TRAINER_URL at a trainer started with ASSISTANT_HOME={settings.home}, "
        "or unset it to let lunatrain start one on a free port"
    )


def _read(settings: Settings, path: str, model: type[_M], **kwargs: Any) -> _M:
    """GET of job data: when this data root's trainer does not answer it, there is nothing to read
    (ServiceUnavailable naming who holds the address)."""
    return _call(settings, "GET", path, model, **kwargs)


def _call(settings: Settings, method: str, path: str, model: type[_M], **kwargs: Any) -> _M:
    """A job request, its answer validated as `model`. An answer that is not our trainer's (another
    project's trainer refusing us, a 404 page, JSON of another shape) is checked against the health of
    whoever holds the address: when that is not this data root's trainer, a read is ServiceUnavailable and
    a change the other-data-root Conflict, both naming it. A 401 of our trainer's realm (a trainer that wants
    another token) stands: no health can be read without that token."""
    refusal = held_by_another if method == "GET" else other_data_root
    try:
        return model.model_validate(_request(settings, method, path, **kwargs).json())
    except OtherDataRoot as err:
        raise refusal(settings, err.holder) from None
    except (NotFound, Conflict, UsageError, ValueError) as err:
        try:
            answer = health(settings)
        except UsageError:
            raise err from None
        if serves_this_root(settings, answer):
            raise
        raise refusal(settings, holder(answer)) from None


SUBMIT_TIMEOUT_S = 30.0


def submit(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions | None = None,
    request_id: str | None = None,
    gate_thresholds: dict[str, Any] | None = None,
) -> Job:
    """Queue a job; `gate_thresholds` (a profile's [gate]) go with it to the eval gate after the run.
    `params.base_model` must be resolved by the caller (the trainer never fills it in)."""
    body = _job_body(params, options, request_id, gate_thresholds)
    # Longer than a read's: a trainer that has just started (its warm worker importing torch beside it) on a
    # busy machine may take seconds to answer, and "not reachable" would be wrong about a trainer that runs.
    return _call(settings, "POST", "/jobs", Job, json=body, timeout=SUBMIT_TIMEOUT_S)


def check(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions | None = None,
    request_id: str | None = None,
    gate_thresholds: dict[str, Any] | None = None,
) -> Job | None:
    """Raise what `submit` would be refused with (bad parameters, a requestId used for others), creating
    nothing; return the job the requestId already names (an idempotent retry), else None."""
    body = _job_body(params, options, request_id, gate_thresholds)
    return _call(settings, "POST", "/jobs/check", JobCheck, json=body, timeout=SUBMIT_TIMEOUT_S).job  # as submit


def _job_body(
    params: LoraParams, options: FlowOptions | None, request_id: str | None, gate_thresholds: dict[str, Any] | None
) -> dict[str, Any]:
    body = params.wire() | {"options": (options or FlowOptions()).wire()}
    body |= {"requestId": request_id} if request_id else {}
    if gate_thresholds:
        from ..evalgate import parse_thresholds

        body["gateThresholds"] = parse_thresholds(gate_thresholds).model_dump(by_alias=True)
    return body


def get_job(settings: Settings, job_id: str) -> Job:
    """The job as it reads now (`recovery.as_read_now`: a resume hint whose checkpoint is gone goes)."""
    from .recovery import as_read_now

    return as_read_now(settings, _read(settings, f"/jobs/{_segment(job_id)}", Job))


def list_jobs(settings: Settings, *, limit: int = 20, status: str | None = None) -> list[Job]:
    return job_page(settings, limit=limit, status=status).data


def job_page(settings: Settings, *, limit: int = 20, offset: int = 0, status: str | None = None) -> JobList:
    """Newest first, `offset` jobs skipped; `has_more` when another page follows."""
    if status and status not in get_args(Status):  # a typo is the caller's, whether or not the trainer runs
        raise UsageError(f"Unknown job status {status!r}: use one of {', '.join(get_args(Status))}.")
    query: dict[str, Any] = {"limit": limit, "offset": offset} | ({"status": status} if status else {})
    page = _read(settings, "/jobs", JobList, params=query)
    if offset and "has_more" not in page.model_fields_set:
        # A trainer from before paging (finishing its queue after an update) ignores `offset`: its answer is
        # the newest jobs again, not the page asked for.
        raise ServiceUnavailable(
            "The trainer runs lunatrain from before an update and cannot page its job list; it restarts by "
            "itself once its queue is done, or stop it and start `lunatrain trainer` again."
        )
    from .recovery import as_read_now

    return page.model_copy(update={"data": [as_read_now(settings, job) for job in page.data]})


def events(settings: Settings, job_id: str, *, after: int = 0, limit: int = 100) -> EventPage:
    query = {"after": after, "limit": limit}
    return _read(settings, f"/jobs/{_segment(job_id)}/events", EventPage, params=query)


def cancel(settings: Settings, job_id: str) -> Job:
    return _call(settings, "POST", f"/jobs/{_segment(job_id)}/cancel", Job)


def _segment(job_id: str) -> str:
    # Job ids are opaque tokens; refuse anything that would change the URL's path instead of naming a job.
    return check_job_id(job_id)


def check_job_id(job_id: str) -> str:
    """`job_id`, or UsageError: the trainer's own rule, checked here (an id it refuses would come back naming
    its path parameter, `job_id`)."""
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        rule = PATTERN_RULES[JOB_ID_PATTERN].removeprefix("should be a job id: ")
        raise UsageError(f"Invalid job id {job_id!r}: {rule}; `lunatrain jobs list` lists the jobs.")
    return job_id
