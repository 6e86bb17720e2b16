"""The serving engine (serving.py) on luna-tiny with random-weight adapters: model names resolve through the
registry (the active version read fresh), adapters load on demand under an LRU bound and are never evicted
while in use, concurrent requests on different adapters get exactly the answers they get alone, stop ids
and stop strings end answers.

Run: `.venv/bin/python -m pytest tests/test_serving.py -q` (seconds).
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from chat_helpers import random_adapter

from lunatrain import registry, serving
from lunatrain.errors import Conflict, NotFound, StorageError
from lunatrain.settings import load_settings

GREEDY = serving.Sampling(max_tokens=12, temperature=0)
HELLO = [{"role": "user", "content": "Wie heißt mein Hund?"}]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory):
    s = load_settings(home=tmp_path_factory.mktemp("serving-home"))
    for seed in (1, 2, 3):
        random_adapter(s, "luna-adapter", seed)  # v1, v2, v3
    random_adapter(s, "other", 4)
    registry.activate(s, "luna-adapter", "v1")
    return s


def answer(engine: serving.Engine, model: str, sampling: serving.Sampling = GREEDY) -> tuple[str, list[int]]:
    gen = engine.start(engine.resolve(model), HELLO, sampling)
    text = gen.run()
    return text, gen.new_ids


def test_names_resolve_to_the_base_the_active_version_or_a_named_version(settings) -> None:
    engine = serving.Engine(settings)
    assert engine.resolve("luna-tiny").adapter is None
    assert engine.resolve("luna-adapter").model == "luna-adapter@v1"
    registry.activate(settings, "luna-adapter", "v2")
    try:
        assert engine.resolve("luna-adapter").model == "luna-adapter@v2"  # read fresh, no cache in between
    finally:
        registry.activate(settings, "luna-adapter", "v1")
    assert engine.resolve("luna-adapter@v3").path == settings.adapters_dir / "luna-adapter" / "v3"
    ids = [m["id"] for m in engine.models()]
    assert ids[:2] == ["luna-tiny", "luna-adapter"] and "other" not in ids  # `other` has no active version
    assert {"luna-adapter@v1", "luna-adapter@v2", "luna-adapter@v3", "other@v1"} <= set(ids)
    for bad in (
        "../../etc/passwd",
        "/etc/passwd",
        "luna-adapter@../v1",
        "luna-adapter@v9",
        "nobody",
        "org/model",
        "luna-adapter@",
        "luna-tiny@v1",
        "other",  # no active version
        # aliases are not model ids: GET /v1/models/{id} says 404 for them, and @latest reached a version
        # the eval gate had refused
        "luna-adapter@latest",
        "luna-adapter@active",
        "other@latest",
    ):
        for ask in (engine.resolve, engine.served_model):  # chat and GET /v1/models/{id} agree on every name
            with pytest.raises(NotFound) as info:
                ask(bad)
            assert info.value.details["code"] == "model_not_found", bad


def test_an_adapter_of_another_base_is_refused(settings) -> None:
    engine = serving.Engine(settings)
    data = registry.load(settings)
    entry = dict(data["adapters"]["other"]["versions"][0], version="v2", path="data/adapters/other/v2")
    entry["baseModel"] = {"id": "org/else", "fingerprint": "0" * 64}
    data["adapters"]["other"]["versions"].append(entry)
    registry.registry_path(settings).write_text(json.dumps(data))
    try:
        with pytest.raises(Conflict) as foreign:
            engine.resolve("other@v2")
        # Repro: "Other@v2 was trained …": the name capitalized into one that does not exist, and no fix named.
        assert foreign.value.message == (
            f"other@v2 was trained on base model 'org/else', but this server runs {engine.base_info().id!r}; its "
            "LoRA weights do not fit: serve it with ASSISTANT_BASE_MODEL='org/else', or ask for a version trained "
            "on this base (GET /v1/models lists them)."
        )
        assert "other@v2" not in [m["id"] for m in engine.models()]
        # Repro: the same base id with other weights (updated in place) was "trained on base model 'X', but this
        # server runs 'X'; its LoRA weights do not fit"; and a name without an active version said "@v1" for an
        # adapter whose versions start elsewhere.
        entry["baseModel"] = {"id": engine.base_info().id, "fingerprint": "0" * 64}
        registry.registry_path(settings).write_text(json.dumps(data))
        with pytest.raises(Conflict) as changed:
            engine.resolve("other@v2")
        assert changed.value.message == (
            f"Base model {engine.base_info().id!r} has changed since other@v2 was trained on it (fingerprints "
            "differ); retrain it on this base."
        )
        with pytest.raises(NotFound, match=r"has no active version on .*; activate one, or name a version GET "):
            engine.resolve("other")
        # Explore repro: the configured base now has those other weights (a newer hub snapshot, a model copied
        # over) and other@v2 was trained on them: a server started before still runs the build it loaded, and
        # "retrain it on this base" is wrong advice. It says to restart.
        from dataclasses import replace

        from lunatrain import models

        now = replace(engine.base_info(), fingerprint="0" * 64)
        real = models.resolve_base
        models.resolve_base = lambda ref, settings: now if ref is None else real(ref, settings)
        try:
            with pytest.raises(Conflict) as stale:
                engine.resolve("other@v2")
        finally:
            models.resolve_base = real
        assert stale.value.message == (
            f"This server still runs the build of base model {now.id!r} it loaded when it started, and other@v2 "
            "was trained on the one there now; restart `lunatrain serve` to serve it."
        ), stale.value.message
    finally:
        data["adapters"]["other"]["versions"].pop()
        registry.registry_path(settings).write_text(json.dumps(data))


def test_adapters_change_the_answer_and_the_lru_keeps_at_most_the_bound(settings) -> None:
    engine = serving.Engine(settings, max_adapters=2)
    base, _ = answer(engine, "luna-tiny")
    answers = {ref: answer(engine, ref)[1] for ref in ("luna-adapter@v1", "luna-adapter@v2", "luna-adapter@v3")}
    assert len({tuple(v) for v in answers.values()}) == 3, "each adapter answers differently"
    assert len(engine.loaded()) == 2 and engine.loads == 3
    assert answer(engine, "luna-tiny")[0] == base  # adapters switched off for the base model
    # v1 was evicted: asking again loads it again and gives the same answer as before
    assert answer(engine, "luna-adapter@v1")[1] == answers["luna-adapter@v1"] and engine.loads == 4


def test_an_adapter_in_use_is_not_evicted_under_its_request(settings) -> None:
    engine = serving.Engine(settings, max_adapters=1)
    alone = answer(engine, "luna-adapter@v1")[1]
    gen = engine.start(engine.resolve("luna-adapter@v1"), HELLO, GREEDY)
    gen.step()
    other = engine.start(engine.resolve("luna-adapter@v2"), HELLO, GREEDY)
    assert len(engine.loaded()) == 2  # over the bound while both are in use
    other.run()
    assert [Path(p).name for p in engine.loaded()] == ["v1"]  # the idle one went, not the one in use
    gen.run()
    assert gen.new_ids == alone


def test_concurrent_requests_on_different_adapters_get_their_own_answers(settings) -> None:
    engine = serving.Engine(settings, max_adapters=4)
    refs = ["luna-tiny", "luna-adapter@v1", "luna-adapter@v2", "luna-adapter@v3"]
    alone = {ref: answer(engine, ref)[1] for ref in refs}
    together: dict[str, list[int]] = {}
    start = threading.Barrier(len(refs) * 2)

    def run(ref: str, key: str) -> None:
        gen = engine.start(engine.resolve(ref), HELLO, GREEDY)
        start.wait(timeout=60)
        gen.run()
        together[key] = gen.new_ids

    threads = [threading.Thread(target=run, args=(ref, f"{ref}#{i}")) for ref in refs for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {k: v for k, v in together.items()} == {f"{r}#{i}": alone[r] for r in refs for i in range(2)}


def test_stop_ids_are_the_union_of_generation_configs_and_the_tokenizer(settings, tmp_path: Path) -> None:
    from lunatrain import models

    tok = models.load_tokenizer(None, settings)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "generation_config.json").write_text("{not json")
    base_dir = Path(models.resolve_base(None, settings).path)
    ids = serving.stop_ids(tok, tmp_path / "a", tmp_path / "b", base_dir, None)
    assert ids == sorted({5, 7, tok.eos_token_id, tok.convert_tokens_to_ids(models.IM_END)})


def test_stop_strings_cut_the_answer_and_seeds_repeat(settings) -> None:
    engine = serving.Engine(settings)
    sampled = serving.Sampling(max_tokens=16, temperature=1.0, seed=11)
    full, _ = answer(engine, "luna-adapter@v2", sampled)
    assert answer(engine, "luna-adapter@v2", sampled)[0] == full
    assert len(full) > 4
    stop = full[2:4]
    cut = engine.start(
        engine.resolve("luna-adapter@v2"),
        HELLO,
        serving.Sampling(max_tokens=16, temperature=1.0, seed=11, stop=(stop,)),
    )
    pieces = []
    while (piece := cut.step()) is not None:
        pieces.append(piece)
    assert "".join(pieces) == cut.text == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


def test_slots_refuse_beyond_the_limit() -> None:
    slots = serving.Slots(2)
    slots.acquire()
    slots.acquire()
    with pytest.raises(serving.TooBusy):
        slots.acquire()
    slots.release()
    slots.acquire()
    assert slots.busy == 2


@pytest.mark.parametrize(("temperature", "top_p"), [(5e-324, 1.0), (1e-3, 1.0), (2.0, 5e-324), (1.0, 1e-9), (1.0, 1.0)])
def test_sampling_at_the_edges_of_its_bounds_picks_a_token(temperature: float, top_p: float) -> None:
    import torch

    logits = torch.tensor([80.0, -30.0, 79.0, 0.0])
    pick = serving._pick(
        logits, serving.Sampling(max_tokens=1, temperature=temperature, top_p=top_p), torch.Generator().manual_seed(0)
    )
    assert pick in (0, 2) if top_p == 1.0 and temperature > 0.5 else pick == 0


@pytest.mark.parametrize(("top_p", "kept"), [(0.6, 6), (0.3, 3), (0.65, 7), (0.1, 1)])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_it_also_on_the_boundary(top_p: float, kept: int) -> None:
    """Sampling explore repro: with ten tokens of 0.1 each and top_p 0.6, seven were sampled: six of 0.1 summed
    in float32 stay just under 0.6, so the cut missed the set that reaches it exactly."""
    import torch

    sampling = serving.Sampling(max_tokens=1, temperature=1.0, top_p=top_p)
    picked = {serving._pick(torch.zeros(10), sampling, torch.Generator().manual_seed(seed)) for seed in range(400)}
    assert len(picked) == kept, (top_p, sorted(picked))  # which of equal tokens is the sort's to choose


@pytest.mark.parametrize("first", [True, False], ids=["first-load", "later-load"])
def test_an_adapter_that_fails_to_load_leaves_nothing_half_loaded(settings, first: bool) -> None:
    version = random_adapter(settings, "broken", 5)
    weights = settings.adapters_dir / "broken" / version / "adapter_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    engine = serving.Engine(settings)
    base, _ = answer(engine, "luna-tiny")
    v1 = answer(serving.Engine(settings), "luna-adapter@v1")[1]
    if not first:
        answer(engine, "luna-adapter@v1")
    with pytest.raises(StorageError, match="could not be loaded"):  # the files are damaged, not the request
        engine.start(engine.resolve(f"broken@{version}"), HELLO, GREEDY)
    assert all("broken" not in p for p in engine.loaded())
    assert answer(engine, "luna-tiny")[0] == base
    assert answer(engine, "luna-adapter@v1")[1] == v1


def test_weights_of_another_shape_are_one_sentence_naming_the_misfit(settings) -> None:
    """Repro: an adapter of another base model activated with --force (a Qwen-shaped one on luna-tiny) answered
    400 with torch's whole state_dict error, one line per LoRA tensor (about 4 kB on a 2-layer model)."""
    from safetensors.torch import load_file, save_file

    version = random_adapter(settings, "misfit", 11)
    weights = settings.adapters_dir / "misfit" / version / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: t.new_zeros(t.shape[0], t.shape[1] + 8) if t.ndim == 2 else t for k, t in tensors.items()}, weights)
    engine = serving.Engine(settings)
    with pytest.raises(Conflict, match="could not be loaded") as info:
        engine.start(engine.resolve(f"misfit@{version}"), HELLO, GREEDY)
    message = info.value.message
    assert "\n" not in message and len(message) < 600, message
    assert "its LoRA weights do not fit this base model" in message and "tensors differ in shape" in message
    assert answer(engine, "luna-tiny")[1]  # and the engine still answers


def test_a_first_adapter_load_that_fails_part_way_leaves_a_running_base_answer_on_the_base(settings) -> None:
    """Serving repro: weights of which one tensor does not fit (the rest do) failed the first adapter load of
    a process with the documented model_base_mismatch, but PEFT had already put the fitting LoRA weights into
    the base model's layers and switched them on: a base-model answer running meanwhile went on with them
    (its text changed from then on). The message named PEFT's internal adapter name, another each time."""
    from safetensors.torch import load_file, save_file

    version = random_adapter(settings, "partly", 12)
    weights = settings.adapters_dir / "partly" / version / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first_b = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first_b] = tensors[first_b].new_zeros(tensors[first_b].shape[0] + 3, tensors[first_b].shape[1])
    save_file(tensors, weights)
    sampling = serving.Sampling(max_tokens=24, temperature=1.3, seed=5)
    whole = answer(serving.Engine(settings), "luna-tiny", sampling)[1]
    engine = serving.Engine(settings)
    running = engine.start(engine.resolve("luna-tiny"), HELLO, sampling)
    for _ in range(4):
        running.step()
    messages = []
    for _ in range(2):
        with pytest.raises(Conflict, match="do not fit") as info:
            engine.start(engine.resolve(f"partly@{version}"), HELLO, GREEDY)
        messages.append(info.value.message)
    running.run()
    assert running.new_ids == whole  # the answer stayed the base model's to its end
    assert messages[0] == messages[1] and ".lora_B.weight" in messages[0], messages  # no "lora_B.adapter2."
    assert answer(engine, "luna-tiny", sampling)[1] == whole


def test_messages_the_chat_template_refuses_are_a_usage_error(settings) -> None:
    from lunatrain.errors import UsageError

    engine = serving.Engine(settings)
    answer(engine, "luna-tiny")  # loads the base and its tokenizer
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + template
    )
    try:
        with pytest.raises(UsageError, match="System role not supported") as info:
            engine.start(engine.resolve("luna-tiny"), [{"role": "system", "content": "x"}, *HELLO], GREEDY)
        assert info.value.details["param"] == "messages"
        assert answer(engine, "luna-tiny")[1]  # and the engine still answers
    finally:
        engine.tokenizer.chat_template = template


def test_an_answer_dropped_unfinished_gives_back_its_slot_and_adapter(settings) -> None:
    import gc

    engine = serving.Engine(settings, max_adapters=1)
    slots = serving.Slots(1)
    slots.acquire()
    gen = engine.start(engine.resolve("luna-adapter@v1"), HELLO, GREEDY)
    gen.on_close = slots.release
    answer(engine, "luna-adapter@v2")
    assert [Path(p).name for p in engine.loaded()] == ["v1"]  # pinned by the unfinished answer: v2 went
    del gen  # e.g. a stream whose client left before its first event: no finally ever ran
    gc.collect()
    assert slots.busy == 0
    answer(engine, "luna-adapter@v3")
    assert [Path(p).name for p in engine.loaded()] == ["v3"]  # v1 unpinned, so the LRU bound holds again


def test_an_answer_the_collector_frees_during_a_model_build_does_not_lock_out_chat(settings) -> None:
    """Review repro: an eval gate in `serve` building its model (holding the building turn) ran the garbage
    collector, which freed a dropped answer in a reference cycle; that answer's release waited for the engine's
    lock, held by a chat request waiting for the building turn: both, and every later chat, hung for good."""
    import gc
    import time

    from lunatrain import compat

    engine = serving.Engine(settings, max_adapters=1)
    gen = engine.start(engine.resolve("luna-adapter@v1"), HELLO, GREEDY)
    cycle: list = [gen]
    cycle.append(cycle)  # left in a reference cycle (a traceback, a stream's frame): only the collector frees it
    del gen, cycle
    entered, done = threading.Event(), []
    gc.disable()
    try:

        def gate() -> None:
            with compat.building_model():
                entered.set()
                # the chat below meanwhile holds the engine's lock, waiting for its turn to build; on a slower
                # machine it may get there later, and the test then meets the race less often, never fails it
                time.sleep(1.0)
                gc.collect()
            done.append("gate")

        def chat() -> None:
            entered.wait()
            engine.start(engine.resolve("luna-adapter@v2"), HELLO, GREEDY).close()
            done.append("chat")

        threads = [threading.Thread(target=gate, daemon=True), threading.Thread(target=chat, daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        gc.enable()
    assert sorted(done) == ["chat", "gate"], "the gate's build and the chat waited for each other"
    answer(engine, "luna-adapter@v3")
    assert [Path(p).name for p in engine.loaded()] == ["v3"]  # the freed answer's v1 was unpinned meanwhile


def test_a_chat_waiting_to_load_an_adapter_behind_a_build_holds_up_no_other_chat(settings) -> None:
    """Review repro: a chat request for an adapter not yet loaded waited for an eval gate's model build while
    holding the engine's lock, so every other chat (the loaded base's too) waited for the whole build."""
    import time

    from lunatrain import compat

    engine = serving.Engine(settings, max_adapters=1)
    answer(engine, "luna-tiny")  # the base is loaded
    building, release, done = threading.Event(), threading.Event(), []

    def gate() -> None:
        with compat.building_model():
            building.set()
            release.wait(60)

    def adapter_chat() -> None:
        engine.start(engine.resolve("luna-adapter@v2"), HELLO, GREEDY).close()
        done.append("adapter")

    def base_chat() -> None:
        answer(engine, "luna-tiny")
        done.append("base")

    threads = [threading.Thread(target=gate, daemon=True)]
    threads[0].start()
    building.wait(30)
    threads.append(threading.Thread(target=adapter_chat, daemon=True))
    threads[1].start()
    # the adapter's chat waits for the building turn by now; if a slow machine has it there later, the base's
    # chat below still answers first, so the test passes either way (it only meets the race less often)
    time.sleep(0.5)
    base = threading.Thread(target=base_chat, daemon=True)
    base.start()
    base.join(30)
    assert done == ["base"], "the base's chat waited for another request's adapter load"
    release.set()
    for t in threads:
        t.join(60)
    assert done == ["base", "adapter"]


@pytest.mark.parametrize("gone", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_version_whose_files_are_gone_is_model_not_found_naming_the_file(settings, gone: str) -> None:
    """Weights deleted by hand passed the check (it looked at the config only) and failed later, at load."""
    seed = 6 if gone == "adapter_model.safetensors" else 7  # its own job id: publishing is idempotent per job
    name = f"gone-{seed}"
    version = random_adapter(settings, name, seed)
    registry.activate(settings, name, version)
    engine = serving.Engine(settings)
    assert {name, f"{name}@{version}"} <= {m["id"] for m in engine.models()}
    (settings.adapters_dir / name / version / gone).unlink()
    with pytest.raises(
        NotFound, match=f"The files of {name}@{version} are missing under data/adapters \\({gone}\\)"
    ) as info:
        engine.resolve(f"{name}@{version}")
    assert info.value.details["code"] == "model_not_found"
    # Try-panel repro: a page that still lists it said "no such model is served here" and then the English
    # sentence; which files are gone goes along, for the page to say it in its language.
    assert info.value.code == "model_not_found" and info.value.params == {"missing": [gone]}
    # Repro: /v1/models still listed it (name and version), each a 404 when asked for; it lists what it serves.
    assert not {name, f"{name}@{version}"} & {m["id"] for m in engine.models()}
    assert "luna-adapter@v1" in {m["id"] for m in engine.models()}  # the others stay listed


def test_a_version_of_another_base_activated_with_force_is_served(settings) -> None:
    """`adapters activate --force` is the owner saying the weights fit this base (the same base re-downloaded,
    say). The registry then shows the version active here, and serving refused it all the same
    (model_base_mismatch) and left it out of /v1/models. It serves what the registry says is active."""
    engine = serving.Engine(settings)
    data = registry.load(settings)
    saved = json.dumps(data)
    entry = dict(data["adapters"]["other"]["versions"][0], version="v2", jobId="elsewhere")
    entry["baseModel"] = {"id": "org/else", "fingerprint": "0" * 64}  # its weights are other@v1's: they fit
    data["adapters"]["other"]["versions"].append(entry)
    registry.registry_path(settings).write_text(json.dumps(data))
    try:
        with pytest.raises(Conflict, match="trained on base model 'org/else'"):
            engine.resolve("other@v2")
        registry.activate(settings, "other", "v2", force=True)
        assert engine.resolve("other").model == engine.resolve("other@v2").model == "other@v2"
        ids = [m["id"] for m in engine.models()]
        assert "other" in ids and "other@v2" in ids
        assert answer(engine, "other@v2")[1] == answer(engine, "other@v1")[1]  # the same weights
        registry.deactivate(settings, "other")
        with pytest.raises(Conflict, match="trained on base model 'org/else'"):
            engine.resolve("other@v2")
        assert "other@v2" not in [m["id"] for m in engine.models()]
    finally:
        registry.registry_path(settings).write_text(saved)


def test_an_adapter_named_like_the_base_is_listed_by_its_versions_only(settings) -> None:
    """Registered before training refused such names: /v1/models listed "luna-tiny" twice, once for the base
    and once for the adapter, and a request for it always reached the base. Its versions stay reachable."""
    engine = serving.Engine(settings)
    saved = registry.registry_path(settings).read_text()
    try:
        version = random_adapter(settings, "luna-tiny", 8)
        registry.activate(settings, "luna-tiny", version)
        ids = [m["id"] for m in engine.models()]
        assert ids.count("luna-tiny") == 1 and f"luna-tiny@{version}" in ids
        assert engine.resolve("luna-tiny").adapter is None  # the base
        assert engine.resolve(f"luna-tiny@{version}").adapter == "luna-tiny"
    finally:
        registry.registry_path(settings).write_text(saved)


def test_presence_and_frequency_penalties_lower_only_the_tokens_already_generated() -> None:
    """OpenAI's definitions, over the tokens this answer generated so far: each such token's logit minus
    presence_penalty once and frequency_penalty per time it was generated."""
    import torch

    logits = torch.tensor([3.0, 2.5, 0.0])
    greedy = serving.Sampling(max_tokens=1, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert serving._pick(logits, greedy, g, [0, 0]) == 0
    assert serving._pick(logits, replace(greedy, presence_penalty=1.0), g, [0]) == 1  # 3 - 1 < 2.5
    assert serving._pick(logits, replace(greedy, presence_penalty=1.0), g, [2]) == 0  # another token's use
    assert serving._pick(logits, replace(greedy, frequency_penalty=0.3), g, [0]) == 0  # 3 - 0.3 > 2.5
    assert serving._pick(logits, replace(greedy, frequency_penalty=0.3), g, [0, 0]) == 1  # 3 - 0.6 < 2.5
    assert serving._pick(torch.tensor([2.5, 3.0]), replace(greedy, presence_penalty=-1.0), g, [0]) == 0
    assert logits.tolist() == [3.0, 2.5, 0.0]  # the caller's logits are left as they were


def test_models_list_the_base_then_every_active_name_then_the_versions(tmp_path: Path) -> None:
    """As docs/api.md says (a model picker shows the names to use first); they came interleaved per adapter."""
    own = load_settings(home=tmp_path)
    for name, seed in (("b-adapter", 1), ("b-adapter", 2), ("a-adapter", 3), ("c-unused", 4)):
        random_adapter(own, name, seed)
    registry.activate(own, "a-adapter", "v1")
    registry.activate(own, "b-adapter", "v2")
    ids = [m["id"] for m in serving.Engine(own).models()]
    assert ids == ["luna-tiny", "a-adapter", "b-adapter", "a-adapter@v1", "b-adapter@v1", "b-adapter@v2", "c-unused@v1"]


def test_a_version_folder_holding_other_weights_is_loaded_again(tmp_path: Path) -> None:
    """Explore repro: the engine kept an adapter by its folder alone. Once that folder held other weights (the
    newest version's folder deleted, the registry repaired, the next run numbered the same; or files copied
    over by hand), a running server went on answering with the old ones, under an unchanged
    system_fingerprint, until it restarted."""
    import shutil

    from lunatrain.api.routes.chat import _fingerprint

    s = load_settings(home=tmp_path / "home")
    first, second = (s.adapters_dir / "luna-adapter" / random_adapter(s, "luna-adapter", seed) for seed in (1, 2))
    engine = serving.Engine(s)
    before = answer(engine, "luna-adapter@v1")[1]
    other = answer(engine, "luna-adapter@v2")[1]
    assert before != other
    said = _fingerprint(engine.resolve("luna-adapter@v1"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # v2's files copied over v1's
        shutil.copy2(second / name, first / name)
    assert answer(engine, "luna-adapter@v1")[1] == other
    assert _fingerprint(engine.resolve("luna-adapter@v1")) != said


def test_an_answer_never_holds_a_nul_character_the_chat_route_would_refuse_back(settings, monkeypatch) -> None:
    """Chat repro: luna-tiny answered "\\u0000 fair" (1 in 60 sampled answers); a client sending the model's own
    answer back as history got a 400 (the chat route refuses NUL, as stored examples do). A generated NUL is
    dropped, from the whole answer and from the stream's pieces alike."""
    engine = serving.Engine(settings)
    tokenizer = engine.start(engine.resolve("luna-tiny"), HELLO, GREEDY).tokenizer
    nul = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\x00")
    ok = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "a")
    script = iter([nul, ok, nul, nul, ok, nul] + [ok] * 20)
    monkeypatch.setattr(serving, "_pick", lambda *args: next(script))
    whole = engine.start(engine.resolve("luna-tiny"), HELLO, replace(GREEDY, max_tokens=6)).run()
    assert whole == "aa", repr(whole)
    script = iter([nul, ok, nul, nul, ok, nul] + [ok] * 20)
    streamed = engine.start(engine.resolve("luna-tiny"), HELLO, replace(GREEDY, max_tokens=6))
    pieces = []
    while (piece := streamed.step()) is not None:
        pieces.append(piece)
    assert "".join(pieces) == streamed.text == "aa", pieces
