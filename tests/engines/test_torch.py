"""The torch engine: agreement with transformers' own generate, its paged KV cache and its batch sampler."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.engines.near_ties import assert_exact_up_to_a_near_tie, first_divergence
from tokenmill.cpus import available_cpus
from tokenmill.engines.base import Chunk
from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.sequence import Sequence, prepare_sequence
from tokenmill.engines.torchlm.checkpoint import ModelConfig
from tokenmill.engines.torchlm.engine import TorchEngine
from tokenmill.engines.torchlm.kv_cache import BLOCK, PagedKVCache
from tokenmill.engines.torchlm.sampler import BatchSampler
from tokenmill.generation import GenerationRequest
from tokenmill.runners.scheduler import Scheduler, SchedulerConfig
from tokenmill.sampling import SamplingParams

PROMPTS = ["Once upon a time", "def fibonacci(n):", "La capitale de la France est", "The three laws of robotics are"]
TOKENS = 24


@pytest.fixture(scope="module")
def reference():
    """transformers' LlamaForCausalLM on the same GGUF, read by transformers' own GGUF loader."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def greedy_batched(engine: TorchEngine, prompts: list[str], tokens: int, join_every: int = 0) -> list[list[int]]:
    """Run prompts through the real scheduler and return each one's new tokens: all in one batch,
    or (join_every=N) each joining N steps after the one before, while the others decode."""
    scheduler = Scheduler(SchedulerConfig(max_batch=8, kv_tokens=4096, max_step_tokens=64))  # chunked prefill
    seqs = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        seqs.append(prepare_sequence(GenerationRequest(str(i), params, prompt=prompt), engine.tokenizer))
    waiting, step = list(seqs), 0
    while waiting or scheduler.has_work:
        if waiting and (not join_every or step % join_every == 0):
            scheduler.add(waiting.pop(0))
            if not join_every:
                continue
        step += 1
        for seq in scheduler.admit():
            engine.add_sequence(seq)
        chunks = scheduler.plan()
        if not chunks:
            continue
        outcome = scheduler.postprocess(chunks, engine.step(chunks))
        for seq in outcome.finished:
            engine.remove_sequence(seq)
    return [seq.token_ids[seq.num_prompt_tokens :] for seq in seqs]


def test_greedy_tokens_equal_transformers_generate_alone_and_batched(reference):
    """fp32 arithmetic is the same on every x86 CPU: the tokens must be exactly transformers' own."""
    engine = TorchEngine(
        default_model_path(), context_window=1024, threads=available_cpus(), max_sequences=8, dtype="float32"
    )
    assert engine.model.four_bit_rows == 0  # fp32 activations: the dense weights (the int4 kernel is slower)
    expected = []
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        out = reference.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        expected.append(out[0, len(ids) :].tolist())
    alone = [greedy_batched(engine, [p], TOKENS)[0] for p in PROMPTS]
    assert alone == expected
    assert greedy_batched(engine, PROMPTS, TOKENS) == expected
    assert engine.cache.num_sequences == 0 and engine.cache.blocks_in_use == 0


@pytest.mark.parametrize("how", ["alone", "batched", "ragged"])
def test_bf16_greedy_tokens_follow_the_fp32_model_up_to_a_near_tie(reference, how):
    """bf16 rounds differently on AVX-512 and AMX, and with the rows in a step: held to the fp32
    model by the near-tie rule of tests/engines/near_ties.py, alone, in one batch, and joining a
    batch that is already decoding (chunked prefill mixed into decode steps)."""
    engine = TorchEngine(
        default_model_path(), context_window=1024, threads=available_cpus(), max_sequences=8, dtype="bfloat16"
    )
    # the engine's default on a CPU: few-row steps read the file's 4-bit blocks (a CPU kernel: none on CUDA)
    assert engine.model.four_bit_rows == (4 if engine.device.type == "cpu" else 0)
    tokens = 2 * TOKENS
    if how == "alone":
        outputs = [greedy_batched(engine, [p], tokens)[0] for p in PROMPTS]
    else:
        outputs = greedy_batched(engine, PROMPTS, tokens, join_every=5 if how == "ragged" else 0)
    for prompt, got in zip(PROMPTS, outputs, strict=True):
        assert len(got) == tokens
        assert_exact_up_to_a_near_tie(reference, engine.tokenizer.encode(prompt), got, f"{how} {prompt!r}")
    assert engine.cache.num_sequences == 0 and engine.cache.blocks_in_use == 0


def test_the_near_tie_rule_fails_a_token_the_model_ranks_clearly_lower(reference):
    engine = TorchEngine(
        default_model_path(), context_window=1024, threads=available_cpus(), max_sequences=1, dtype="float32"
    )
    ids = engine.tokenizer.encode(PROMPTS[0])
    good = greedy_batched(engine, [PROMPTS[0]], 8)[0]
    assert first_divergence(reference, ids, good) is None
    bad = good[:3] + [engine.tokenizer.encode(" zebra")[-1]] + good[4:]
    with pytest.raises(AssertionError, match="token 3 is"):
        assert_exact_up_to_a_near_tie(reference, ids, bad)


def _tiny_cache(blocks: int) -> PagedKVCache:
    config = ModelConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        trained_context=1024,
        head_dim=4,
    )
    return PagedKVCache(config, num_blocks=blocks, dtype=torch.float32, device=torch.device("cpu"), block=4)


def _fill(cache: PagedKVCache, seq_id: int, cells: int, value: float) -> None:
    cache.ensure(seq_id, cells)
    table = cache.table(seq_id)
    positions = torch.arange(cells)
    blocks = torch.tensor([table[p // cache.block] for p in range(cells)])
    keys = torch.full((cells, 1, 4), value) + positions[:, None, None]
    for layer in range(2):
        cache.write(layer, blocks, positions % cache.block, keys, -keys)


def test_kv_blocks_follow_the_tokens_and_are_gathered_back():
    cache = _tiny_cache(blocks=6)
    cache.add(1)
    _fill(cache, 1, 6, 100.0)  # 6 cells: two blocks of 4
    cache.add(2)
    _fill(cache, 2, 3, 200.0)
    assert cache.blocks_in_use == 3 and cache.table(1) == [0, 1] and cache.table(2) == [2]
    keys, values = cache.gather(1, torch.tensor(cache.table(2) + cache.table(1)))  # [blocks, kv heads, cells, dim]
    assert keys[0, 0, :3, 0].tolist() == [200.0, 201.0, 202.0]
    assert keys[1:, 0, :, 0].flatten()[:6].tolist() == [100.0 + p for p in range(6)]
    assert torch.equal(values, -keys)
    k, v = cache.sequence(0, torch.tensor(cache.table(1)), 6)
    assert k[0, :, 0].tolist() == [100.0 + p for p in range(6)] and torch.equal(v, -k)
    cache.remove(1)
    assert cache.blocks_in_use == 1
    cache.add(3)
    cache.ensure(3, 1)
    assert cache.table(3) == [0]  # the lowest free block first: the touched memory stays compact
    assert torch.all(cache.sequence(0, torch.tensor([0]), 4)[0] == 0)  # a block is zeroed when taken


def test_shared_blocks_are_referenced_a_partial_one_copied_and_freed_with_the_last_reference():
    cache = _tiny_cache(blocks=4)
    cache.add(1)
    _fill(cache, 1, 6, 100.0)
    cached = cache.table(1)[:2]
    cache.hold(cached)  # a prefix cache entry for its first 6 cells
    cache.remove(1)
    assert cache.blocks_in_use == 2
    cache.add(2)
    cache.share(2, cached, 6)  # one whole block by reference, the partly used one copied
    assert cache.table(2)[0] == cached[0] and cache.table(2)[1] not in cached
    assert cache.sequence(0, torch.tensor(cache.table(2)), 6)[0][0, :, 0].tolist() == [100.0 + p for p in range(6)]
    cache.release(cached)
    assert cache.blocks_in_use == 2  # the shared block lives on in sequence 2's table
    cache.remove(2)
    assert cache.blocks_in_use == 0


def test_out_of_blocks_reclaims_cached_prompts_before_failing():
    cache = _tiny_cache(blocks=2)
    cache.add(1)
    _fill(cache, 1, 8, 1.0)
    entry = list(cache.table(1))
    cache.hold(entry)
    cache.remove(1)
    reclaimed = []

    def reclaim() -> bool:
        if not reclaimed:
            reclaimed.append(entry)
            cache.release(entry)
            return True
        return False

    cache.reclaim = reclaim
    cache.add(2)
    cache.ensure(2, 8)
    assert reclaimed and cache.blocks_in_use == 2
    with pytest.raises(Exception, match="no free block"):
        cache.ensure(2, 9)


def _seqs(params: list[SamplingParams], first_id: int = 0, prompt: tuple[int, ...] = (1,)) -> list[Sequence]:
    return [Sequence("r", list(prompt), p, 8, tokenizer=None, seq_id=first_id + i) for i, p in enumerate(params)]


def test_batch_sampler_rules():
    sampler = BatchSampler(end_of_generation_ids=[0], device=torch.device("cpu"))
    logits = torch.tensor([[9.0, 1.0, 2.0, 3.0]] * 4)
    rows = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1, seed=1),
        SamplingParams(temperature=1.0, top_p=0.01, seed=2),
        SamplingParams(temperature=0, ignore_eos=True),
    ]
    for i, params in enumerate(rows):
        sampler.add(i, params)
    # greedy, top_k=1 and a tiny top_p all take the best token; a forbidden end token is skipped
    assert sampler.sample(logits.clone(), _seqs(rows)) == [0, 0, 0, 3]

    def draws(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        sampler.add(99, params)
        flat = torch.zeros(1, 1000)
        return [sampler.sample(flat.clone(), _seqs([params], first_id=99))[0] for _ in range(5)]

    assert draws(5) == draws(5) and draws(5) != draws(6)
    sampler.remove(99)


def test_batch_sampler_draws_follow_the_distribution():
    sampler = BatchSampler(end_of_generation_ids=[3], device=torch.device("cpu"))
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(2000)]
    for i, p in enumerate(params):
        sampler.add(i, p)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).repeat(2000, 1)
    drawn = torch.tensor(sampler.sample(logits, _seqs(params)))
    shares = torch.bincount(drawn, minlength=4).float() / 2000
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.04)


def test_abort_mid_prefill_frees_the_slot_and_others_continue():
    engine = TorchEngine(
        default_model_path(), context_window=1024, threads=available_cpus(), max_sequences=2, max_step_tokens=8
    )
    make = lambda prompt: prepare_sequence(
        GenerationRequest("r", SamplingParams(temperature=0, max_tokens=4), prompt=prompt), engine.tokenizer
    )
    long, short = make("A long prompt that needs several prefill chunks to get through"), make("Hi")
    engine.add_sequence(long)
    engine.add_sequence(short)
    tokens = engine.step([Chunk(short, short.num_pending), Chunk(long, 8 - short.num_pending)])
    assert len(tokens[0]) == 1 and tokens[1] == []  # short finished its prompt; long is mid-prefill
    engine.remove_sequence(long)
    assert engine.cache.num_sequences == 1 and engine.cache.blocks_in_use == 1
    short.num_computed += short.num_pending
    short.token_ids += tokens[0]
    assert engine.step([Chunk(short, 1)])[0]


def test_logprobs_match_transformers_log_softmax(reference):
    from tests.engines.test_engine_contract import _logprobs_of

    engine = TorchEngine(default_model_path(), context_window=1024, threads=available_cpus())
    chosen_diffs, top_diffs, same_ids = [], [], []
    for prompt in PROMPTS:
        seq, entries = _logprobs_of(engine, prompt, temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
        with torch.inference_mode():
            expected = reference(torch.tensor([seq.token_ids])).logits[0].float().log_softmax(dim=-1)
        for i, entry in enumerate(entries):
            row = expected[seq.num_prompt_tokens - 1 + i]
            chosen_diffs.append(abs(entry.logprob - row[seq.token_ids[seq.num_prompt_tokens + i]].item()))
            values, ids = row.topk(5)
            top_diffs += [abs(t.logprob - v) for t, v in zip(entry.top, values.tolist(), strict=True)]
            pieces = {bytes(engine.tokenizer.token_bytes(i)) for i in ids.tolist()}
            same_ids.append(len(pieces & {bytes(t.token_bytes) for t in entry.top}))
    # bf16 activations (and int4 decode weights) against an fp32 reference: close, not equal
    assert max(chosen_diffs) < 0.25 and sum(chosen_diffs) / len(chosen_diffs) < 0.06, chosen_diffs
    assert sum(top_diffs) / len(top_diffs) < 0.08
    assert sum(same_ids) / len(same_ids) >= 4.5  # the same alternatives, near ties aside


def test_a_sequence_joins_and_leaves_after_the_cache_has_grown():
    """Blocks are taken inside step() (inference mode); adding and removing sequences later touches
    the cache in place, which torch refuses outside inference mode (a crash at concurrency)."""
    engine = TorchEngine(
        default_model_path(), context_window=1024, threads=available_cpus(), max_sequences=2, max_step_tokens=512
    )
    make = lambda prompt, n: prepare_sequence(
        GenerationRequest("r", SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), prompt=prompt),
        engine.tokenizer,
    )
    first = make("word " * (BLOCK + 10), 2)  # its prefill takes more than one block
    engine.add_sequence(first)
    assert engine.step([Chunk(first, first.num_pending)])[0]
    first.num_computed = first.num_prompt_tokens
    assert len(engine.cache.table(first.seq_id)) > 1
    second = make("Hi", 2)
    engine.add_sequence(second)
    engine.remove_sequence(first)
    assert engine.step([Chunk(second, second.num_pending)])[0]
    engine.remove_sequence(second)


def test_a_request_needing_the_whole_cache_takes_the_cached_prompts_blocks():
    """Cached prompts live in the blocks no running sequence needs: a sequence that needs them all
    gets them (the cache gives its entries up, oldest first) instead of failing."""
    engine = TorchEngine(
        default_model_path(),
        context_window=1024,
        threads=available_cpus(),
        max_sequences=1,
        kv_tokens=4 * BLOCK,
        prefix_cache_tokens=1024,
    )
    make = lambda prompt, n: prepare_sequence(
        GenerationRequest("r", SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), prompt=prompt),
        engine.tokenizer,
    )
    for i in range(3):  # three cached prompts of a block or two each
        seq = make(f"{i} " * (BLOCK // 2 + 8), 1)
        engine.add_sequence(seq)
        assert engine.step([Chunk(seq, seq.num_pending)])[0]
        engine.remove_sequence(seq)
    cached_before = engine.prefix_cache_stats().cached_tokens
    assert cached_before > 2 * BLOCK and engine.cache.blocks_in_use >= 3
    big = make("word " * (4 * BLOCK - 8), 4)  # with its reply: the whole budget
    assert big.kv_tokens_needed <= 4 * BLOCK
    engine.add_sequence(big)
    assert engine.step([Chunk(big, big.num_pending)])[0]
    # the earlier entries were given up; the cache now holds the big prompt alone
    assert engine.prefix_cache_stats().cached_tokens == big.num_prompt_tokens
    engine.remove_sequence(big)


@pytest.mark.parametrize("step_tokens", [512, 7])
def test_prompt_logprobs_match_transformers_log_softmax(reference, step_tokens):
    """Each prompt token scored by the logits one position before it, in one step or in chunks of 7."""
    from tests.engines.test_engine_contract import _scored

    engine = TorchEngine(
        default_model_path(), context_window=1024, threads=available_cpus(), max_step_tokens=step_tokens
    )
    seq, prompt, _ = _scored(engine, max_tokens=0, prompt_logprobs=5)
    tokens = seq.token_ids[: seq.num_prompt_tokens]
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens])).logits[0].float().log_softmax(dim=-1)
    diffs, top_diffs, ranks = [], [], []
    for position, entry in enumerate(prompt.scored):
        row = expected[position]
        target = tokens[position + 1]
        diffs.append(abs(entry.logprob - row[target].item()))
        top_diffs += [abs(t.logprob - v) for t, v in zip(entry.top, row.topk(5).values.tolist(), strict=True)]
        ranks.append((entry.rank, 1 + int((row > row[target]).sum())))
    # bf16 activations against an fp32 reference, as for sampled tokens' logprobs
    assert max(diffs) < 0.25 and sum(diffs) / len(diffs) < 0.06, diffs
    assert sum(top_diffs) / len(top_diffs) < 0.08
    # the same rank, give or take the near ties that bf16 reorders among thousands of unlikely tokens
    assert all(abs(got - want) <= 1 + 0.1 * want for got, want in ranks), ranks
