"""Speculative decoding with a draft model on the head (`[cluster] draft_model`): greedy output
exactly mlx-lm's without speculation, lone and concurrent, whether the draft model agrees with
the model (itself as its own draft) or not (another made model with the same tokenizer); the
draft's caches follow the request's text through rejected drafts; drafts that fail or come late
leave the request without them; a draft model that cannot draft for the model is refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

from mlxring.config import ConfigError, load_config_or_exit, parse_config
from mlxring.engine.draft import DraftModel, tokenizer_mismatch
from mlxring.engine.speculate import MISSES, PAUSE, Drafter
from mlxring.model.checkpoint import ModelError

from .ringutil import loaded, local_ring, reference, tiny_model, write_valid_config
from .test_speculate import PERIODIC, generate

PROMPTS = [PERIODIC, [t + 1 for t in PERIODIC], [t + 2 for t in PERIODIC]]


async def loaded_draft(model: Path, **kw: object) -> DraftModel:
    draft = DraftModel(str(model), None, **kw)  # type: ignore[arg-type]
    await draft.load(loaded(model)[1])
    return draft


async def until_idle(draft: DraftModel, rid: str) -> None:
    deadline = time.monotonic() + 30
    while rid in draft._busy:
        assert time.monotonic() < deadline, "a draft job did not end"
        await asyncio.sleep(0.01)


async def test_drafts_are_the_draft_models_greedy_text_through_rejections() -> None:
    """The draft caches keep what the request's text still starts with: after a rejected
    draft, the next drafts are mlx-lm's greedy continuation of the text as it is now."""
    model = tiny_model("qwen3", scale=1.0)
    draft = await loaded_draft(model, slots=1)
    try:
        text = list(PERIODIC)
        assert await draft.draft("a", text, 4) == reference(model, text, 4)
        assert await draft.draft("b", text, 4) == []  # the one slot is a's
        first = reference(model, text, 4)
        text += [first[0], (first[1] + 1) % 500]  # one draft kept, then another token
        assert await draft.draft("a", text, 4) == reference(model, text, 4)
        text += reference(model, text, 4)  # every draft kept
        assert await draft.draft("a", text, 3) == reference(model, text, 3)
        draft.release("a")
        assert await draft.draft("b", PROMPTS[1], 2) == reference(model, PROMPTS[1], 2)
    finally:
        await draft.close(10)


async def test_a_late_draft_goes_on_behind_and_a_failed_one_ends_drafting() -> None:
    model = tiny_model("qwen3", scale=1.0)
    draft = await loaded_draft(model, timeout_s=0.0)
    try:
        long = PERIODIC * 10  # past PREFILL: fed in two passes
        assert await draft.draft("a", long, 3) == []  # late: the step goes without
        assert await draft.draft("a", long, 3) == []  # still running: not asked again
        await until_idle(draft, "a")
        draft.timeout_s = 30.0
        assert await draft.draft("a", long, 3) == reference(model, long, 3)
        bad = ["not", "tokens"]
        assert await draft.draft("b", bad, 3) == []  # type: ignore[arg-type]
        await until_idle(draft, "b")
        assert await draft.draft("b", PERIODIC, 3) == []  # b drafts no more
        assert await draft.draft("c", PERIODIC, 3) == reference(model, PERIODIC, 3)
    finally:
        await draft.close(10)


async def test_drafts_that_do_not_come_in_time_are_misses_and_drafting_pauses() -> None:
    """The Drafter's back-off covers the draft model: steps that waited for drafts and got
    none are misses, and after MISSES of them it pauses, then drafts again."""
    model = tiny_model("qwen3", scale=1.0)
    draft = await loaded_draft(model, timeout_s=0.0)
    try:
        assert not draft.pays(1.0)  # not measured yet: a pass of its own measures it first
        deadline = time.monotonic() + 30
        while draft._probing:
            assert time.monotonic() < deadline, "the measuring pass did not end"
            await asyncio.sleep(0.01)
        assert 0 < draft.pass_s < 0.5 and draft.pays(1.0)
        d = Drafter(k=3, rid="a", source=draft)
        assert await d.next(PERIODIC, 10) == []  # a plain step first, the model not asked
        assert "a" not in draft._busy
        d.took(0, 0, 1.0)  # a plain step's time: drafting 3 may take half of 3 such steps
        for _ in range(MISSES):
            assert await d.next(PERIODIC, 10) == []  # late
            d.took(0, 0, 1.0)
        await until_idle(draft, "a")
        draft.timeout_s = 30.0
        assert [await d.next(PERIODIC, 10) for _ in range(PAUSE)] == [[]] * PAUSE
        assert await d.next(PERIODIC, 10) == reference(model, PERIODIC, 3)
        d.took(3, 3, 1.0)
        assert (draft.drafted, draft.accepted) == (3, 3)
        # A draft pass is measured: where a plain step takes less than two, drafting cannot
        # pay, and a request does not ask for drafts (misses, then a pause) until it may.
        assert draft.pass_s > 0 and draft.pays(3 * draft.pass_s)
        assert not draft.pays(draft.pass_s)
        slow = Drafter(k=3, rid="b", source=draft)
        slow.took(0, 0, draft.pass_s)
        assert [await slow.next(PERIODIC, 10) for _ in range(MISSES + PAUSE)] == [[]] * (
            MISSES + PAUSE
        )
        assert "b" not in draft._slots  # never asked
    finally:
        await draft.close(10)


def test_a_tokenizer_that_differs_is_named() -> None:
    model = tiny_model("qwen3", scale=1.0)
    tok = loaded(model)[1]
    assert tokenizer_mismatch(loaded(tiny_model("llama"))[1], tok) is None
    other = loaded(tiny_model("qwen3", chat="qwen3"))[1]  # Qwen3's marker tokens added
    assert "vocabulary has" in str(tokenizer_mismatch(other, tok))
    eos = load_tokenizer(model, eos_token_ids=[7])
    assert "end-of-sequence ids [2, 7] are not the model's [2]" in str(tokenizer_mismatch(eos, tok))


@pytest.mark.parametrize(
    ("draft", "why"),
    [
        (tiny_model("qwen3", chat="qwen3"), "its tokenizer is not the model's"),
        (tiny_model("gemma3_text"), "its caches cannot drop rejected drafts"),
        ("/nonexistent/draft", "model directory /nonexistent/draft does not exist"),
    ],
    ids=["tokenizer", "sliding-window", "missing"],
)
async def test_a_draft_model_that_cannot_draft_is_refused_at_load(
    tmp_path: Path, draft: Path | str, why: str
) -> None:
    model = tiny_model("qwen3", scale=1.0)
    extra = f'draft_model = "{draft}"'
    cfg = write_valid_config(tmp_path, model, 2, extra_cluster=extra)
    with pytest.raises(ModelError) as e:
        async with local_ring(cfg):
            pass
    assert f"cannot use draft_model {draft}: {why}" in str(e.value)


@pytest.mark.parametrize("value", ['""', '" smollm2"', "3", "true"])
def test_a_bad_draft_model_is_a_config_error_naming_the_key(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f'[cluster]\nmodel = "demo"\ndraft_model = {value}\n[[nodes]]\nname = "a"\nport = 5100\n'
    with pytest.raises(ConfigError, match=r"^nodes\.toml: cluster\.draft_model: "):
        parse_config(text)
    path = tmp_path / "nodes.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        load_config_or_exit(path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cluster.draft_model" in err
    assert parse_config(text.replace(value, '"smollm2"')).cluster.draft_model == "smollm2"


async def ring_is_exact(tmp_path: Path, model: Path, draft: Path, extra: str = "") -> DraftModel:
    """Greedy output through a ring drafting with `draft` equals mlx-lm's, lone and three
    at once; the ring's draft model, its counters read after."""
    wants = [reference(model, p, 60) for p in PROMPTS]
    cluster = f'draft_model = "{draft}"\n{extra}'
    cfg = write_valid_config(tmp_path, model, 3, extra_cluster=cluster)
    async with local_ring(cfg) as rt:
        engine = rt.engine
        assert engine is not None and engine.speculative and engine.drafts is not None
        model_draft = rt.replanner.draft
        assert model_draft is not None and model_draft is engine.drafts
        # Drafting whatever it costs: a made model's pass costs about a step of the tiny ring
        # (the back-off, timed, still pauses drafts that do not pay).
        model_draft.frugal = False
        assert await generate(rt, PROMPTS[0], 60) == wants[0]
        assert engine.drafts.drafted > 0
        got = await asyncio.gather(*(generate(rt, p, 60) for p in PROMPTS))
        assert got == wants
        assert engine.drafted >= model_draft.drafted
        return model_draft


async def test_a_model_drafting_for_itself_is_exact_and_mostly_accepted(tmp_path: Path) -> None:
    model = tiny_model("qwen3", scale=1.0)
    draft = await ring_is_exact(tmp_path, model, model)
    assert draft.accepted >= 0.8 * draft.drafted


async def test_another_model_drafting_is_exact_though_mostly_rejected(tmp_path: Path) -> None:
    """Another family's made model (the same tokenizer) agrees now and then (about one draft
    in ten): kept runs and rejected ones through the ring and through the draft's caches."""
    model = tiny_model("mixtral", scale=1.0)
    draft = await ring_is_exact(tmp_path, model, tiny_model("qwen3", scale=1.0))
    assert draft.accepted < 0.5 * draft.drafted


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "scale", "draft_family"),
    [
        ("mixtral", 1.0, "mixtral"),
        ("qwen3_moe", 1.5, "qwen3_moe"),
        ("llama", 1.0, "llama"),
        ("qwen3", 1.0, "qwen2"),
        ("qwen3", 1.5, "qwen3_x1"),
        ("llama", 1.0, "qwen3"),
    ],
)
async def test_every_pairing_is_exact(
    tmp_path: Path, family: str, scale: float, draft_family: str
) -> None:
    """More families, as their own drafts and others' (qwen3_x1: qwen3 at another scale)."""
    model = tiny_model(family, scale=scale)
    if draft_family == family:
        draft = model
    elif draft_family == "qwen3_x1":
        draft = tiny_model("qwen3", scale=1.0)
    else:
        draft = tiny_model(draft_family)
    await ring_is_exact(tmp_path, model, draft)


async def test_prompt_lookup_first_then_the_draft_model(tmp_path: Path) -> None:
    """With `speculative = true` besides, drafts come from the text where it repeats and
    from the model where it does not: both kinds counted apart on /metrics."""
    import aiohttp

    from .ringutil import serve_api

    model = tiny_model("qwen3", scale=1.0)
    wants = [reference(model, p, 60) for p in PROMPTS]
    cluster = f'draft_model = "{tiny_model("llama")}"\nspeculative = true'
    cfg = write_valid_config(tmp_path, model, 3, extra_cluster=cluster)
    async with local_ring(cfg) as rt:
        engine = rt.engine
        assert engine is not None and rt.replanner.draft is not None
        rt.replanner.draft.frugal = False  # as in ring_is_exact
        assert engine.drafts is not None
        assert await asyncio.gather(*(generate(rt, p, 60) for p in PROMPTS)) == wants
        by_model = engine.drafts.drafted
        assert 0 < by_model < engine.drafted  # some drafts of each kind
        async with serve_api(rt) as url, aiohttp.ClientSession() as s:
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
        name = 'mlxring_speculative_{}_tokens_total{{kind="{}"}} {}'
        assert name.format("drafted", "draft", float(by_model)) in text
        assert name.format("drafted", "ngram", float(engine.drafted - by_model)) in text
        accepted = float(engine.drafts.accepted)
        assert name.format("accepted", "draft", accepted) in text
        assert name.format("accepted", "ngram", float(engine.accepted - accepted)) in text


# In the slow set: it spawns two rings of processes (the tests above check drafting itself).
@pytest.mark.slow
def test_bench_speculative_draft_measures_one_stream_with_a_draft_model_and_without() -> None:
    from .test_bench import bench

    model = tiny_model("qwen3", scale=1.0)
    r, _ = bench(
        *["--model", str(model), "--nodes", "2", "--speculative", "draft"],
        *["--gen-tokens", "48"],
    )
    assert r["draft_model"] == str(model) and r["draft_is_model"] is True  # itself by default
    for k in ("baseline_decode_tok_s", "ring_decode_tok_s", "speculative_decode_tok_s"):
        assert isinstance(r[k], float) and r[k] > 0, k
    assert r["agreement"] == 1.0  # the model agrees with itself
    # Drafted tokens only where drafting pays (on a CPU, a tiny model's pass may not): the
    # acceptance, where any were drafted, is all of them.
    assert r["acceptance"] == (1.0 if r["drafted"] else 0.0)
    assert r["same_text"] is True
