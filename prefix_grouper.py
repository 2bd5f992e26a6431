"""Prefix Grouper: encode a GRPO group's shared prompt once, as a drop-in transformers attention function.

Paper: Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward (Liu et al., 2025),
https://arxiv.org/abs/2506.05433. Official code: https://github.com/johncaged/PrefixGrouper (flash-attention only).

The idea. GRPO scores G completions of one prompt, and the naive batch repeats the prompt in every row:
G(P+S) tokens for a prompt of P tokens and completions of S. Every part of a transformer except attention works
token by token, so the prompt's hidden states are the same in all G rows. Prefix Grouper packs one row per
prompt, [P][S_1][S_2]...[S_G], P + G*S tokens, and splits attention into two calls per layer:

    prefix:      O_P   = softmax(Q_P K_P^T * scale + causal mask) V_P                      once per prompt
    completions: O_S_j = softmax(Q_S_j [K_P; K_S_j]^T * scale + mask_j) [V_P; V_S_j]     for j = 1..G
                 mask_j lets token t of S_j see all of P and tokens 0..t of S_j, and nothing of S_k, k != j

Position ids restart at P for every completion, so RoPE sees each completion exactly where the naive row has it.
The logits of the last prompt token predict the first token of every completion. Autograd sums the G
completions' gradients into the shared prompt's keys and values, so log-probs *and* gradients equal the naive
repeated-prefix computation (paper, Lemma 2.1); only the floating-point summation order differs.
Ideal saving of the per-token work (MLP, projections, LM head): G(P+S) / (P+G*S), up to G for P >> S.

Read `GroupLayout`, `prefix_grouper_attention` (the AttentionInterface entry), `shared_prefix_logprobs` and the naive
`repeated_prefix_logprobs`; then sliding windows, tries (`trie_logprobs`, Tree-GRPO), the shared prefill. Ours:
1. Exact (up to summation order) with sdpa, eager and flex_attention (CUDA): 4-D additive masks, where the
   official 2-D masks rely on flash-attention's causal alignment; what we cannot compute exactly is one clear error.
2. Wired in like verl: `model(..., prefix_grouper=layout)`; without a layout the model's own kernel runs.
3. Logits only where a completion token is scored, in float32 a chunk at a time; GQA without a K/V copy per head.

Run: python experiments/bench_prefix_grouper.py (equivalence, then the speed and memory tables in RESULTS.md).
"""

import math
import numbers
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "prefix_grouper"
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # the dtypes token ids may have
KERNELS = ("sdpa", "eager", "flex_attention")  # the kernels that take an explicit 4-D mask
FLEX_DEVICES = ("cuda",)  # where torch runs flex_attention (on CPU: no backward, and its compiled forward crashed)
SDPA_DROPS = ("softcap", "s_aux", "sinks")  # attention arguments sdpa ignores: soft-capping, attention sinks
UNGATHERED = ("position_bias", "indices", "block_indices")  # over the packed positions: no layout can carry them
PLAIN = "prefix_grouper_plain"  # on a config switched to "prefix_grouper": the kernel it had, for plain forwards


# ----------------------------------------------------------------------------------------------------------------
# The group layout: one row per prompt, [P][S_1]...[S_G][pad], and its two attention calls


@dataclass
class GroupLayout:
    """Where every token of a packed batch sits, its masks and its two attention calls. B prompts, N completions;
    T = longest packed row; P_max, S_max = longest prompt, completion; "flat" index of position t of row b: b*T + t."""

    input_ids: torch.Tensor  # (B, T) row b = [prompt_b][completion_b1]...[completion_bG][pad ...]
    position_ids: torch.Tensor  # (B, T) prompt 0..P_b-1; every completion restarts at P_b
    prefix_index: torch.Tensor  # (B, P_max) flat index of each prompt token, left-padded (pads point at 0)
    prefix_valid: torch.Tensor  # (B, P_max) bool, False on padding
    suffix_index: torch.Tensor  # (N, S_max) flat index of each completion token, right-padded
    suffix_valid: torch.Tensor  # (N, S_max) bool
    suffix_row: torch.Tensor  # (N,) the prompt (row) of each completion
    kernel: str = "sdpa"  # the attention kernel that does the two calls
    prompts_unpadded: bool = False  # all prompts equally long: sdpa can run the prompt call with is_causal=True
    calls: int = 0  # attention layers that used this layout (0 after a forward: the model ignored us)
    _masks: dict = field(default_factory=dict)

    def masks(self, dtype, repeats=1, window=None):
        """Additive masks, prefix (B, 1, P_max, P_max) and suffix (N, 1, S_max, P_max+S_max), once per forward and
        kind of layer. `window`: a sliding-window layer's size; `repeats`: each query row repeated (sdpa_shared_kv)."""
        key = (dtype, repeats, window)
        if key not in self._masks:
            p_max, s_max = self.prefix_valid.shape[1], self.suffix_valid.shape[1]
            device = self.prefix_valid.device
            # prompt token q sees prompt tokens k <= q that are not padding (left padding keeps the order); a
            # padding query sees itself, so no row is fully masked (a NaN there would leak into the gradients)
            causal_p = torch.ones(p_max, p_max, dtype=torch.bool, device=device).tril()
            diagonal = torch.eye(p_max, dtype=torch.bool, device=device)
            prefix_allowed = causal_p[None] & self.prefix_valid[:, None, :]  # (B, P_max, P_max)
            # completion token q sees its prompt, and its own completion's tokens k <= q
            causal_s = torch.ones(s_max, s_max, dtype=torch.bool, device=device).tril()
            sees_prompt = self.prefix_valid[self.suffix_row][:, None, :].expand(-1, s_max, -1)  # (N, S_max, P_max)
            sees_itself = causal_s[None] & self.suffix_valid[:, None, :]  # (N, S_max, S_max)
            suffix_allowed = torch.cat([sees_prompt, sees_itself], dim=2)  # (N, S_max, P_max + S_max)
            if window is not None:  # and only keys less than `window` positions back
                positions = self.position_ids.flatten()
                prefix_pos, suffix_pos = positions[self.prefix_index], positions[self.suffix_index]  # (B, P), (N, S)
                keys_pos = torch.cat([prefix_pos[self.suffix_row], suffix_pos], dim=1)  # (N, P_max + S_max)
                prefix_allowed &= in_window(prefix_pos, prefix_pos, window)
                suffix_allowed &= in_window(suffix_pos, keys_pos, window)
            prefix_allowed |= diagonal
            self._masks[key] = (additive(prefix_allowed, dtype, repeats), additive(suffix_allowed, dtype, repeats))
        return self._masks[key]

    def attention(self, query, key, value, attend, repeats=1, window=None):
        """The two calls for one layer: query (B, H, T, D), key/value (B, H_kv, T, D) -> the real tokens' outputs
        (tokens, H, D) and their flat positions (tokens,). attend(q, k, v, mask) runs the kernel (None: causal)."""
        query, key, value = flat_tokens(query), flat_tokens(key), flat_tokens(value)  # (B*T, h, D)
        gather = lambda x, index: take(x, index).transpose(1, 2)  # noqa: E731  (rows, h, columns, D)
        prefix_mask, suffix_mask = self.masks(query.dtype, repeats, window)
        # O_P = softmax(Q_P K_P^T scale + causal) V_P, once per prompt; when nothing is padded, sdpa's is_causal
        causal = self.kernel == "sdpa" and self.prompts_unpadded and window is None
        prompt_qkv = (gather(x, self.prefix_index) for x in (query, key, value))
        out_prompt = attend(*prompt_qkv, None if causal else prefix_mask)  # (B, P_max, H, D)
        # O_S_j = softmax(Q_S_j [K_P; K_S_j]^T scale + mask_j) [V_P; V_S_j]: each completion's keys gathered once,
        # its prompt's (shared: the same rows of `key` for the G completions) then its own: (N, S_max, H, D)
        keys, prefix_valid, suffix_valid = self.indexes  # once per forward, not per layer
        out_completion = attend(gather(query, self.suffix_index), gather(key, keys), gather(value, keys), suffix_mask)
        real = torch.cat(  # (tokens, H, D): the prompts' real tokens, then the completions'
            [take(out_prompt.flatten(0, 1), prefix_valid), take(out_completion.flatten(0, 1), suffix_valid)]
        )
        return real, self.flat_valid_index

    @cached_property
    def indexes(self):
        """(N, P_max + S_max) flat index of each completion's keys (its prompt's, left-padded, then its own), and where
        the real tokens sit in prefix_valid.flatten() (prompt tokens,) and in suffix_valid.flatten()."""
        keys = torch.cat([self.prefix_index[self.suffix_row], self.suffix_index], dim=1)
        return keys, self.prefix_valid.flatten().nonzero().squeeze(1), self.suffix_valid.flatten().nonzero().squeeze(1)

    @cached_property
    def flat_valid_index(self):
        """Flat positions of every real token: the prompts' then the completions', matching the attention output."""
        return torch.cat([self.prefix_index[self.prefix_valid], self.suffix_index[self.suffix_valid]])


def take(x, index):
    """x[index] along dim 0, as index_select: its backward (index_add) is much faster on CPU than x[index]'s."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


def flat_tokens(x):
    """(B, h, T, D) -> (B*T, h, D): every position of the packed batch, row-major."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def additive(allowed, dtype, repeats=1):
    """A bool mask (N, Q, K) as an additive mask (N, 1, Q*repeats, K): 0 = attend, the dtype's min (not -inf) = not."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None].repeat(1, 1, repeats, 1)


def check_ids(ids, what: str, non_empty=False):
    """One clear ValueError unless `ids` is a 1-D tensor of integer token ids (at least one if non_empty)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in INTEGERS or (non_empty and not len(ids)):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a {'non-empty ' * non_empty}1-D tensor of integer token ids, got {got}")


def check_vocabulary(ids, vocab_size):
    """One check over all the ids (one device sync); the culprits are looked up only on failure."""
    ids = torch.cat(ids)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"token ids {sorted({x for x in ids.tolist() if not 0 <= x < vocab_size})[:5]} are outside the "
            f"model's vocabulary [0, {vocab_size}): were the prompts tokenized with this model's tokenizer?"
        )


def vocabulary_size(model):
    """The model's vocabulary size; one ValueError for a model without weights (on the meta device)."""
    if model.device.type == "meta":
        raise ValueError(f"model: {type(model).__name__} is on the meta device, without weights: load them first")
    return model.get_input_embeddings().num_embeddings


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0 (the sampling temperature), got {temperature!r}")


def check_inputs(prompts, completions, vocab_size=None):
    """One clear ValueError for inputs of the wrong shape or type, or ids outside the vocabulary (if given)."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of 1-D tensors of token ids, one per group")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists: one list per prompt")
    for i, (prompt, group) in enumerate(zip(prompts, completions)):
        if not isinstance(group, (list, tuple)) or len(group) == 0:  # list(group) for a (G, L) tensor
            raise ValueError(f"the group of prompt {i} must be a non-empty list of 1-D tensors, got {group!r:.40}")
        check_ids(prompt, f"prompt {i}", non_empty=True)
        for j, completion in enumerate(group):
            check_ids(completion, f"completion {j} of prompt {i}")
    if all(completion.numel() == 0 for group in completions for completion in group):
        raise ValueError("every completion is empty: there is no token to score")
    if vocab_size is not None:
        check_vocabulary([*prompts, *(completion for group in completions for completion in group)], vocab_size)


def pack(prompts, completions, pad_token_id=0, kernel="sdpa", device=None, vocab_size=None) -> GroupLayout:
    """Pack prompts (list of 1-D id tensors) and their completions (list of lists of 1-D id tensors)."""
    check_inputs(prompts, completions, vocab_size)
    device = device or prompts[0].device
    num_rows, width = len(prompts), max(len(p) + sum(map(len, group)) for p, group in zip(prompts, completions))
    p_max, s_max = max(map(len, prompts)), max(len(c) for group in completions for c in group)
    num_completions = sum(map(len, completions))

    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(num_rows, width, dtype=torch.long)
    prefix_index = torch.zeros(num_rows, p_max, dtype=torch.long)
    prefix_valid = torch.zeros(num_rows, p_max, dtype=torch.bool)
    suffix_index = torch.zeros(num_completions, s_max, dtype=torch.long)
    suffix_valid = torch.zeros(num_completions, s_max, dtype=torch.bool)
    suffix_row = torch.zeros(num_completions, dtype=torch.long)
    n = 0
    for row, (prompt, group) in enumerate(zip(prompts, completions)):
        p = len(prompt)
        input_ids[row, :p] = prompt
        position_ids[row, :p] = torch.arange(p)
        prefix_index[row, p_max - p :] = row * width + torch.arange(p)  # left-padded
        prefix_valid[row, p_max - p :] = True
        start = p
        for completion in group:
            s = len(completion)
            input_ids[row, start : start + s] = completion
            position_ids[row, start : start + s] = torch.arange(p, p + s)  # restart at P: as in the naive row
            suffix_index[n, :s] = row * width + start + torch.arange(s)  # right-padded
            suffix_valid[n, :s] = True
            suffix_row[n] = row
            start, n = start + s, n + 1
    tensors = (input_ids, position_ids, prefix_index, prefix_valid, suffix_index, suffix_valid, suffix_row)
    unpadded = all(len(p) == p_max for p in prompts)
    return GroupLayout(*(t.to(device) for t in tensors), kernel=kernel, prompts_unpadded=unpadded)


# ----------------------------------------------------------------------------------------------------------------
# The attention function


def sdpa_shared_kv(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa for grouped-query attention without a copy of the keys and values per query head: the n query heads of a
    key/value head become n x T query rows of it (mask rows repeated). query (B, H, T, D), key/value (B, H_kv, S, D)."""
    batch, heads, width, head_dim = query.shape
    folded = query.reshape(batch, key.shape[1], heads // key.shape[1] * width, head_dim)  # head h = g*n + r -> g
    output = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )  # (B, H_kv, n*T, D)
    return output.reshape(batch, heads, width, head_dim).transpose(1, 2), None  # (B, T, H, D)


def kernel_function(module, kernel):
    if kernel == "eager":  # each model file has its own eager function (softcapping, sinks, ...): use the model's
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[kernel]


def prefix_grouper_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_grouper=None, **kwargs
):
    """transformers attention function: query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D). With
    `prefix_grouper=layout` (GroupLayout, TrieLayout) as the layout's calls, else as the kernel the model had."""
    if prefix_grouper is None:  # the kernel the model had, with the mask plain_mask built for it
        kernel = kernel_function(module, getattr(getattr(module, "config", None), PLAIN, "sdpa"))
        return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layout = prefix_grouper
    dropped = [k for k in UNGATHERED + (SDPA_DROPS if layout.kernel == "sdpa" else ()) if kwargs.get(k) is not None]
    if dropped:  # default_kernel picks eager for soft-capping and sinks
        raise ValueError(f"kernel={layout.kernel!r} cannot apply {type(module).__name__}'s {', '.join(dropped)}")
    layout.calls += 1
    batch, heads, width, head_dim = query.shape
    repeats = heads // key.shape[1] if layout.kernel == "sdpa" else 1
    window = kwargs.get("sliding_window")  # set on a sliding-window layer (Mistral, Qwen2, Gemma2/3 local layers)
    kwargs.pop("is_causal", None)  # causality is in our masks
    kernel = sdpa_shared_kv if repeats > 1 else kernel_function(module, layout.kernel)

    def attend(q, k, v, mask):  # the kernel on gathered rows; mask None: causal, nothing padded (transformers' sdpa)
        if mask is None:
            sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
            return sdpa(module, q, k, v, None, scaling=scaling, dropout=dropout, is_causal=True, **kwargs)[0]
        return kernel(module, q, k, v, mask, scaling=scaling, dropout=dropout, is_causal=False, **kwargs)[0]

    real, index = layout.attention(query, key, value, attend, repeats, window)  # (tokens, H, D), (tokens,)
    # scatter the real tokens back to their packed positions; padding stays 0
    output = query.new_zeros(batch * width, heads, head_dim).index_copy(0, index, real)
    return output.view(batch, width, heads, head_dim), None


def plain_mask(*args, config=None, **kwargs):
    """The mask transformers builds for a model on "prefix_grouper": the one the kernel it had expects."""
    return ALL_MASK_ATTENTION_FUNCTIONS[getattr(config, PLAIN, "sdpa")](*args, config=config, **kwargs)


AttentionInterface.register(NAME, prefix_grouper_attention)
AttentionMaskInterface.register(NAME, plain_mask)


# ----------------------------------------------------------------------------------------------------------------
# Log-probs: shared prefix and the naive reference


@contextmanager
def use_prefix_grouper(model):
    """The model's attention (a VLM's language model's) is "prefix_grouper" inside, its own kernel outside; a model
    that trains with gradient checkpointing stays on it: the backward recomputes the forward and must find it."""
    if not getattr(model, "_supports_attention_backend", False):  # its attention is not in AttentionInterface
        raise ValueError(
            f"prefix_grouper cannot replace {type(model).__name__}'s attention: use repeated_prefix_logprobs"
        )
    check_layer_types(model.config)
    config, composite = text_config(model.config), text_config(model.config) is not model.config
    previous = config._attn_implementation
    checkpointing = model.training and any(getattr(layer, "gradient_checkpointing", False) for layer in model.modules())
    if checkpointing and previous not in (*KERNELS, NAME):
        raise ValueError(f"model: gradient checkpointing would recompute {previous} attention without the layout")
    if previous != NAME:
        setattr(config, PLAIN, previous)
    model.set_attn_implementation({"text_config": NAME} if composite else NAME)
    try:
        yield
    finally:
        if not checkpointing and previous != NAME:
            model.set_attn_implementation({"text_config": previous} if composite else previous)
            delattr(config, PLAIN)  # not saved with the model


def text_config(config):
    """The language model's config (a VLM's text_config, or the config itself)."""
    return getattr(config, "text_config", None) or config


@contextmanager
def lm_head_sees_only(model, index):
    """Inside, the LM head sees hidden[index] (1, tokens, H) only (no logits where nothing is scored): what the model
    does to the logits after the head (soft-capping, scaling) still applies."""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda head, args: (args[0][index][None],))
    try:
        yield
    finally:
        hook.remove()


def check_layer_types(config):
    """Full and sliding-window attention are what the masks express: any other kind of layer is refused."""
    config = text_config(config)
    unsupported = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if unsupported or getattr(config, "attention_chunk_size", None):
        kinds = ", ".join(sorted(unsupported)) or "chunked_attention"
        raise ValueError(
            f"prefix_grouper handles full and sliding-window attention, not {kinds}: use repeated_prefix_logprobs"
        )


def logprobs_from_logits(logits, targets, temperature=1.0, chunk_bytes=2**28):
    """log softmax(logits / temperature) at `targets`, and each distribution's entropy (both differentiable); logits
    (..., V). The float32 copy of the logits (bf16 upcast, as TRL does) is made `chunk_bytes` at a time and recomputed
    per chunk in the backward, so nothing (..., V)-sized is kept besides `logits` (log_softmax: 16 bytes a logit)."""
    check_temperature(temperature)
    if targets.shape != logits.shape[:-1] or targets.dtype not in INTEGERS:
        raise ValueError(
            f"targets must be integer ids of shape {logits.shape[:-1]}, got {targets.dtype} {targets.shape}"
        )
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)  # (N, V), (N,)
    rows = max(1, chunk_bytes // (4 * logits.size(-1)))
    pieces = []  # (log-probs, entropies) of each chunk
    for chunk, chunk_targets in zip(flat_logits.split(rows), flat_targets.split(rows)):
        if chunk.requires_grad:  # recomputed in the backward: no float32 chunk is kept for it
            pieces.append(checkpoint(chunk_logprobs, chunk, chunk_targets, temperature, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(chunk, chunk_targets, temperature))
    return tuple(torch.cat(values).view(targets.shape) for values in zip(*pieces))


def chunk_logprobs(logits, targets, temperature):
    """log softmax(z)[y] = z_y - logsumexp(z), and H = logsumexp(z) - sum_v p_v z_v, with z = logits / temperature
    in float32 (float64 stays). (rows, V) -> (rows,), (rows,)"""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (rows, V)
    log_normaliser = z.logsumexp(dim=-1)  # (rows,)
    logps = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normaliser
    # a -inf logit (never sampled) has p_v = 0: masked, so that no -inf or NaN reaches the backward either
    entropy = log_normaliser - (z.softmax(dim=-1) * z.masked_fill(z == float("-inf"), 0.0)).sum(dim=-1)
    return logps, entropy


def default_kernel(model, kernel=None):
    """The kernel of the two calls: `kernel` if given, else the model's own if it can, else sdpa, else eager (the
    model's own function: it applies all its attention does). One ValueError for a kernel that cannot be exact here."""
    config, name = text_config(model.config), type(model).__name__
    own = getattr(config, PLAIN, "sdpa") if config._attn_implementation == NAME else config._attn_implementation
    sinks = any(getattr(module, "sinks", None) is not None for module in model.modules())
    extras = sinks or getattr(config, "attn_logit_softcapping", None)
    problems = {  # why each kernel cannot compute exactly here (None: it can)
        "sdpa": extras and f"kernel='sdpa' would drop {name}'s soft-capping or attention sinks: use kernel='eager'",
        "eager": None,
        "flex_attention": model.device.type not in FLEX_DEVICES
        and f"kernel='flex_attention' runs on {'/'.join(FLEX_DEVICES)} only with torch {torch.__version__}: use sdpa",
    }
    if kernel is not None and problems.get(kernel, True):
        needs = f"kernel={kernel!r}: prefix_grouper needs a kernel that takes an explicit attention mask {KERNELS}"
        raise ValueError(problems.get(kernel) or needs)
    return kernel or next(k for k in (own, "sdpa", "eager") if k in problems and not problems[k])


def packed_logits(model, layout, scored, **model_inputs):
    """Logits (tokens, V) at the `scored` (row, position) pairs of one forward of a packed layout (GroupLayout or
    TrieLayout) through the prefix_grouper attention function."""
    with use_prefix_grouper(model), lm_head_sees_only(model, scored):
        inputs = dict(input_ids=layout.input_ids, position_ids=layout.position_ids, prefix_grouper=layout)
        logits = model(**inputs, use_cache=False, **model_inputs).logits[0]
    if layout.calls == 0:  # its attention ignored the layout: the result would be wrong
        raise ValueError(f"{type(model).__name__} never called the prefix_grouper attention function")
    return logits


def shared_prefix_logprobs(
    model, prompts, completions, temperature=1.0, kernel=None, return_entropy=False, prompt_inputs=None, suppress_ids=()
):
    """Per-token log-probs of each completion given its prompt, each prompt encoded once. prompts: list of B 1-D id
    tensors; completions: for each prompt a list of 1-D id tensors (no padding). Returns for each prompt a list of
    1-D log-prob tensors, one per completion (and the entropies, if asked); differentiable in train mode. kernel:
    sdpa | eager | flex_attention (default_kernel). prompt_inputs: more model inputs, one row per prompt (a VLM's
    pixel_values). suppress_ids: ids given probability 0, as generate's suppress_tokens does when sampling."""
    check_temperature(temperature)
    kernel = default_kernel(model, kernel)
    layout = pack(prompts, completions, kernel=kernel, device=model.device, vocab_size=vocabulary_size(model))
    # each completion token is predicted by the token before it, its first by the last prompt token
    before = torch.cat([layout.prefix_index[layout.suffix_row, -1:], layout.suffix_index[:, :-1]], dim=1)  # (N, S_max)
    predictors = before[layout.suffix_valid]  # (tokens,) flat index b*T + t, in the completions' order
    targets = layout.input_ids.flatten()[layout.suffix_index[layout.suffix_valid]]  # (tokens,)
    row, column = predictors // layout.input_ids.size(1), predictors % layout.input_ids.size(1)
    # logits only at the positions that predict a completion token: the model keeps the columns that do so in
    # any row (logits_to_keep), and the LM head gets exactly the (row, column) pairs that do
    keep = torch.unique(column)  # sorted (K,)
    scored = (row, torch.searchsorted(keep, column))  # into (B, K)
    logits = packed_logits(model, layout, scored, logits_to_keep=keep, **(prompt_inputs or {}))  # (tokens, V)
    if suppress_ids:
        logits = logits.index_fill(-1, torch.tensor(list(suppress_ids), device=logits.device), float("-inf"))
    logps, entropy = logprobs_from_logits(logits, targets, temperature)
    sizes = [len(c) for group in completions for c in group]
    return unflatten(logps, sizes, completions, entropy if return_entropy else None)


def grouped_batch_logprobs(model, batch, temperature=1.0, prompt_inputs=None, suppress_ids=()):
    """shared_prefix_logprobs on a padded batch (grpo.py's generate_completions: prompt_ids, prompt_mask,
    completion_ids, completion_mask, each (B, ·)): consecutive rows with the same prompt (and the same rows of
    prompt_inputs, a VLM's pixel_values) are one group. Returns the log-probs and entropies (B, C), 0 on padding."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P)
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"].bool()  # (B, C)
    prompt_inputs = prompt_inputs or {}
    rows = torch.cat([prompt_ids, prompt_mask, *(x.flatten(1).float() for x in prompt_inputs.values())], dim=1)
    _, sizes = torch.unique_consecutive(rows, dim=0, return_counts=True)  # (groups,)
    firsts = sizes.cumsum(0) - sizes  # the first row of each group
    prompts = [ids[mask.bool()] for ids, mask in zip(prompt_ids[firsts], prompt_mask[firsts])]
    completions = [ids[mask] for ids, mask in zip(completion_ids, completion_mask)]
    groups = [completions[first : first + n] for first, n in zip(firsts.tolist(), sizes.tolist())]
    inputs = {name: x[firsts] for name, x in prompt_inputs.items()}
    nested = shared_prefix_logprobs(
        model, prompts, groups, temperature, return_entropy=True, prompt_inputs=inputs, suppress_ids=suppress_ids
    )
    logps, entropy = (torch.cat([x for group in values for x in group]) for values in nested)  # (tokens,) each
    zeros = torch.zeros(completion_mask.shape, device=model.device)
    # back to (B, C): the flat values fill the mask's ones in row-major order
    return zeros.masked_scatter(completion_mask, logps), zeros.masked_scatter(completion_mask, entropy)


def repeated_prefix_logprobs(model, prompts, completions, temperature=1.0, return_entropy=False, prompt_inputs=None):
    """The naive reference: one row per completion, [left-padded prompt][right-padded completion]; prompt_inputs'
    rows are repeated for each completion of their prompt."""
    check_temperature(temperature)
    check_inputs(prompts, completions, vocabulary_size(model))
    rows = [(prompt, completion) for prompt, group in zip(prompts, completions) for completion in group]
    p_max, s_max = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    input_ids = torch.zeros(len(rows), p_max + s_max, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), p_max + s_max, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        input_ids[i, p_max - len(prompt) : p_max + len(completion)] = torch.cat([prompt, completion])
        attention_mask[i, p_max - len(prompt) : p_max + len(completion)] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0
    group_sizes = torch.tensor([len(group) for group in completions])  # a prompt input repeated for its completions
    more = {k: v.repeat_interleave(group_sizes.to(v.device), dim=0) for k, v in (prompt_inputs or {}).items()}
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=s_max + 1,
        **more,
    ).logits[:, :-1]  # (N, S_max, V): position P_max - 1 + t predicts completion token t
    valid = attention_mask[:, p_max:].bool()  # (N, S_max)
    logps, entropy = logprobs_from_logits(logits[valid], input_ids[:, p_max:][valid], temperature)
    sizes = [len(c) for _, c in rows]
    return unflatten(logps, sizes, completions, entropy if return_entropy else None)


def unflatten(values, sizes, completions, entropy=None):
    """Split a flat (tokens,) tensor into [[per completion] per prompt]."""
    pieces = list(values.split(sizes))
    nested = [[pieces.pop(0) for _ in group] for group in completions]
    return nested if entropy is None else (nested, unflatten(entropy, sizes, completions))


# ----------------------------------------------------------------------------------------------------------------
# Extensions: sliding windows, tries (Tree-GRPO), the shared prefill for generation


def in_window(query_positions, key_positions, window):
    """(N, Q, K) bool: a sliding-window layer's query at position q sees keys at k > q - window (as transformers)."""
    return key_positions[:, None, :] > query_positions[:, :, None] - window


@dataclass
class TrieLayout:
    """Sequences that share prefixes, packed as tries: every distinct prefix is one token (a node) of a row, at the
    position of its depth. Attention runs over segments, the unbranched runs of nodes between branch points, each
    seeing its ancestors and itself causally; segments with A ancestors and S nodes share one call and one mask.
    B rows (one trie each), T = most nodes in a row; "flat" index of position t of row b: b*T + t."""

    input_ids: torch.Tensor  # (B, T) each node's token, padded with 0
    position_ids: torch.Tensor  # (B, T) each node's depth: its position in every sequence that passes through it
    buckets: list  # per (A, S): (A, (n, S) flat index of the segments' nodes, (n, A+S) of their ancestors and nodes)
    paths: list  # for each sequence: (row, the node of each of its tokens)
    kernel: str = "sdpa"
    calls: int = 0
    _masks: dict = field(default_factory=dict)

    def masks(self, dtype, repeats=1, window=None):
        """Per bucket the additive mask its n segments share, (n, 1, S*repeats, A+S) as a view of one (flex_attention
        indexes it by segment); None where sdpa's is_causal does (A = 0, no sliding `window`)."""
        key = (dtype, repeats, window)
        if key not in self._masks:
            self._masks[key] = []
            for ancestors, nodes, key_index in self.buckets:
                key_depth = torch.arange(key_index.shape[1], device=key_index.device)  # (A+S,)
                query_depth = key_depth[ancestors:]  # (S,)
                allowed = key_depth[None, :] <= query_depth[:, None]  # (S, A+S)
                if window is not None:
                    allowed &= in_window(query_depth[None], key_depth[None], window)[0]
                causal = ancestors == 0 and window is None and self.kernel == "sdpa"
                mask = None if causal else additive(allowed[None], dtype, repeats).expand(len(nodes), -1, -1, -1)
                self._masks[key].append(mask)
        return self._masks[key]

    def attention(self, query, key, value, attend, repeats=1, window=None):
        """One call per bucket: O_seg = softmax(Q_seg [K_anc; K_seg]^T scale + mask) [V_anc; V_seg]. As
        GroupLayout.attention: returns the nodes' outputs (nodes, H, D) and their flat positions (nodes,)."""
        query, key, value = flat_tokens(query), flat_tokens(key), flat_tokens(value)  # (B*T, h, D)
        gather = lambda x, index: take(x, index).transpose(1, 2)  # noqa: E731  (n, h, S or A+S, D)
        masks = self.masks(query.dtype, repeats, window)
        out = [
            attend(gather(query, nodes), gather(key, keys), gather(value, keys), mask).flatten(0, 1)
            for (_, nodes, keys), mask in zip(self.buckets, masks)
        ]
        return torch.cat(out), torch.cat([nodes.flatten() for _, nodes, _ in self.buckets])


def pack_trie(sequences, kernel="sdpa", device=None, max_row_tokens=4096, segment_tokens=512) -> TrieLayout:
    """Pack 1-D token tensors as tries, in sorted order (sharing a prefix: neighbours); a new row starts once a row
    holds `max_row_tokens` nodes, and a segment below a branch is cut in pieces of `segment_tokens` (smaller masks)."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i].tolist())
    rows, paths = [], [None] * len(sequences)
    for i in order:
        if not rows or len(rows[-1]["tokens"]) >= max_row_tokens:
            rows.append({"tokens": [], "parents": [], "depths": [], "node_of": {}})
        row, parent, path = rows[-1], -1, []
        for depth, token in enumerate(sequences[i].tolist()):
            if (parent, token) not in row["node_of"]:
                row["node_of"][parent, token] = len(row["tokens"])
                row["tokens"].append(token)
                row["parents"].append(parent)
                row["depths"].append(depth)
            parent = row["node_of"][parent, token]
            path.append(parent)
        paths[i] = (len(rows) - 1, path)
    width = max(len(row["tokens"]) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    buckets = {}  # (A, S) -> the flat indices [A ancestors; S own nodes] of each segment of that shape
    for b, row in enumerate(rows):
        n = len(row["tokens"])
        input_ids[b, :n], position_ids[b, :n] = torch.tensor(row["tokens"]), torch.tensor(row["depths"])
        children = [[] for _ in range(n)]
        for node, parent in enumerate(row["parents"]):
            if parent >= 0:
                children[parent].append(node)
        starts = [node for node, parent in enumerate(row["parents"]) if parent < 0 or len(children[parent]) > 1]
        for node in starts:  # a segment runs from a root or branch to the next branch point or leaf
            ancestors, up = [], row["parents"][node]
            while up >= 0:
                ancestors.append(b * width + up)
                up = row["parents"][up]
            own = [node]
            while len(children[own[-1]]) == 1:
                own.append(children[own[-1]][0])
            ancestors, own = ancestors[::-1], [b * width + x for x in own]
            piece = segment_tokens if ancestors else len(own)  # a root's run is one causal call, uncut
            for i in range(0, len(own), piece):  # each piece's ancestors: the segment's, then the earlier pieces
                keys = ancestors + own[: i + piece]
                buckets.setdefault((len(ancestors) + i, len(keys) - len(ancestors) - i), []).append(keys)
    device = device or sequences[0].device
    buckets = [(a, torch.tensor(keys, device=device)) for (a, _), keys in sorted(buckets.items())]
    buckets = [(a, keys[:, a:], keys) for a, keys in buckets]  # (A, nodes (n, S), keys (n, A+S))
    return TrieLayout(input_ids.to(device), position_ids.to(device), buckets, paths, kernel=kernel)


def trie_logprobs(model, sequences, starts, temperature=1.0, kernel=None, return_entropy=False):
    """Log-probs of sequences[i][starts[i]:] for each i (1-D tensors), equal to a forward of each sequence alone, with
    every distinct prefix encoded once (pack_trie). Sequences may repeat, be prefixes of one another, and start inside
    a shared part. Differentiable in train mode. Returns a list of 1-D tensors (and the entropies, if asked)."""
    check_temperature(temperature)
    if len(sequences) != len(starts) or not sequences:
        raise ValueError(f"need one start per sequence, and a sequence, got {len(sequences)} and {len(starts)} starts")
    for i, (sequence, start) in enumerate(zip(sequences, starts)):
        check_ids(sequence, f"sequence {i}")
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 1 <= start <= len(sequence):
            raise ValueError(f"starts[{i}]: need an integer 1 <= start <= its length {len(sequence)}, got {start!r}")
    check_vocabulary(list(sequences), vocabulary_size(model))
    layout = pack_trie(sequences, kernel=default_kernel(model, kernel), device=model.device)
    # token t is node path[t], predicted by its parent path[t-1]: each scored node goes through the LM head and the
    # log-softmax once, however many sequences share it; its log-prob is then copied to each of them
    scored = [  # (row, parent, node) of each scored token
        (row, path[t - 1], path[t]) for (row, path), start in zip(layout.paths, starts) for t in range(start, len(path))
    ]
    if not scored:  # every start at the end: nothing to score
        empty = [sequence.new_zeros(0, dtype=torch.float32) for sequence in sequences]
        return (empty, empty) if return_entropy else empty
    nodes = sorted(set(scored))
    rows, parents, children = (torch.tensor(x, device=model.device) for x in zip(*nodes))  # (K,) each
    logits = packed_logits(model, layout, (rows, parents))  # (K unique scored nodes, V)
    logps, entropy = logprobs_from_logits(logits, layout.input_ids[rows, children], temperature)  # (K,), (K,)
    where = {node: k for k, node in enumerate(nodes)}
    index = torch.tensor([where[node] for node in scored], device=model.device)  # (tokens,)
    logps, entropy = take(logps, index), take(entropy, index)
    sizes = [len(sequence) - start for sequence, start in zip(sequences, starts)]
    return (list(logps.split(sizes)), list(entropy.split(sizes))) if return_entropy else list(logps.split(sizes))


def shared_prompt_cache(model, inputs, copies):
    """For generate: the KV cache of the prompts but their last token, once per run of `copies` equal rows (a group)
    and repeated for its rows: the same samples as G prefills. None where nothing is shared (one copy or token)."""
    check_vocabulary(list(inputs["input_ids"]), vocabulary_size(model))
    rows = torch.cat([inputs["input_ids"], inputs["attention_mask"]], dim=1)  # (B*copies, 2P)
    grouped = isinstance(copies, numbers.Integral) and copies >= 1 and len(rows) % copies == 0
    if not grouped or (rows.view(-1, copies, rows.shape[1]) != rows[::copies, None]).any():
        raise ValueError(f"copies={copies!r}: need an integer >= 1, the rows in runs of that many equal prompts")
    if copies < 2 or inputs["input_ids"].size(1) < 2:
        return None
    ids, mask = inputs["input_ids"][::copies, :-1], inputs["attention_mask"][::copies, :-1]  # (B, P-1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate counts them: real tokens from 0
    output = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache = output.cache if "cache" in output else output.past_key_values  # renamed `cache` in transformers 5.2x
    cache.batch_repeat_interleave(copies)  # (B*copies, ...) in the rows' order
    return cache
