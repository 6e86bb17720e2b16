"""Export: byte-identical files, stable hash splits, conversations kept together, tiers, atomicity.

Run: `.venv/bin/python -m pytest tests/test_export.py -q` (PostgreSQL cases need ASSISTANT_TEST_PG_URL).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_store import db  # noqa: F401  (the SQLite/PostgreSQL backend fixture)
from typer.testing import CliRunner

from lunatrain import export as ex
from lunatrain import store
from lunatrain.cli import app
from lunatrain.errors import CheckFailed, NotFound, UsageError
from lunatrain.formats import invisible, make_draft, read_file
from lunatrain.settings import Settings, load_settings

RECORD_KEYS = {"messages", "id", "hash", "source", "split", "conversation_id", "tags", "rating"}


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    store.dispose_stores()


def _drafts(n: int, prefix: str, *, conversations: int = 0, rng: random.Random | None = None) -> list:
    rng = rng or random.Random(0)
    out = []
    for i in range(n):
        conv = f"{prefix}-conv-{rng.randrange(conversations)}" if conversations and rng.random() < 0.5 else None
        out.append(
            make_draft(prompt=f"{prefix} Frage {i} {rng.random()}", response=f"Antwort {i}", conversation_id=conv)
        )
    return out


def _files(settings: Settings) -> dict[str, bytes]:
    # The guide's names (links into current/); `current` itself is a directory link and is skipped.
    return {
        p.name: p.read_bytes()
        for p in sorted(settings.training_dir.iterdir())
        if not p.name.startswith(".") and p.is_file()
    }


def _records(settings: Settings, name: str) -> list[dict]:
    lines = (settings.training_dir / name).read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line]


def _splits(settings: Settings) -> dict[str, str]:
    return {r["hash"]: r["split"] for r in _records(settings, ex.MERGED_FILE)}


def test_same_database_exports_byte_identical_files(db: Settings) -> None:
    store.load_seed(db)
    first = ex.export(db, val_ratio=0.2, test_ratio=0.1)
    files1 = _files(db)
    second = ex.export(db, val_ratio=0.2, test_ratio=0.1)
    files2 = _files(db)
    data = [n for n in files1 if n != ex.SUMMARY_FILE]
    assert sorted(files1) == sorted([*ex.DATA_FILES, ex.SUMMARY_FILE])
    assert {n: files1[n] for n in data} == {n: files2[n] for n in data}
    assert first.fingerprint == second.fingerprint
    s1, s2 = json.loads(files1[ex.SUMMARY_FILE]), json.loads(files2[ex.SUMMARY_FILE])
    s1.pop("exported_at"), s2.pop("exported_at")
    assert s1 == s2


def test_records_summary_and_tiers(settings: Settings) -> None:
    store.load_seed(settings)
    conv = store.add_example(
        settings, prompt="Chat-Frage", response="Chat-Antwort", source="conversation", status="approved"
    )
    mem_ex = store.add_example(settings, prompt="Mein Hund?", response="Bruno.", source="memory")
    store.add_memory(settings, question="Mein Hund?", answer="Bruno.")  # same content as mem_ex
    tricky = store.add_example(  # everything the hand-assembled JSON lines must encode like json.dumps
        settings,
        prompt='Sag "hallo" \\ und\tmehr\x01',
        response="Zeile\u2028Trenner \U0001f319 ünd\x85",
        system="System\nprompt",
        turns=[{"role": "user", "content": "</script>"}, {"role": "assistant", "content": "ok"}],
        tags=["Ümlaut", 'a"b'],
        conversation_id="c\u00e9-1",
        rating=3,
    )
    summary = ex.export(settings, val_ratio=0.15, test_ratio=0.05)
    counts = store.counts(settings)

    for name in ex.DATA_FILES:
        lines = (settings.training_dir / name).read_text(encoding="utf-8").split("\n")[:-1]
        records = [json.loads(line) for line in lines]
        assert all(set(r) == RECORD_KEYS for r in records), name
        assert all(r["split"] in ("train", "val", "test") for r in records), name
        assert [r["hash"] for r in records] == sorted(r["hash"] for r in records), name
        assert lines == [
            json.dumps(r, ensure_ascii=False, separators=(",", ":"), sort_keys=True).translate(ex._LINE_BREAKS)
            for r in records
        ]
        info = summary.files[name]
        raw = (settings.training_dir / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(raw).hexdigest(), "records": len(records), "bytes": len(raw)}

    curated = _records(settings, ex.CURATED_FILE)
    assert len(curated) == counts["examples"]["curated"]["approved"]
    assert {r["source"] for r in curated} == {"curated"}
    for split in ex.SPLITS:
        part = _records(settings, ex.SPLIT_FILES[split])
        assert part == [r for r in curated if r["split"] == split]
        assert summary.counts["curated"][split] == len(part)
    first = curated[0]
    assert first["messages"][-1]["role"] == "assistant" and first["id"].startswith("ex-")

    memory = _records(settings, ex.MEMORY_FILE)
    # approved memory items + the memory-source example, the duplicate counted once
    assert len(memory) == counts["memory"]["approved"] + 1 - 1
    assert [r["id"] for r in memory if r["hash"] == mem_ex.hash] == [f"ex-{mem_ex.id}"]

    merged = _records(settings, ex.MERGED_FILE)
    (tricky_rec,) = [r for r in merged if r["hash"] == tricky.hash]
    assert tricky_rec["messages"] == tricky.messages() and tricky_rec["tags"] == ['a"b', "Ümlaut"]
    assert (tricky_rec["conversation_id"], tricky_rec["rating"]) == ("cé-1", 3)
    hashes = [r["hash"] for r in merged]
    assert len(hashes) == len(set(hashes))
    assert conv.hash in hashes and conv.hash not in {r["hash"] for r in curated}  # conversation: merged only
    assert set(hashes) == {r["hash"] for r in curated} | {r["hash"] for r in memory} | {conv.hash}

    s = ex.read_summary(settings)
    assert s is not None and s["store_revision"] == store.revision(settings)
    assert s["ratios"] == {"train": 0.8, "val": 0.15, "test": 0.05}
    expected_fp = hashlib.sha256(
        "".join(f"{n} {s['files'][n]['sha256']}\n" for n in sorted(ex.DATA_FILES)).encode()
    ).hexdigest()
    assert s["fingerprint"] == expected_fp == summary.fingerprint


def test_split_function_is_the_documented_formula() -> None:
    for i in range(200):
        key = f"conv:{i}" if i % 2 else hashlib.sha256(str(i).encode()).hexdigest()
        u = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64
        expected = "test" if u < 0.1 else "val" if u < 0.3 else "train"
        assert ex.split_of(key, 0.2, 0.1) == expected
    assert ex.split_key("abc", None) == "abc" and ex.split_key("abc", "c1") == "conv:c1"


def _assert_stable(settings: Settings, before: dict[str, str], val: float, test: float) -> None:
    ex.export(settings, val_ratio=val, test_ratio=test)
    after = _splits(settings)
    moved = {h for h in before if h in after and after[h] != before[h]}
    assert not moved


# No shrinking phase: each example builds a real database (about a second); a failure is printed as found.
@hsettings(
    max_examples=5,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.lists(
        st.tuples(
            # any text an example may hold: what UTF-8 can encode (no lone surrogate) but NUL, and something
            # visible; formats refuses the rest
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
                lambda t: t.strip() and not invisible(t)
            ),
            st.none() | st.sampled_from("abcdef"),
        ),
        min_size=1,
        max_size=40,
    ),
    seed=st.integers(0, 2**32 - 1),
    val=st.sampled_from([0.1, 0.25, 0.4]),
    test=st.sampled_from([0.0, 0.1]),
)
def test_adding_or_deleting_other_examples_moves_no_sample(
    tmp_path_factory: pytest.TempPathFactory, base: list, seed: int, val: float, test: float
) -> None:
    settings = load_settings(home=tmp_path_factory.mktemp("home"), db_url=None)
    drafts = [make_draft(prompt=p, response="Antwort", conversation_id=c and f"conv-{c}") for p, c in base]
    store.add_examples(settings, drafts)
    ex.export(settings, val_ratio=val, test_ratio=test)
    before = _splits(settings)
    # 1,000 new examples, some of them joining the existing conversations.
    rng = random.Random(seed)
    new = [
        make_draft(
            prompt=f"neu {seed} {i}",
            response=str(rng.random()),
            conversation_id=rng.choice([None, None, "conv-a", "conv-c", f"new-{rng.randrange(50)}"]),
        )
        for i in range(1000)
    ]
    assert store.add_examples(settings, new).added == 1000
    _assert_stable(settings, before, val, test)
    doomed = [e.id for e in store.list_examples(settings, limit=2000) if rng.random() < 0.3]
    if doomed:
        store.delete_examples(settings, doomed)
    _assert_stable(settings, before, val, test)
    store.dispose_stores()


def test_an_example_that_is_not_exported_moves_no_memory_item(db: Settings) -> None:
    """A memory item shares the split of an example with the same content (one sample in the merged tier,
    kept with its conversation). A pending or rejected example is not exported, so it must not move the
    memory item: it did, because the item took the conversation id of any example with its hash."""
    item = store.add_memory(db, question="Wo wohne ich?", answer="In Berlin.")
    conv = next(
        f"c{i}"
        for i in range(1000)
        if ex.split_of(ex.split_key(item.hash, f"c{i}"), 0.3, 0.0) != ex.split_of(item.hash, 0.3, 0.0)
    )
    ex.export(db, val_ratio=0.3, test_ratio=0.0)
    before = _splits(db)
    added = store.add_examples(
        db,
        [make_draft(prompt="Wo wohne ich?", response="In Berlin.", conversation_id=conv)],
        source="conversation",
        status="pending",
    )
    assert added.added == 1
    for status in ("pending", "rejected"):
        store.set_status(db, [e.id for e in store.list_examples(db)], status)
        ex.export(db, val_ratio=0.3, test_ratio=0.0)
        assert _splits(db) == before, status
        memory = [r for r in _records(db, ex.MEMORY_FILE) if r["id"] == f"mem-{item.id}"]
        assert [r["split"] for r in memory] == [before[item.hash]], status
    # Approved, the example is exported: the one sample follows its conversation, in both tiers.
    store.set_status(db, [e.id for e in store.list_examples(db)], "approved")
    ex.export(db, val_ratio=0.3, test_ratio=0.0)
    moved = ex.split_of(ex.split_key(item.hash, conv), 0.3, 0.0)
    assert _splits(db)[item.hash] == moved != before[item.hash]
    assert [r["split"] for r in _records(db, ex.MEMORY_FILE)] == [moved]


def test_one_exchange_with_other_system_prompts_or_turns_stays_in_one_split(settings: Settings) -> None:
    """The split hashes prompt and response (SPEC, the guide), not the system prompt or earlier turns: the same
    exchange stored five times with other system prompts was split into train and val, so val measured
    memorisation. Without a system prompt and turns the key is the content hash, as before."""
    systems = [None, "Sei kurz.", "Du bist Luna.", "Antworte auf Deutsch.", "Sei freundlich.", "Sprich wie ein Pirat."]
    pairs = [("Wie heißt du?", "Ich heiße Luna."), ("Was ist 2 + 3?", "5"), ("Hallo!", "Hallo, wie geht's?")]
    drafts = [make_draft(prompt=p, response=r, system=s) for p, r in pairs for s in systems]
    drafts += [make_draft(prompt=p, response=r, turns=[("user", "Vorher"), ("assistant", "Ja.")]) for p, r in pairs]
    assert store.add_examples(settings, drafts).added == len(drafts)
    ex.export(settings, val_ratio=0.5, test_ratio=0.0)
    for name in (ex.CURATED_FILE, ex.MERGED_FILE):
        by_pair: dict[tuple[str, str], set[str]] = defaultdict(set)
        for r in _records(settings, name):
            by_pair[(r["messages"][-2]["content"], r["messages"][-1]["content"])].add(r["split"])
        assert all(len(by_pair[p]) == 1 for p in pairs), (name, dict(by_pair))
        for p in pairs:  # the split of the plain exchange, whose key is its content hash
            plain = make_draft(prompt=p[0], response=p[1]).hash
            assert by_pair[p] == {ex.split_of(plain, 0.5, 0.0)}


def test_a_turn_kept_as_context_is_exported_with_weight_0_and_reimports_as_the_same_example(
    settings: Settings, tmp_path: Path
) -> None:
    """OpenAI's `weight: 0` survives the round trip: stored on the turn, written on the tier's message (the key
    in sorted order, as every line's keys), and the exported file imports again as the same content hash."""
    draft = make_draft(prompt="Und?", response="Gut", turns=[("user", "Hi"), ("assistant", "Hallo", 0)])
    other = make_draft(prompt="Und?", response="Gut", turns=[("user", "Hi"), ("assistant", "Hallo")])
    assert draft.hash != other.hash and store.add_examples(settings, [draft, other]).added == 2
    [stored] = [e for e in store.list_examples(settings) if e.hash == draft.hash]
    assert stored.turns[1] == {"role": "assistant", "content": "Hallo", "weight": 0}
    ex.export(settings)
    path = ex.export_dir(settings) / ex.CURATED_FILE
    lines = {json.loads(line)["hash"]: line for line in path.read_text("utf-8").splitlines()}
    assert '{"content":"Hallo","role":"assistant","weight":0}' in lines[draft.hash]
    assert '"weight"' not in lines[other.hash]
    copy = tmp_path / "again.jsonl"
    copy.write_text("".join(lines[h] + "\n" for h in (draft.hash, other.hash)), "utf-8")
    assert [d.hash for d in read_file(copy).drafts] == [draft.hash, other.hash]


def test_a_conversation_never_spans_two_splits(settings: Settings) -> None:
    store.load_seed(settings)
    store.add_examples(settings, _drafts(2000, "c", conversations=150))
    ex.export(settings, val_ratio=0.3, test_ratio=0.2)
    by_conv: dict[str, set[str]] = defaultdict(set)
    for name in (ex.CURATED_FILE, ex.MERGED_FILE):
        for r in _records(settings, name):
            if r["conversation_id"]:
                by_conv[r["conversation_id"]].add(r["split"])
    assert len(by_conv) > 100
    assert all(len(splits) == 1 for splits in by_conv.values())
    assert {s for v in by_conv.values() for s in v} == {"train", "val", "test"}


def test_split_fractions_follow_the_ratios(settings: Settings) -> None:
    store.add_examples(settings, _drafts(10_000, "f"))
    summary = ex.export(settings, val_ratio=0.1, test_ratio=0.05)
    c = summary.counts["curated"]
    assert c["total"] == 10_000
    assert abs(c["val"] / 10_000 - 0.1) < 0.02
    assert abs(c["test"] / 10_000 - 0.05) < 0.02
    assert abs(c["train"] / 10_000 - 0.85) < 0.02


def test_merged_val_and_test_never_hold_a_train_hash(settings: Settings) -> None:
    # Memory items whose content equals curated examples in conversations: one hash, one split everywhere.
    rng = random.Random(3)
    for i in range(60):
        prompt, answer = f"Erinnerung {i}?", f"Fakt {i}."
        store.add_example(settings, prompt=prompt, response=answer, conversation_id=f"conv-{rng.randrange(5)}")
        store.add_memory(settings, question=prompt, answer=answer)
    store.add_examples(settings, _drafts(300, "m"))
    ex.export(settings, val_ratio=0.3, test_ratio=0.2)
    train_anywhere: set[str] = set()
    for tier in ex.TIERS:
        train_anywhere |= {r["hash"] for r in ex.read_tier(settings, tier).train}  # type: ignore[arg-type]
    merged = ex.read_tier(settings, "merged")
    assert merged.val and merged.test
    assert not {r["hash"] for r in merged.val + merged.test} & train_anywhere
    split_of_hash: dict[str, set[str]] = defaultdict(set)
    for name in ex.DATA_FILES:
        for r in _records(settings, name):
            split_of_hash[r["hash"]].add(r["split"])
    assert all(len(v) == 1 for v in split_of_hash.values())


@pytest.mark.parametrize(
    ("val", "test"),
    [(-0.1, 0.0), (1.0, 0.0), (0.5, 0.5), (0.2, 1.2), (float("nan"), 0.0), (0.1, float("inf"))],
)
def test_invalid_ratios_write_nothing(settings: Settings, val: float, test: float) -> None:
    store.add_examples(settings, _drafts(50, "r"))
    with pytest.raises(UsageError, match="ratio"):
        ex.export(settings, val_ratio=val, test_ratio=test)
    assert not settings.training_dir.exists()
    ex.export(settings)
    before = _files(settings)
    with pytest.raises(UsageError):
        ex.export(settings, val_ratio=val, test_ratio=test)
    assert _files(settings) == before


def test_invalid_ratio_from_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASSISTANT_TRAIN_VAL_RATIO", "1.5")
    with pytest.raises(UsageError, match="ASSISTANT_TRAIN_VAL_RATIO"):
        load_settings()
    monkeypatch.setenv("ASSISTANT_TRAIN_VAL_RATIO", "0.6")
    monkeypatch.setenv("ASSISTANT_TRAIN_TEST_RATIO", "0.5")
    with pytest.raises(UsageError) as refused:
        ex.export(load_settings())
    # named by where each ratio came from (it said "val ratio + test ratio must be below 1", lowercase, no source)
    assert refused.value.message == (
        "The val ratio (ASSISTANT_TRAIN_VAL_RATIO) and the test ratio (ASSISTANT_TRAIN_TEST_RATIO) must add up to "
        "less than 1 so that something is left to train on, got 0.6 + 0.5."
    )
    with pytest.raises(
        UsageError, match=r"^The val ratio \(valRatio\) and the test ratio \(ASSISTANT_TRAIN_TEST_RATIO\)"
    ):
        ex.export(load_settings(), val_ratio=0.7)


def test_failure_during_export_keeps_the_previous_export(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add_examples(settings, _drafts(200, "a"))
    ex.export(settings)
    before = _files(settings)
    store.add_examples(settings, _drafts(200, "b"))
    monkeypatch.setattr(ex, "_PROGRESS_EVERY", 1)

    def interrupt(done: int, total: int) -> None:
        if done == 150:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.export(settings, on_progress=interrupt)
    assert _files(settings) == before
    assert not list((settings.training_dir / ex.EXPORTS_DIR).glob("*.partial"))
    assert ex.read_tier(settings, "curated").fingerprint == json.loads(before[ex.SUMMARY_FILE])["fingerprint"]


def test_progress_reports_reach_the_total(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add_examples(settings, _drafts(30, "p"))
    store.add_memory(settings, question="q", answer="a")
    monkeypatch.setattr(ex, "_PROGRESS_EVERY", 10)
    calls: list[tuple[int, int]] = []
    ex.export(settings, on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(10, 31), (20, 31), (30, 31), (31, 31)]


def test_read_tier(settings: Settings) -> None:
    with pytest.raises(NotFound, match="run `lunatrain export` first"):
        ex.read_tier(settings, "curated")
    assert ex.read_summary(settings) is None
    store.load_seed(settings)
    summary = ex.export(settings, val_ratio=0.2)
    for tier in ex.TIERS:
        data = ex.read_tier(settings, tier)  # type: ignore[arg-type]
        c = summary.counts[tier]
        assert (len(data.train), len(data.val), len(data.test)) == (c["train"], c["val"], c["test"])
        assert data.fingerprint == summary.fingerprint and data.summary["counts"] == summary.counts
    with pytest.raises(UsageError, match="Unknown dataset tier"):
        ex.read_tier(settings, "all")  # type: ignore[arg-type]
    path = settings.training_dir / ex.CURATED_FILE
    path.write_bytes(path.read_bytes()[:-10])  # a torn file
    with pytest.raises(CheckFailed, match="does not match the export summary"):
        ex.read_tier(settings, "curated")
    (ex.export_dir(settings) / ex.CURATED_FILE).unlink()
    with pytest.raises(CheckFailed, match="missing"):
        ex.read_tier(settings, "curated")


@pytest.mark.parametrize(
    "change",
    [{"files": []}, {"counts": "x"}, {"files": {ex.CURATED_FILE: "x"}}, {"ratios": 1}, {"fingerprint": None}],
    ids=repr,
)
def test_a_summary_with_fields_of_the_wrong_type_is_not_an_export_summary(home: Path, change: dict) -> None:
    """A summary whose `files` or `counts` had the wrong JSON type passed as one: `status`, `eval-gate`,
    `prepare` and `luna` ended in a traceback and GET /assistant/training/status answered 500. It is refused
    as a summary in the wrong format is, in one sentence that says to export again."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    settings = load_settings()
    store.load_seed(settings)
    ex.export(settings)
    path = ex.export_dir(settings) / ex.SUMMARY_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    said = f"{path} is not a lunatrain export summary; run `lunatrain export` again."
    with pytest.raises(CheckFailed) as err:
        ex.read_tier(settings, "curated")
    assert err.value.message == said
    r = CliRunner().invoke(app, ["prepare"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [f"error: {said}"], r.output
    r = CliRunner().invoke(app, ["status"])
    assert r.exit_code == 0 and f"problem: {said}" in r.output, r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.get("/assistant/training/status")
        assert res.status_code == 200 and res.json()["lastExport"] is None, res.text
        assert res.json()["problems"] == [said] and res.json()["problemCodes"][0]["code"] == "status.export_unreadable"


def test_cli_export(home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["examples", "seed"]).exit_code == 0
    r = runner.invoke(app, ["export", "--valRatio", "0.2", "--test-ratio", "0.1"])
    assert r.exit_code == 0, r.output
    assert "curated\t" in r.output and str(home / "data" / "training") in r.output
    summary = ex.read_summary(load_settings())
    assert summary is not None and summary["ratios"]["val"] == 0.2
    r = runner.invoke(app, ["export", "--val-ratio", "0.6", "--testRatio", "0.5"])
    assert (
        r.exit_code == 2
        and "The val ratio (valRatio) and the test ratio (testRatio) must add up to less than 1" in r.output
    )
    r = runner.invoke(app, ["export", "--val-ratio", "abc"])
    assert r.exit_code == 2


# --- all or nothing -------------------------------------------------------------------------------


def _resolved(settings: Settings) -> dict[str, bytes]:
    """What a reader of the guide's names sees, and that each name is a link through `current`."""
    for name in (*ex.DATA_FILES, ex.SUMMARY_FILE):
        assert (settings.training_dir / name).is_symlink(), name
    return _files(settings)


def test_an_export_is_one_directory_made_visible_by_one_link(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "retain_exports", 2)
    store.add_examples(settings, _drafts(40, "a"))
    first = ex.export(settings)
    store.add_examples(settings, _drafts(40, "b"))
    second = ex.export(settings)
    current = settings.training_dir / ex.CURRENT_LINK
    assert (
        current.is_symlink() and ex.export_dir(settings).name == ex.current_id(settings) == ex.export_ids(settings)[-1]
    )
    files = _resolved(settings)
    assert json.loads(files[ex.SUMMARY_FILE])["fingerprint"] == second.fingerprint != first.fingerprint
    assert len(ex.export_ids(settings)) == 2
    ex.export(settings)
    ex.export(settings)
    assert len(ex.export_ids(settings)) == 2  # older ones pruned, the current one kept
    assert ex.read_tier(settings, "curated").fingerprint == second.fingerprint  # same content, same fingerprint


def test_an_export_being_read_is_not_pruned_until_its_reader_is_done(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repro: `prepare` beside exports that finished while it loaded the tokenizer (three from the
    dashboard, or any one with ASSISTANT_RETAIN_EXPORTS=1) failed with "6 files differ from the export summary
    (edited by hand or torn)": their retention had removed the export prepare was reading. An export being read
    (`pinned`: prepare, and whatever reads through it) is left to the next prune; `gc --dry-run` does not list
    it either."""
    from lunatrain.params import parse_params
    from lunatrain.prepare import prepare

    monkeypatch.setattr(settings, "retain_exports", 1)
    store.add_examples(settings, _drafts(30, "a"))
    first = ex.export(settings)
    with ex.pinned(settings) as reading:
        for tag in ("b", "c"):
            store.add_examples(settings, _drafts(5, tag))
            ex.export(settings)
        assert ex.current_id(settings) != reading.name
        assert (
            reading.is_dir() and json.loads((reading / ex.SUMMARY_FILE).read_text())["fingerprint"] == first.fingerprint
        )
        assert reading not in ex.prune_exports(settings, 1, dry_run=True)
    assert reading in ex.prune_exports(settings, 1, dry_run=True)
    ex.export(settings)
    assert not reading.exists() and len(ex.export_ids(settings)) == 1

    # prepare reads its export through it: an export finishing while prepare loads its tokenizer is no torn file
    from lunatrain import models

    real = models.resolve_base

    def meanwhile(*args, **kwargs):  # the tokenizer and base load after every file of the export is read
        store.add_examples(settings, _drafts(5, "d"))
        ex.export(settings)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "resolve_base", meanwhile)
    report = prepare(settings, parse_params({"maxSeqLength": 128}))
    summary = next(c for c in report.checks if c.id == "export_summary")
    assert summary.severity != "fail", summary

    # review repro: a current export without its summary was "replaced again and again while it was being
    # read" (a retry never helps): there is no export, as before
    (ex.export_dir(settings) / ex.SUMMARY_FILE).unlink()
    with ex.pinned(settings) as reading:
        assert ex.read_summary(settings, reading) is None


def test_a_flat_export_from_before_is_adopted_first(settings: Settings) -> None:
    """A data root exported by an earlier version holds plain files: they become the first export
    directory (hard links), so the switch to the new export is again a single rename."""
    store.add_examples(settings, _drafts(30, "a"))
    ex.export(settings)
    flat = _files(settings)
    out = settings.training_dir
    for name in flat:
        (out / name).unlink()
        (out / name).write_bytes(flat[name])
    (out / ex.CURRENT_LINK).unlink()
    import shutil

    shutil.rmtree(out / ex.EXPORTS_DIR)
    assert ex.read_tier(settings, "curated").fingerprint == json.loads(flat[ex.SUMMARY_FILE])["fingerprint"]
    store.add_examples(settings, _drafts(30, "b"))
    new = ex.export(settings)
    assert json.loads(_resolved(settings)[ex.SUMMARY_FILE])["fingerprint"] == new.fingerprint
    adopted = out / ex.EXPORTS_DIR / ex.export_ids(settings)[0]
    assert {p.name: p.read_bytes() for p in adopted.iterdir()} == flat


def test_a_data_root_copied_with_its_links_followed_exports_again(settings: Settings, tmp_path: Path) -> None:
    """Move-root repro: a copy that follows links (`cp -rL`, `rsync -rL`, many backup tools) made `current` a
    folder and the guide's names plain files; every export of the copy then failed with "Is a directory ...
    check the disk", so `luna` stopped for good, and each try left an export folder and a `.current.*` link
    behind. The folder is adopted as the export it was, a name edited by hand is kept aside as always."""
    import os
    import shutil

    store.add_examples(settings, _drafts(30, "a"))
    ex.export(settings)
    copy = tmp_path / "copy"
    shutil.copytree(settings.home, copy, symlinks=False)  # what cp -rL does
    mine = load_settings(home=copy)
    out = mine.training_dir
    assert (out / ex.CURRENT_LINK).is_dir() and not (out / ex.CURRENT_LINK).is_symlink()
    (out / ex.MEMORY_FILE).write_text("edited by hand\n")
    store.add_examples(mine, _drafts(30, "b"))
    new = ex.export(mine)
    assert (out / ex.CURRENT_LINK).is_symlink() and all((out / n).is_symlink() for n in ex.DATA_FILES)
    assert ex.read_tier(mine, "curated").fingerprint == new.fingerprint
    assert [aside for _name, aside in new.kept_aside] == [p.name for p in out.glob("*.edited-*")]
    assert not [p for p in os.listdir(out) if p.startswith(f".{ex.CURRENT_LINK}.")]
    assert len(ex.export_ids(mine)) == len(ex.export_ids(settings)) + 2  # the adopted one and the new one


@pytest.mark.parametrize("errno_", ["ENOSPC", "EIO"])
def test_a_failed_write_keeps_the_previous_export(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, errno_: str
) -> None:
    import errno
    import os

    from lunatrain.errors import DiskFull, StorageError

    store.add_examples(settings, _drafts(60, "a"))
    ex.export(settings)
    before = _files(settings)
    store.add_examples(settings, _drafts(60, "b"))
    code = getattr(errno, errno_)

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError) as err:
        ex.export(settings)
    monkeypatch.undo()
    assert isinstance(err.value, DiskFull) == (errno_ == "ENOSPC")
    assert err.value.code == ("disk_full" if errno_ == "ENOSPC" else "storage_error")
    assert "previous data is intact" in err.value.message
    assert _files(settings) == before
    assert not [p for p in (settings.training_dir / ex.EXPORTS_DIR).iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("step", ["_switch_current", "_keep_aside"])
def test_an_export_refused_after_its_folder_was_renamed_leaves_no_export_behind(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Perms repro: an export whose `current` switch failed (data/training not writable, .exports/ writable)
    said "the previous data is intact" and left its whole folder in .exports/ each time: newer than the real
    exports, the leftovers counted among those kept and pushed them out. One that is already current (a later
    step failed) stays: it is what `current` names."""
    import errno
    import os

    from lunatrain.errors import StorageError

    store.add_examples(settings, _drafts(20, "a"))
    ex.export(settings)
    store.add_examples(settings, _drafts(20, "b"))
    before = sorted(p.name for p in (settings.training_dir / ex.EXPORTS_DIR).iterdir())

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ex, step, refused)
    with pytest.raises(StorageError):
        ex.export(settings)
    monkeypatch.undo()
    after = sorted(p.name for p in (settings.training_dir / ex.EXPORTS_DIR).iterdir())
    if step == "_switch_current":
        assert after == before
    else:
        assert len(after) == len(before) + 1 and ex.current_id(settings) in after


def test_a_crash_right_after_the_first_rename_leaves_no_torn_export(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported case: an export killed right after its first rename used to leave a new curated file
    beside the old others and the old summary. In-process stand-in for the kill (the slow fault suite kills
    a real child at every rename point)."""
    import os

    from lunatrain import prepare

    store.add_examples(settings, _drafts(40, "a"))
    old = ex.export(settings).fingerprint
    store.add_examples(settings, _drafts(40, "b"))
    real = os.replace
    calls = []

    def crash_after_first(src, dst, *a, **k):
        real(src, dst, *a, **k)
        calls.append(dst)
        raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(SystemExit):
        ex.export(settings)
    monkeypatch.undo()
    assert calls
    summary = ex.read_summary(settings)
    assert summary["fingerprint"] == old
    assert prepare._verify_files(settings.training_dir, summary)[1] == []  # what a reader of the names sees
    assert ex.read_tier(settings, "curated").fingerprint == old


def test_a_file_saved_over_its_link_is_refused_by_the_run_and_kept_aside_by_the_next_export(
    settings: Settings,
) -> None:
    """Repro: the guide's names are links into `current/`. An editor (or `sed -i`) saving one replaces the
    link with a file of its own: prepare said "every file matches the export summary" and the run trained
    on the export, not on what the user saw; the next export put the link back and the edit was gone
    without a word. Now prepare fails naming the file, the run refuses it, and the next export keeps the
    file aside and says where. A plain copy with the export's own content is no edit and just relinked."""
    from lunatrain import prepare
    from lunatrain.params import parse_params
    from lunatrain.train import run_lora

    store.add_examples(settings, _drafts(30, "a"))
    ex.export(settings)
    name = ex.SPLIT_FILES["train"]
    path = settings.training_dir / name
    edited = b"".join(path.read_bytes().splitlines(keepends=True)[1:])  # the first sample taken out
    tmp = path.with_name(name + ".tmp")
    tmp.write_bytes(edited)
    tmp.replace(path)  # as `sed -i` saves: a new file renamed over the link

    params = parse_params({"maxSteps": 1, "maxSeqLength": 128})
    report = prepare.prepare(settings, params)
    [check] = [c for c in report.checks if c.id == "export_summary"]
    assert (report.status, check.severity, check.code, check.examples) == (
        "fail",
        "fail",
        "check.export_summary.replaced",
        [name],
    ), check
    assert f"data/training/{name} is no longer the exported file" in check.message, check.message
    with pytest.raises(CheckFailed, match=rf"^data/training/{name} is no longer the exported file"):
        run_lora(params, settings)

    r = CliRunner().invoke(app, ["export"])
    assert r.exit_code == 0, r.output
    [aside] = settings.training_dir.glob("assistant-sft-curated-train.edited-*.jsonl")
    assert aside.read_bytes() == edited and path.is_symlink()
    assert f"Kept your edited data/training/{name} as data/training/{aside.name}" in r.output, r.output
    assert prepare.prepare(settings, params).status != "fail"

    # a copy with the export's own bytes (cp --remove-destination) is relinked without a copy kept
    content = path.read_bytes()
    path.unlink()
    path.write_bytes(content)
    assert prepare.prepare(settings, params).status != "fail"
    r = CliRunner().invoke(app, ["export"])
    assert r.exit_code == 0 and "Kept" not in r.output, r.output
    assert path.is_symlink() and len(list(settings.training_dir.glob("*.edited-*"))) == 1

    # the API's export says it too
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    summary_file = settings.training_dir / ex.SUMMARY_FILE
    summary_file.unlink()
    summary_file.write_text("{}")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        response = client.post("/assistant/training/export")
    assert response.status_code == 200, response.text
    [kept] = response.json()["keptAside"]
    assert kept["name"] == ex.SUMMARY_FILE and kept["keptAs"].startswith("assistant-sft-summary.edited-"), kept
    assert (settings.training_dir / kept["keptAs"]).read_text() == "{}"

    # so do the exports a quick start and an example adapter make before their job (the job's submit here
    # is a record of the job store: no trainer is needed to see the answer's shape)
    from lunatrain import flow
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobStore, jobs_db_path

    jobs = JobStore(jobs_db_path(settings.data_dir))
    try:
        job, _ = jobs.create(LoraParams())

        def quick_start(settings_, *_a, **_k):
            return flow.Started(job, export=ex.export(settings_))

        def example_adapter(settings_, *_a, **_k):
            return flow.Started(job, seeded=None, export=ex.export(settings_))

        for route, fake in (("quick-start", quick_start), ("example-adapter", example_adapter)):
            summary_file.unlink()
            summary_file.write_text("[]")
            monkey = pytest.MonkeyPatch()
            monkey.setattr(flow, route.replace("-", "_"), fake)
            try:
                with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
                    response = client.post(f"/assistant/training/lora/{route}")
            finally:
                monkey.undo()
            assert response.status_code == 202, response.text
            [kept] = response.json()["export"]["keptAside"]
            assert (settings.training_dir / kept["keptAs"]).read_text() == "[]", (route, kept)
    finally:
        jobs.close()


def test_a_clock_stepped_back_never_makes_pruning_drop_the_newest_exports(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: export folders are named by the time and the newest are kept by name. After the clock stepped
    back a day, each export deleted the one made just before it (current a moment earlier) and kept the three
    oldest. A new export's name now sorts after every name there, whatever the clock says."""
    from datetime import timedelta

    from lunatrain.wire import utc_now

    made = []
    exports = settings.training_dir / ex.EXPORTS_DIR
    # folders someone else named, one like an export of a day that does not exist: followed by nothing, pruned never
    # review repro: and ones of the far future (the last microsecond of 9999 made every export overflow)
    others = ("backup", "0-first", "x.partial", "20261399T000000000000Z-abcdef", "99991231T235959999999Z-abcdef")
    for name in (*others, "20991231T000000000000Z-abcdef"):
        (exports / name).mkdir(parents=True)
    for i in range(5):
        if i == 3:  # the clock steps back a day
            day_before = lambda: (utc_now() - timedelta(days=1)).strftime("%Y%m%dT%H%M%S%fZ")
            monkeypatch.setattr(ex, "compact_stamp", day_before)
        store.add_example(settings, prompt=f"Frage {i}?", response=f"Antwort {i}.")
        ex.export(settings)
        made.append(ex.current_id(settings))
    assert ex.export_ids(settings) == made[-settings.retain_exports :]  # the newest, oldest first
    assert {*others, "20991231T000000000000Z-abcdef"} < {p.name for p in exports.iterdir()}
    assert not made[-1].startswith("2099")  # not named after a folder of the far future


def test_a_row_an_earlier_release_stored_with_carriage_returns_keeps_its_split(db: Settings) -> None:
    """Review repro: line endings are normalized now, and the split key of an example with a system prompt is
    recomputed from its stored prompt and response at every export: rows an earlier release stored with
    "\\r\\n" moved between train, val and test (61 of 200) after the upgrade, so a sample an adapter trained on
    could be validated on."""
    import sqlalchemy as sa

    kept = {}
    for i in range(40):
        prompt = f"Frage {i}\r\nzweite Zeile"
        row = store.add_example(db, prompt=prompt.replace("\r", ""), response="Antwort", system="Sei knapp.")
        with store.open_store(db).write() as conn:  # as the earlier release stored it
            conn.execute(sa.text("UPDATE examples SET prompt = :p WHERE id = :i"), {"p": prompt, "i": row.id})
        then = hashlib.sha256(
            json.dumps(["", [], prompt, "Antwort"], ensure_ascii=False, separators=(",", ":")).encode()
        ).hexdigest()
        kept[row.hash] = ex.split_of(then, 0.3, 0.2)
    ex.export(db, val_ratio=0.3, test_ratio=0.2)
    assert _splits(db) == kept


def test_an_old_export_that_cannot_be_removed_leaves_the_others_pruned(settings: Settings) -> None:
    """Review repro: once a folder that cannot be removed raised, an export's own pruning stopped at the first
    old export that stayed (another user's, a read-only mount) and kept every other one on every export."""
    from faults import read_only

    for i in range(3):
        store.add_examples(settings, _drafts(5, f"x{i}"))
        ex.export(settings)
    old = ex.export_ids(settings)[:2]
    stuck = settings.training_dir / ex.EXPORTS_DIR / old[0]
    (stuck / "inner").mkdir()
    with read_only(stuck / "inner"):
        store.add_examples(settings, _drafts(5, "y"))
        ex.export(Settings(home=settings.home, retain_exports=1))
    ids = ex.export_ids(settings)
    assert old[0] in ids and old[1] not in ids and len(ids) == 2 and ex.current_id(settings) == ids[-1], ids


def test_an_export_that_leaves_a_tier_nothing_to_train_on_says_so(home: Path) -> None:
    """API fuzz repro: `export --valRatio 0.99` (or POST /export) wrote a curated tier whose train split was
    empty without a word, while its refusal of ratios adding up to 1 says the rule is there "so that something
    is left to train on"; the run failed later, at prepare. The export says it, with its code for the
    dashboard; -0.0 is echoed as 0.0."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    settings = load_settings()
    for i in range(10):
        store.add_example(settings, prompt=f"Frage {i}?", response=f"Antwort {i}.")
    r = CliRunner().invoke(app, ["export", "--valRatio", "0.99"])
    said = (
        "Note: all 10 samples of the curated tier fell into val/test (val ratio 0.99, test ratio 0.0), so a run on "
        "it has nothing to train on: add samples, or lower the ratios."
    )
    assert r.exit_code == 0 and said in r.output.splitlines(), r.output
    assert "merged tier" in r.output and "memory tier" not in r.output, r.output  # a tier with no samples: no note
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        body = client.post("/assistant/training/export", json={"valRatio": 0.99, "testRatio": -0.0}).json()
        assert body["notes"][0] == said.removeprefix("Note: ").replace("all", "All", 1), body
        assert len(body["notes"]) == 2 and "of the merged tier" in body["notes"][1], body  # curated + memory
        assert body["noteCodes"][0] == {
            "code": "export.nothing_to_train",
            "params": {"tier": "curated", "count": 10, "valRatio": 0.99, "testRatio": 0.0},
        }, body
        assert str(body["ratios"]["test"]) == "0.0", body["ratios"]
        body = client.post("/assistant/training/export", json={"valRatio": 0.1}).json()
        assert body["counts"]["curated"]["train"] > 0 and body["notes"] == [] and body["noteCodes"] == [], body
    store.dispose_stores()
