"""prefix_grouper.py: the same log-probs and gradients as the naive repeated-prefix forward, on CPU and CUDA."""

import contextlib
import warnings

import pytest
import torch
from conftest import DEVICES
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import common
import grpo
import prefix_grouper as pg

VOCAB = 61


def tiny_model(family, kernel="sdpa", device="cpu", dtype=torch.float32, seed=0):
    """A random two-layer model with grouped-query attention (4 query heads share 2 key/value heads)."""
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family](**shape)
    config._attn_implementation = kernel
    torch.manual_seed(seed)
    model_class = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM}[family]
    return model_class(config).to(device=device, dtype=dtype).train()


def uneven_batch(group_sizes, seed=0, device="cpu"):
    """Prompts of 5, 11, 2, ... tokens; completions of 1 to 9 tokens (random), so every row is padded differently."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths = [5, 11, 2, 8][: len(group_sizes)]
    prompts = [torch.randint(1, VOCAB, (p,), generator=g).to(device) for p in prompt_lengths]
    completions = [
        [torch.randint(1, VOCAB, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).to(device)
         for _ in range(size)]
        for size in group_sizes
    ]  # fmt: skip
    return prompts, completions


def logprobs_and_grads(fn, model, prompts, completions, **kwargs):
    model.zero_grad(set_to_none=True)
    logps = fn(model, prompts, completions, **kwargs)
    # a weighted sum, so every token's gradient matters with a different weight
    weights = torch.linspace(0.5, 1.5, sum(len(x) for group in logps for x in group), device=logps[0][0].device)
    flat = torch.cat([x for group in logps for x in group])
    (flat * weights).sum().backward()
    return logps, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(grouped, naive, logp_atol, grad_rtol):
    (logps_g, grads_g), (logps_n, grads_n) = grouped, naive
    assert [len(group) for group in logps_g] == [len(group) for group in logps_n]
    for group_g, group_n in zip(logps_g, logps_n):
        for a, b in zip(group_g, group_n):
            assert a.shape == b.shape and torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=logp_atol, rtol=0)
    for name, grad in grads_n.items():
        assert torch.isfinite(grads_g[name]).all(), name
        relative = ((grads_g[name] - grad).norm() / grad.norm().clamp(min=1e-12)).item()
        assert relative < grad_rtol, f"{name}: relative gradient difference {relative:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "group_sizes", [[1, 1, 1], [2, 2, 2], [4, 4, 4], [1, 3, 2, 4]], ids=["G1", "G2", "G4", "mixed"]
)
def test_same_logprobs_and_gradients_as_naive(device, family, kernel, group_sizes):
    """fp32: log-probs within 1e-5, every parameter's gradient within 1e-4 (relative norm)."""
    model = tiny_model(family, kernel, device)
    prompts, completions = uneven_batch(group_sizes, device=device)
    grouped = logprobs_and_grads(pg.shared_prefix_logprobs, model, prompts, completions)
    naive = logprobs_and_grads(pg.repeated_prefix_logprobs, model, prompts, completions)
    assert_same(grouped, naive, logp_atol=1e-5, grad_rtol=1e-4)
    assert model.config._attn_implementation == kernel  # restored after the grouped forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_unpadded_prompts_take_the_causal_kernel_and_match_naive(device, family):
    """Prompts of one length: the prompt call runs sdpa's own causal path (is_causal, no mask)."""
    model = tiny_model(family, device=device)
    prompts, completions = uneven_batch([3, 2, 4], device=device)
    prompts = [p[:2] for p in prompts]  # every prompt 2 tokens long
    assert pg.pack(prompts, completions).prompts_unpadded
    grouped = logprobs_and_grads(pg.shared_prefix_logprobs, model, prompts, completions)
    naive = logprobs_and_grads(pg.repeated_prefix_logprobs, model, prompts, completions)
    assert_same(grouped, naive, logp_atol=1e-5, grad_rtol=1e-4)


def test_lm_head_sees_only_the_scored_tokens_and_kv_is_not_copied_per_head(monkeypatch):
    """The LM head gets one row per completion token (not the union of positions over rows), and sdpa's grouped-query
    attention runs without repeat_kv (the query heads are folded instead: sdpa_shared_kv)."""
    import transformers.integrations.sdpa_attention as sdpa

    model = tiny_model("qwen2")
    prompts, completions = uneven_batch([2, 3, 1])  # prompts of unequal length: the masked path
    head_rows = []
    model.lm_head.register_forward_hook(lambda head, args, out: head_rows.append(args[0].shape[:-1].numel()))
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: pytest.fail("K/V repeated per query head"))
    pg.shared_prefix_logprobs(model, prompts, completions)
    assert head_rows == [sum(len(c) for group in completions for c in group)]


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_and_entropy_match_naive(device):
    model = tiny_model("qwen2", device=device)
    prompts, completions = uneven_batch([3, 2], device=device)
    with torch.no_grad():
        lp_g, ent_g = pg.shared_prefix_logprobs(model, prompts, completions, temperature=0.7, return_entropy=True)
        lp_n, ent_n = pg.repeated_prefix_logprobs(model, prompts, completions, temperature=0.7, return_entropy=True)
        lp_1 = pg.repeated_prefix_logprobs(model, prompts, completions)
    for a, b, c, d, e in zip(sum(lp_g, []), sum(lp_n, []), sum(ent_g, []), sum(ent_n, []), sum(lp_1, [])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, d, atol=1e-5, rtol=0)
        assert not torch.allclose(a, e)  # the temperature is really applied


def test_changing_one_completion_leaves_the_others_unchanged():
    model = tiny_model("llama").eval()
    prompts, completions = uneven_batch([4, 2])
    with torch.no_grad():
        before = pg.shared_prefix_logprobs(model, prompts, completions)
        completions[0][1] = torch.randint(1, VOCAB, (7,), generator=torch.Generator().manual_seed(9))
        after = pg.shared_prefix_logprobs(model, prompts, completions)
    for i, j in [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1)]:
        torch.testing.assert_close(before[i][j], after[i][j], atol=1e-6, rtol=0)
    assert after[0][1].shape == (7,)


def test_packing_by_hand():
    prompts = [torch.tensor([11, 12, 13]), torch.tensor([21])]
    completions = [[torch.tensor([14, 15]), torch.tensor([16])], [torch.tensor([22, 23, 24])]]
    layout = pg.pack(prompts, completions, pad_token_id=0)
    assert layout.input_ids.tolist() == [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 0, 0]]
    # every completion restarts at its prompt's length
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    # prompts left-padded to P_max = 3, completions right-padded to S_max = 3; flat index = row * 6 + column
    assert layout.prefix_index.tolist() == [[0, 1, 2], [0, 0, 6]]
    assert layout.prefix_valid.tolist() == [[True, True, True], [False, False, True]]
    assert layout.suffix_index.tolist() == [[3, 4, 0], [5, 0, 0], [7, 8, 9]]
    assert layout.suffix_row.tolist() == [0, 0, 1]
    prefix_mask, suffix_mask = layout.masks(torch.float32)
    allowed = lambda mask: (mask[:, 0] == 0).int().tolist()  # noqa: E731
    assert allowed(prefix_mask)[1] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding sees itself only; 21 sees 21
    # completion [16] (row 0): sees the 3 prompt tokens and itself, not [14, 15]
    assert allowed(suffix_mask)[1][0] == [1, 1, 1, 1, 0, 0]
    # completion [22, 23, 24]: sees prompt token 21 (last prefix slot) and itself causally
    assert allowed(suffix_mask)[2] == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


def test_registered_and_a_plain_forward_is_sdpa():
    assert ALL_ATTENTION_FUNCTIONS["prefix_grouper"] is pg.prefix_grouper_attention
    model = tiny_model("qwen2").eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model.set_attn_implementation("prefix_grouper")  # left on it, without a layout: plain sdpa
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_flex_attention_on_cuda_matches_naive():
    """flex_attention takes our additive masks too. CUDA only: on CPU, PyTorch's flex_attention has no backward,
    and its compiled forward crashed the interpreter in our runs (torch 2.13, 2-core x86-64)."""
    model = tiny_model("qwen2", device="cuda")
    prompts, completions = uneven_batch([2, 3, 1], device="cuda")
    grouped = logprobs_and_grads(pg.shared_prefix_logprobs, model, prompts, completions, kernel="flex_attention")
    naive = logprobs_and_grads(pg.repeated_prefix_logprobs, model, prompts, completions)
    assert_same(grouped, naive, logp_atol=1e-5, grad_rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_bf16_on_cuda_is_as_accurate_as_naive_bf16(family):
    """bf16 keeps 8 mantissa bits, so neither path matches fp32 to 1e-5. The tolerance we justify: against an fp32
    reference, the grouped bf16 log-probs and gradients may be at most 2x (+ a bf16 ulp) further off than the
    naive bf16 computation is: prefix sharing must not cost accuracy beyond bf16's own rounding."""
    prompts, completions = uneven_batch([4, 4, 2], device="cuda")
    reference = logprobs_and_grads(pg.repeated_prefix_logprobs, tiny_model(family, device="cuda"), prompts, completions)
    model = tiny_model(family, device="cuda", dtype=torch.bfloat16)
    errors = {}
    for name, fn in (("grouped", pg.shared_prefix_logprobs), ("naive", pg.repeated_prefix_logprobs)):
        logps, grads = logprobs_and_grads(fn, model, prompts, completions)
        flat, flat_ref = torch.cat(sum(logps, [])).float(), torch.cat(sum(reference[0], []))
        grad_error = max(((grads[n].float() - g).norm() / g.norm()).item() for n, g in reference[1].items())
        errors[name] = ((flat - flat_ref).abs().max().item(), grad_error)
    assert errors["grouped"][0] <= 2 * errors["naive"][0] + 2**-8
    assert errors["grouped"][1] <= 2 * errors["naive"][1] + 2**-8


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        ([torch.tensor([1, 2])], [[torch.tensor([3])], [torch.tensor([4])]], "1 prompts but 2 completion lists"),
        (
            [torch.tensor([1, 2]), torch.tensor([5])],
            [[torch.tensor([3])], []],
            "the group of prompt 1 must be a non-empty list",
        ),
        ([torch.tensor([[1, 2]])], [[torch.tensor([3])]], "1-D tensor"),
        ([torch.tensor([], dtype=torch.long)], [[torch.tensor([3])]], "non-empty"),
    ],
)
def test_bad_input_is_a_clear_error(prompts, completions, message):
    model = tiny_model("qwen2")
    for fn in (pg.shared_prefix_logprobs, pg.repeated_prefix_logprobs):
        with pytest.raises(ValueError, match=message):
            fn(model, prompts, completions)


def test_kernels_without_explicit_masks_are_refused():
    with pytest.raises(ValueError, match="explicit attention mask"):
        pg.shared_prefix_logprobs(tiny_model("qwen2"), [torch.tensor([1, 2])], [[torch.tensor([3])]],
                                  kernel="flash_attention_2")  # fmt: skip


def test_a_model_without_attention_interface_is_refused():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="cannot replace MambaForCausalLM's attention"):
        pg.shared_prefix_logprobs(model, [torch.tensor([1, 2])], [[torch.tensor([3])]])


SLIDING = {  # windows of 4 tokens: shorter than every row, so the window changes the result
    "mistral": lambda **shape: MistralConfig(**shape, sliding_window=4),
    "qwen2-hybrid": lambda **shape: Qwen2Config(**shape, use_sliding_window=True, sliding_window=4,
                                                max_window_layers=2),  # layers 0-1 full, 2-3 sliding
    "gemma2": lambda **shape: Gemma2Config(**shape, head_dim=16, sliding_window=4, attn_logit_softcapping=50.0,
                                           final_logit_softcapping=30.0),  # soft-capped, eager only
    "gemma3": lambda **shape: Gemma3TextConfig(**shape, head_dim=16, sliding_window=4, sliding_window_pattern=2),
}  # fmt: skip
MODELS = {"mistral": MistralForCausalLM, "qwen2-hybrid": Qwen2ForCausalLM, "gemma2": Gemma2ForCausalLM,
          "gemma3": Gemma3ForCausalLM}  # fmt: skip


def sliding_model(family, kernel, device="cpu", window=None):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    config = SLIDING[family](**shape)
    config.sliding_window = window or config.sliding_window
    config._attn_implementation = kernel
    torch.manual_seed(0)
    return MODELS[family](config).to(device).train()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "family, kernel",
    [("mistral", "sdpa"), ("mistral", "eager"), ("qwen2-hybrid", "sdpa"), ("qwen2-hybrid", "eager"),
     ("gemma2", "eager"), ("gemma3", "sdpa"), ("gemma3", "eager")],
)  # fmt: skip
def test_sliding_window_and_hybrid_models_match_naive(family, kernel, device):
    """Sliding-window layers (alone, or alternating with full attention) give the naive forward's log-probs and
    gradients; and the window matters here: the same weights with a window longer than any row score otherwise."""
    model = sliding_model(family, kernel, device)
    prompts, completions = uneven_batch([2, 3, 1], device=device)
    grouped = logprobs_and_grads(pg.shared_prefix_logprobs, model, prompts, completions)
    naive = logprobs_and_grads(pg.repeated_prefix_logprobs, model, prompts, completions)
    assert_same(grouped, naive, logp_atol=1e-5, grad_rtol=1e-4)
    wide, _ = logprobs_and_grads(pg.repeated_prefix_logprobs, sliding_model(family, kernel, device, window=256),
                                 prompts, completions)  # fmt: skip
    assert max((a - b).abs().max().item() for ga, gb in zip(wide, naive[0]) for a, b in zip(ga, gb)) > 1e-3


def test_layers_other_than_full_and_sliding_attention_are_refused():
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="not chunked_attention: use repeated_prefix_logprobs"):
        pg.shared_prefix_logprobs(model, [torch.tensor([1, 2])], [[torch.tensor([3])]])


# ---------------------------------------------------------------------------------------------------------------
# Tries: every distinct prefix encoded once


def shared_sequences(device="cpu"):
    """Sequences that share prefixes at different depths: a duplicate, one a prefix of another, branches at 5 and
    8 tokens, one sharing nothing; starts inside shared parts, at the first scorable token and at the end."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, VOCAB, (12,), generator=g)
    branch = lambda n, k: torch.cat([base[:n], torch.randint(1, VOCAB, (k,), generator=g)])  # noqa: E731
    sequences = [base, base[:8], branch(5, 6), base.clone(), branch(5, 3), torch.randint(1, VOCAB, (7,), generator=g),
                 branch(8, 4)]  # fmt: skip
    return [x.to(device) for x in sequences], [3, 6, 2, 10, 5, 1, 12]


def each_alone(model, sequences, starts, temperature=1.0):
    """The reference: a plain forward of each sequence by itself."""
    logits = [model(input_ids=x[None], use_cache=False).logits[0, s - 1 : -1] for x, s in zip(sequences, starts)]
    return [(z.float() / temperature).log_softmax(-1).gather(-1, x[s:, None]).squeeze(-1)
            for z, x, s in zip(logits, sequences, starts)]  # fmt: skip


def trie_and_alone(model, sequences, starts, **kwargs):
    results = []
    for fn in (lambda: pg.trie_logprobs(model, sequences, starts, **kwargs), lambda: each_alone(model, sequences,
               starts, **kwargs)):  # fmt: skip
        model.zero_grad(set_to_none=True)
        logps = fn()
        flat = torch.cat(logps)
        (flat * torch.linspace(0.5, 1.5, len(flat), device=flat.device)).sum().backward()
        results.append(([[x] for x in logps], {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_trie_logprobs_equal_each_sequence_alone(device, family, kernel):
    model = tiny_model(family, kernel, device)
    sequences, starts = shared_sequences(device)
    trie, alone = trie_and_alone(model, sequences, starts, temperature=0.7)
    assert_same(trie, alone, logp_atol=1e-5, grad_rtol=1e-4)
    assert len(trie[0][-1][0]) == 0  # started at its end: nothing to score


def test_trie_encodes_each_distinct_prefix_once_and_rows_may_split(monkeypatch):
    sequences, starts = shared_sequences()
    layout = pg.pack_trie(sequences)
    distinct = {tuple(x[:n].tolist()) for x in sequences for n in range(1, len(x) + 1)}
    assert layout.input_ids.shape == (1, len(distinct)) and len(distinct) < sum(map(len, sequences))
    assert sorted(layout.position_ids[0].tolist()) == sorted(len(prefix) - 1 for prefix in distinct)  # depths
    model = tiny_model("qwen2")
    one_row = pg.trie_logprobs(model, sequences, starts)
    small_rows = pg.pack_trie
    monkeypatch.setattr(pg, "pack_trie", lambda sequences, **options: small_rows(sequences, **options,
                                                                                   max_row_tokens=10))  # fmt: skip
    assert pg.pack_trie(sequences).input_ids.shape[0] > 1
    for a, b in zip(one_row, pg.trie_logprobs(model, sequences, starts)):  # rows of about 10 nodes: the same
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_trie_on_a_sliding_window_model():
    model = sliding_model("mistral", "sdpa")
    sequences, starts = shared_sequences()
    trie, alone = trie_and_alone(model, sequences, starts)
    assert_same(trie, alone, logp_atol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize(
    "sequences, starts, message",
    [([torch.tensor([1, 2])], [0], "1 <= start <= its length"), ([torch.tensor([1, 2])], [1, 1], "one start per"),
     ([torch.tensor([[1, 2]])], [1], "1-D tensor")],
)  # fmt: skip
def test_trie_bad_input_is_a_clear_error(sequences, starts, message):
    with pytest.raises(ValueError, match=message):
        pg.trie_logprobs(tiny_model("qwen2"), sequences, starts)


# ---------------------------------------------------------------------------------------------------------------
# grpo.py --prefix_grouper


@pytest.mark.parametrize("greedy", [True, False])
def test_rollout_prefills_each_prompt_once_with_the_same_tokens(greedy):
    """With prefix_grouper the rollout prefills each prompt once (B rows, not B*G) and shares its KV cache with the
    group's samples: greedy completions are token for token today's, and so are samples with the same seed here."""
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_model(tokenizer).eval()
    prompts, rows = ["12+34=", "5+6=", "100+2="], []
    model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape), with_kwargs=True)
    results = []
    for prefix_grouper in (False, True):
        torch.manual_seed(0)
        rows.clear()
        results.append(grpo.generate_completions(model, tokenizer, prompts, group_size=4, max_new_tokens=10,
                                                 greedy=greedy, prefix_grouper=prefix_grouper))  # fmt: skip
    assert rows[0] == (3, 5)  # the shared prefill: 3 prompts, all but their last token (the longest has 6)
    assert torch.equal(results[0]["completion_ids"], results[1]["completion_ids"])
    assert torch.equal(results[0]["completion_mask"], results[1]["completion_mask"])


def test_grpo_step_is_the_same_with_prefix_grouper():
    """One GRPO loss on a rollout with padded prompts, EOS-masked completions and a fully masked (truncated)
    completion: the same loss and the same gradient of every parameter with and without prefix grouping."""
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    prompt_lengths = [4, 7]  # two groups of 3 rows
    prompt_ids = torch.zeros(6, 7, dtype=torch.long)
    prompt_mask = torch.zeros(6, 7, dtype=torch.long)
    for i, p in enumerate(prompt_lengths):  # left-padded, repeated per group member
        prompt_ids[i * 3 : i * 3 + 3, 7 - p :] = torch.randint(1, VOCAB, (p,), generator=g)
        prompt_mask[i * 3 : i * 3 + 3, 7 - p :] = 1
    completion_ids = torch.randint(1, VOCAB, (6, 9), generator=g)
    lengths = torch.tensor([9, 3, 5, 0, 6, 1])  # row 3: a truncated completion, masked out entirely
    completion_mask = (torch.arange(9)[None] < lengths[:, None]).long()
    advantages = torch.randn(6, generator=g)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}  # fmt: skip
    results = []
    for prefix_grouper in (False, True):
        model.zero_grad(set_to_none=True)
        logps, entropy = grpo.completion_logprobs(model, batch, prefix_grouper=prefix_grouper)
        loss, _ = grpo.policy_loss(logps, logps.detach(), None, advantages, completion_mask, loss_type="grpo")
        loss.backward()
        results.append((loss, logps * completion_mask, entropy * completion_mask,
                        {n: p.grad.clone() for n, p in model.named_parameters()}))  # fmt: skip
    (loss_n, logps_n, ent_n, grads_n), (loss_g, logps_g, ent_g, grads_g) = results
    torch.testing.assert_close(loss_g, loss_n, atol=1e-6, rtol=0)
    torch.testing.assert_close(logps_g, logps_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_g, ent_n, atol=1e-5, rtol=0)
    for name, grad in grads_n.items():
        assert ((grads_g[name] - grad).norm() / grad.norm()).item() < 1e-4, name


def test_grpo_prefix_grouper_finds_groups_in_any_rows():
    """Micro-batches may cut a group: the rows that share a prompt are found from the prompts themselves, so any
    slice of rows gets the naive forward's log-probs (here rows 1-4: the end of one group, the start of the next)."""
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, VOCAB, (2, 5), generator=g).repeat_interleave(3, dim=0)  # (6, 5): 2 groups of 3
    batch = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
             "completion_ids": torch.randint(1, VOCAB, (6, 4), generator=g),
             "completion_mask": torch.ones(6, 4, dtype=torch.long)}  # fmt: skip
    rows = {k: v[1:5] for k, v in batch.items()}
    naive, _ = grpo.completion_logprobs(model, rows)
    grouped, _ = grpo.completion_logprobs(model, rows, prefix_grouper=True)
    torch.testing.assert_close(grouped, naive, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# What the API cannot compute exactly is refused; what the model's attention adds is kept


def sinks_model(kernel="eager"):
    """A random GPT-OSS: attention sinks (drawn large enough to matter), experts, a sliding-window layer."""
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    experts = dict(num_local_experts=2, num_experts_per_tok=1)
    layers = ["sliding_attention", "full_attention"]
    config = GptOssConfig(**shape, **experts, head_dim=16, num_hidden_layers=2, sliding_window=4, layer_types=layers)
    config._attn_implementation = kernel
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).train()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    return model


EXTRAS = {"sinks": sinks_model, "softcap": lambda kernel="eager": sliding_model("gemma2", kernel)}


@pytest.mark.parametrize("extra", EXTRAS)
def test_sinks_and_softcap_are_kept_by_the_default_kernel_and_sdpa_is_refused(extra):
    """sdpa cannot apply attention sinks or soft-capped logits: the default kernel is eager, even for a model loaded
    with a flash kernel, and matches naive; sdpa asked for is refused, by name or (a layout built by hand) in the
    forward."""
    model = EXTRAS[extra]()
    prompts, completions = uneven_batch([2, 3, 1])
    grouped = logprobs_and_grads(pg.shared_prefix_logprobs, model, prompts, completions)
    naive = logprobs_and_grads(pg.repeated_prefix_logprobs, model, prompts, completions)
    assert_same(grouped, naive, logp_atol=1e-5, grad_rtol=1e-4)
    with pytest.raises(ValueError, match="kernel='sdpa' would drop"):
        pg.shared_prefix_logprobs(model, prompts, completions, kernel="sdpa")
    with pytest.raises(ValueError, match="kernel='sdpa' cannot apply .*(s_aux|softcap)"):
        pg.packed_logits(model, pg.pack(prompts, completions, kernel="sdpa"), (torch.tensor([0]), torch.tensor([0])))
    model.config._attn_implementation = "flash_attention_2"
    assert pg.default_kernel(model) == "eager"


@pytest.mark.parametrize("extra", EXTRAS)
def test_a_model_on_prefix_grouper_runs_its_own_kernel_without_a_layout(extra):
    """Generation and every plain forward on "prefix_grouper" run the kernel the model had and its mask: the same
    logits (left-padded rows) and the same samples as on that kernel."""
    model = EXTRAS[extra]().eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    results = []
    for context in (contextlib.nullcontext, pg.use_prefix_grouper):
        with context(model):
            torch.manual_seed(0)
            logits = model(input_ids=ids, attention_mask=mask).logits
            samples = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True)
            results.append((model.config._attn_implementation, logits, samples))
    assert [name for name, _, _ in results] == ["eager", "prefix_grouper"]
    assert model.config._attn_implementation == "eager" and not hasattr(model.config, pg.PLAIN)  # nothing left to save
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def test_gradient_checkpointing_recomputes_through_prefix_grouper():
    """The backward recomputes each layer: the model stays on prefix_grouper, so the recomputation sees the layout."""
    model = tiny_model("qwen2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts, completions = uneven_batch([2, 3, 1])
    grouped = logprobs_and_grads(pg.shared_prefix_logprobs, model, prompts, completions)
    naive = logprobs_and_grads(pg.repeated_prefix_logprobs, model, prompts, completions)
    assert_same(grouped, naive, logp_atol=1e-5, grad_rtol=1e-4)
    assert model.config._attn_implementation == "prefix_grouper"


def test_what_cannot_be_computed_exactly_is_refused():
    model = tiny_model("qwen2")
    prompts, completions = uneven_batch([2, 2])
    with pytest.raises(ValueError, match="kernel='flex_attention' runs on cuda only"):
        pg.shared_prefix_logprobs(model, prompts, completions, kernel="flex_attention")
    with pytest.raises(ValueError, match="kernel='flex_attention' runs on cuda only"):
        pg.trie_logprobs(model, [torch.tensor([1, 2, 3])], [1], kernel="flex_attention")
    model.config._attn_implementation = "flex_attention"  # loaded with it: the two calls take sdpa on a CPU
    assert pg.default_kernel(model) == "sdpa"
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match=r"starts\[0\]: need an integer"):
        pg.trie_logprobs(model, [torch.tensor([1, 2, 3, 4, 5])] * 2, [4.0, 5.0])
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    for rows, copies in (([0, 1, 0, 1], 2), ([0, 0, 1, 1, 1], 2), ([0, 0], 2.0), ([0, 0], 0)):
        inputs = {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows])}
        with pytest.raises(ValueError, match="copies"):
            pg.shared_prompt_cache(model, inputs, copies)
    meta = tiny_model("qwen2", device="meta")
    calls = [
        lambda: pg.shared_prefix_logprobs(meta, prompts, completions),
        lambda: pg.repeated_prefix_logprobs(meta, prompts, completions),
        lambda: pg.trie_logprobs(meta, [torch.tensor([1, 2])], [1]),
        lambda: pg.shared_prompt_cache(meta, {"input_ids": ids, "attention_mask": ids}, 1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="model: Qwen2ForCausalLM is on the meta device"):
            call()


@pytest.mark.slow
def test_flex_attention_indexes_every_trie_segment_and_group_mask(monkeypatch):
    """flex_attention indexes the additive mask by batch entry: the segments of one shape in a trie, which share one
    mask, must each find it. On CPU, eagerly and without gradients (torch's CPU flex_attention has no backward)."""
    import transformers.integrations.flex_attention as flex
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(
        flex, "compile_friendly_flex_attention", lambda q, k, v, training, **kw: flex_attention(q, k, v, **kw)
    )
    monkeypatch.setattr(pg, "FLEX_DEVICES", ("cuda", "cpu"))
    model = tiny_model("qwen2").eval()
    sequences, starts = shared_sequences()
    prompts, completions = uneven_batch([2, 3, 1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs without torch.compile
        trie = pg.trie_logprobs(model, sequences, starts, kernel="flex_attention")
        alone = each_alone(model, sequences, starts)
        grouped = pg.shared_prefix_logprobs(model, prompts, completions, kernel="flex_attention")
        naive = pg.repeated_prefix_logprobs(model, prompts, completions)
    for a, b in zip(trie + sum(grouped, []), alone + sum(naive, [])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
