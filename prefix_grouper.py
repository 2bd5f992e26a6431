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

Tries (ours; the paper shares one prompt). A Tree-GRPO tree's leaves share their prompt and every step before
they branch. `trie_logprobs(model, sequences, starts)` makes each distinct prefix one node of a packed row, at
the position of its depth, and runs attention per segment (an unbranched run of nodes between branch points):

    O_seg = softmax(Q_seg [K_ancestors; K_seg]^T * scale + mask) [V_ancestors; V_seg]

where the mask lets a node see its ancestors and the nodes before it in its segment. The two calls above are the
case of one prompt segment and G completion segments. Ideal saving: leaf tokens / distinct prefixes.

What we do differently from the official package (https://github.com/johncaged/PrefixGrouper):
- Exact on every backend. The official function hands 2-D padding masks to the kernel and relies on flash-
  attention's bottom-right causal alignment: with `sdpa` the result is silently wrong and `eager` raises. We
  build explicit 4-D additive masks, so `sdpa`, `eager` and `flex_attention` kernels give the naive result on CPU
  and GPU. Masked positions get the dtype's most negative number, not -inf, so a fully padded row gives no NaN.
  Flash kernels take no explicit mask and are refused with a clear error.
- Wired in like verl: `prefix_grouper_attention` is registered with `AttentionInterface` as "prefix_grouper";
  the packed layout travels as a keyword argument, `model(..., prefix_grouper=layout)`, down to every attention
  layer. Without it the function is plain sdpa, so a model left on "prefix_grouper" still generates.
- Logits only where a completion token is scored: the LM head gets exactly those hidden states (one per scored
  token), so no prompt position reaches it: this matters for memory with a 150k-token vocabulary. Log-probs come
  from float32 logits a chunk at a time (`logprobs_from_logits`), never a full float32 copy.
- Grouped-query attention without copying keys and values per query head: with sdpa and a mask, the query heads
  that share a key/value head are folded into one head's query rows (`sdpa_shared_kv`), where transformers'
  sdpa would repeat K/V per head in every layer.
- Sliding-window and hybrid local/global models (Mistral, Qwen2 with sliding layers, Gemma2 with its soft-capped
  eager attention, Gemma3): a sliding layer's masks keep keys less than `window` positions back, counted in each
  token's own positions (a completion's restart after its prompt), so the result equals the naive forward.
- Not supported: chunked or linear attention layers, KV caches (scoring and training only), models whose
  attention does not go through transformers' AttentionInterface (each raises a clear error).

Run:
    python prefix_grouper.py                        # checks equivalence on the tiny model, then the CPU benchmark
    python prefix_grouper.py --device cuda --model qwen2.5-0.5b --dtype bfloat16   # the GPU benchmark

Results (the speed and memory table on CPU; GPU not measured yet) are in RESULTS.md.
"""

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "prefix_grouper"
KERNELS = ("sdpa", "eager", "flex_attention")  # the kernels that take an explicit 4-D mask


# ----------------------------------------------------------------------------------------------------------------
# Packing: one row per prompt, [P][S_1]...[S_G][pad]


@dataclass
class GroupLayout:
    """Where every prompt and completion token of a packed batch sits, and the masks of the two attention calls.

    B prompts, N completions in all; T = longest packed row; P_max, S_max = longest prompt, completion.
    "flat" indices count positions of the (B, T) batch row-major: b * T + t.
    """

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
        """Additive masks (0 = attend, dtype min = not): prefix (B, 1, P_max, P_max), suffix (N, 1, S_max, P_max+S_max).

        `window`: a sliding-window layer's size: a query at position q sees keys at positions k > q - window (as
        transformers' sliding_window_overlay), with each token's own position ids (a completion's restart after its
        prompt, as in the naive row). `repeats`: each query row repeated, for sdpa_shared_kv. Made once per forward
        and kind of layer, not once per layer. Padding queries' outputs are thrown away; each still sees one key
        (itself) so its softmax stays finite.
        """
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
                prefix_allowed &= prefix_pos[:, None, :] > prefix_pos[:, :, None] - window
                suffix_allowed &= keys_pos[:, None, :] > suffix_pos[:, :, None] - window
            prefix_allowed |= diagonal
            self._masks[key] = (additive(prefix_allowed, dtype, repeats), additive(suffix_allowed, dtype, repeats))
        return self._masks[key]

    @cached_property
    def prefix_valid_index(self):
        """(prompt tokens,) where the real tokens sit in prefix_valid.flatten()."""
        return self.prefix_valid.flatten().nonzero().squeeze(1)

    @cached_property
    def suffix_valid_index(self):
        """(completion tokens,) where the real tokens sit in suffix_valid.flatten()."""
        return self.suffix_valid.flatten().nonzero().squeeze(1)

    @cached_property
    def flat_valid_index(self):
        """Flat positions of every real token: the prompts' then the completions', matching the attention output."""
        return torch.cat([self.prefix_index[self.prefix_valid], self.suffix_index[self.suffix_valid]])


def take(x, index):
    """x[index] along dim 0 for an integer index of any shape, as index_select: its backward is an index_add,
    much faster on CPU than the accumulating index_put that x[index]'s backward runs."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


def additive(allowed, dtype, repeats=1):
    """A bool mask (N, Q, K) as the kernels' additive mask (N, 1, Q*repeats, K): 0 = attend, the dtype's most
    negative number = not (not -inf, so that no row turns into NaN); each query row repeated for sdpa_shared_kv."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None].repeat(1, 1, repeats, 1)


def check_inputs(prompts, completions, vocab_size=None):
    """One clear error for inputs of the wrong shape or type; token ids are checked against vocab_size if given."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of 1-D tensors of token ids, one per group")
    if len(prompts) != len(completions):
        raise ValueError(
            f"{len(prompts)} prompts but {len(completions)} completion lists: pass one list of completions per prompt"
        )
    for i, (prompt, group) in enumerate(zip(prompts, completions)):
        if isinstance(group, torch.Tensor):
            raise ValueError(
                f"the group of prompt {i} is a tensor; pass a list of 1-D tensors, one per completion "
                f"(e.g. list(group) for a (G, L) tensor without padding)"
            )
        if not isinstance(group, (list, tuple)) or len(group) == 0:
            raise ValueError(f"prompt {i} has an empty group: every prompt needs a list of at least one completion")
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.numel() == 0:
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids, got {shape}")
        for j, completion in enumerate(group):
            if not isinstance(completion, torch.Tensor) or completion.dim() != 1:
                raise ValueError(f"completion {j} of prompt {i} must be a 1-D tensor of token ids")
    if all(completion.numel() == 0 for group in completions for completion in group):
        raise ValueError("every completion is empty: there is no token to score")
    if vocab_size is not None:  # one check over all ids (one device sync), the culprit looked up only on failure
        ids = torch.cat([*prompts, *(completion for group in completions for completion in group)])
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(
                f"token ids {sorted({x for x in ids.tolist() if not 0 <= x < vocab_size})[:5]} are outside the "
                f"model's vocabulary [0, {vocab_size}): were the prompts tokenized with this model's tokenizer?"
            )


def pack(prompts, completions, pad_token_id=0, kernel="sdpa", device=None, vocab_size=None) -> GroupLayout:
    """Pack prompts (list of 1-D id tensors) and their completions (list of lists of 1-D id tensors); token ids are
    checked against vocab_size if given."""
    check_inputs(prompts, completions, vocab_size)
    if kernel not in KERNELS:
        raise ValueError(
            f"prefix_grouper needs a kernel that takes an explicit attention mask ({', '.join(KERNELS)}), "
            f"got {kernel!r}. Flash-attention kernels take only padding masks: load the model with "
            f"attn_implementation='sdpa' (or pass kernel='sdpa')."
        )
    device = device or prompts[0].device
    row_lengths = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, completions)]
    num_rows, width = len(prompts), max(row_lengths)
    p_max = max(len(p) for p in prompts)
    s_max = max(len(c) for group in completions for c in group)
    num_completions = sum(len(group) for group in completions)

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


@dataclass
class TrieLayout:
    """Sequences that share prefixes, packed as tries: every distinct prefix is one token (a node) of a row, at the
    position of its depth. Attention runs over segments, the unbranched runs of nodes between branch points: a
    segment's queries see its ancestors' keys and its own, causally (the two calls of a GroupLayout are the case of
    one prompt segment and its completions). Every distinct token passes the MLP and projections once.

    B rows (runs of sequences in sorted order, one trie each), T = most nodes in a row; N segments, of at most
    S_max nodes with at most K_max - S_max ancestors. "flat" indices count positions of the (B, T) batch: b * T + t.
    """

    input_ids: torch.Tensor  # (B, T) each node's token, padded with 0
    position_ids: torch.Tensor  # (B, T) each node's depth: its position in every sequence that passes through it
    query_index: torch.Tensor  # (N, S_max) flat index of each node of a segment, right-padded
    query_valid: torch.Tensor  # (N, S_max) bool
    key_index: torch.Tensor  # (N, K_max) flat index of the segment's ancestors, then its own nodes, right-padded
    key_valid: torch.Tensor  # (N, K_max) bool
    paths: list  # for each sequence: (row, the node of each of its tokens)
    kernel: str = "sdpa"
    calls: int = 0
    _masks: dict = field(default_factory=dict)

    def masks(self, dtype, repeats=1, window=None):
        """The additive mask (N, 1, S_max*repeats, K_max): a node sees the keys not deeper than itself (its
        ancestors and itself; a sliding-window layer only those less than `window` positions back)."""
        key = (dtype, repeats, window)
        if key not in self._masks:
            depth = self.position_ids.flatten()
            query_depth, key_depth = depth[self.query_index], depth[self.key_index]  # (N, S_max), (N, K_max)
            allowed = self.key_valid[:, None, :] & (key_depth[:, None, :] <= query_depth[:, :, None])
            if window is not None:
                allowed &= key_depth[:, None, :] > query_depth[:, :, None] - window
            allowed[:, :, 0] |= ~self.query_valid  # a padding query sees one key: its softmax stays finite
            self._masks[key] = additive(allowed, dtype, repeats)
        return self._masks[key]


def pack_trie(sequences, kernel="sdpa", device=None, max_row_tokens=4096, segment_tokens=128) -> TrieLayout:
    """Pack 1-D token tensors as tries. Sequences are taken in sorted order, so that those sharing a prefix are
    neighbours, and a new row starts once a row holds `max_row_tokens` nodes (a prefix two rows share is then
    encoded in both)."""
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
    segments = []  # (flat indices of the ancestors, flat indices of the segment's nodes)
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
            for i in range(0, len(own), segment_tokens):  # a long run in pieces: less padding to the longest
                segments.append((ancestors + own[:i], own[i : i + segment_tokens]))
    s_max = max(len(own) for _, own in segments)
    k_max = max(len(ancestors) + len(own) for ancestors, own in segments)
    query_index = torch.zeros(len(segments), s_max, dtype=torch.long)
    query_valid = torch.zeros(len(segments), s_max, dtype=torch.bool)
    key_index = torch.zeros(len(segments), k_max, dtype=torch.long)
    key_valid = torch.zeros(len(segments), k_max, dtype=torch.bool)
    for j, (ancestors, own) in enumerate(segments):
        query_index[j, : len(own)], query_valid[j, : len(own)] = torch.tensor(own), True
        keys = ancestors + own
        key_index[j, : len(keys)], key_valid[j, : len(keys)] = torch.tensor(keys), True
    device = device or sequences[0].device
    tensors = (input_ids, position_ids, query_index, query_valid, key_index, key_valid)
    return TrieLayout(*(t.to(device) for t in tensors), paths, kernel=kernel)


# ----------------------------------------------------------------------------------------------------------------
# The attention function


def sdpa_shared_kv(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa for grouped-query attention without a copy of the keys and values per query head: the n query heads
    that share a key/value head become n x T query rows of that head (attention treats query rows independently),
    with the mask's rows repeated to match (GroupLayout.masks). query (B, H, T, D), key/value (B, H_kv, S, D)."""
    batch, heads, width, head_dim = query.shape
    folded = query.reshape(batch, key.shape[1], heads // key.shape[1] * width, head_dim)  # head h = g*n + r -> g
    output = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )  # (B, H_kv, n*T, D)
    return output.reshape(batch, heads, width, head_dim).transpose(1, 2), None  # (B, T, H, D)


def kernel_function(module, kernel):
    if kernel == "eager":  # each model file has its own eager function (softcapping, sinks, ...): use the model's
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward; use kernel='sdpa'")
        return eager
    return ALL_ATTENTION_FUNCTIONS[kernel]


def prefix_grouper_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_grouper=None, **kwargs
):
    """transformers attention function. query (B, H, T, D), key/value (B, H_kv, T, D) -> output (B, T, H, D).

    With `prefix_grouper=layout` (a GroupLayout passed to `model(...)`), attention runs as the two grouped calls;
    without it, as plain sdpa with the mask transformers built.
    """
    if prefix_grouper is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)  # fmt: skip
    layout = prefix_grouper
    layout.calls += 1
    batch, heads, width, head_dim = query.shape
    repeats = heads // key.shape[1] if layout.kernel == "sdpa" else 1
    window = kwargs.get("sliding_window")  # set on a sliding-window layer (Mistral, Qwen2, Gemma2/3 local layers)
    kwargs.pop("is_causal", None)  # causality is in our masks
    attend = sdpa_shared_kv if repeats > 1 else kernel_function(module, layout.kernel)
    if isinstance(layout, TrieLayout):  # O_seg = softmax(Q_seg [K_ancestors; K_seg]^T scale + mask) [V_anc; V_seg]
        flat = lambda x: x.transpose(1, 2).reshape(batch * width, x.shape[1], head_dim)  # noqa: E731  (B*T, h, D)
        gather = lambda x, index: flat(x)[index].transpose(1, 2)  # noqa: E731  (N, h, S_max or K_max, D)
        out, _ = attend(module, gather(query, layout.query_index), gather(key, layout.key_index),
                        gather(value, layout.key_index), layout.masks(query.dtype, repeats, window), scaling=scaling,
                        dropout=dropout, is_causal=False, **kwargs)  # (N, S_max, H, D)  # fmt: skip
        real, index = out[layout.query_valid], layout.query_index[layout.query_valid]  # (nodes, H, D), (nodes,)
        output = query.new_zeros(batch * width, heads, head_dim).index_copy(0, index, real)
        return output.view(batch, width, heads, head_dim), None

    def split(x):  # (B, h, T, D) -> prompt part (B, h, P_max, D) and completion part (N, h, S_max, D)
        flat = x.transpose(1, 2).reshape(batch * width, x.shape[1], head_dim)  # (B*T, h, D)
        return take(flat, layout.prefix_index).transpose(1, 2), take(flat, layout.suffix_index).transpose(1, 2)

    q_prompt, q_completion = split(query)
    k_prompt, k_completion = split(key)
    v_prompt, v_completion = split(value)
    # each completion attends to its prompt's keys (shared, repeated per completion) and then its own
    k_completion = torch.cat([take(k_prompt, layout.suffix_row), k_completion], dim=2)  # (N, H_kv, P_max+S_max, D)
    v_completion = torch.cat([take(v_prompt, layout.suffix_row), v_completion], dim=2)  # (N, H_kv, P_max+S_max, D)
    # sdpa with grouped-query attention: fold the query heads instead of repeating K/V per head (sdpa_shared_kv)
    prefix_mask, suffix_mask = layout.masks(query.dtype, repeats, window)
    # O_P = softmax(Q_P K_P^T scale + causal) V_P, once per prompt; when nothing is padded, transformers' sdpa with
    # is_causal and no mask (which also runs grouped-query attention without copying K/V)
    if layout.kernel == "sdpa" and layout.prompts_unpadded and window is None:
        out_prompt, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q_prompt, k_prompt, v_prompt, None, scaling=scaling,
                                                        dropout=dropout, is_causal=True, **kwargs)  # fmt: skip
    else:
        out_prompt, _ = attend(module, q_prompt, k_prompt, v_prompt, prefix_mask, scaling=scaling, dropout=dropout,
                               is_causal=False, **kwargs)  # (B, P_max, H, D)  # fmt: skip
    # O_S_j = softmax(Q_S_j [K_P; K_S_j]^T scale + mask_j) [V_P; V_S_j]
    out_completion, _ = attend(module, q_completion, k_completion, v_completion, suffix_mask, scaling=scaling,
                               dropout=dropout, is_causal=False, **kwargs)  # (N, S_max, H, D)  # fmt: skip
    # scatter the real tokens back to their packed positions; padding stays 0
    real = torch.cat([take(out_prompt.flatten(0, 1), layout.prefix_valid_index),
                      take(out_completion.flatten(0, 1), layout.suffix_valid_index)])  # (tokens, H, D)  # fmt: skip
    output = query.new_zeros(batch * width, heads, head_dim).index_copy(0, layout.flat_valid_index, real)
    return output.view(batch, width, heads, head_dim), None


AttentionInterface.register(NAME, prefix_grouper_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # for plain forwards on a model left on "prefix_grouper"


# ----------------------------------------------------------------------------------------------------------------
# Log-probs: shared prefix and the naive reference


class use_prefix_grouper:
    """Context manager: the model's attention is "prefix_grouper" inside, what it was before outside. In a
    vision-language model only the language model's: the vision tower keeps its own kernel."""

    def __init__(self, model):
        if not getattr(model, "_supports_attention_backend", False):
            raise ValueError(
                f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
                f"so prefix_grouper cannot replace it; use repeated_prefix_logprobs for this model."
            )
        check_layer_types(model.config)
        self.model, self.previous = model, text_config(model.config)._attn_implementation
        self.composite = text_config(model.config) is not model.config

    def __enter__(self):
        self.model.set_attn_implementation({"text_config": NAME} if self.composite else NAME)
        return self.previous

    def __exit__(self, *exc):
        self.model.set_attn_implementation({"text_config": self.previous} if self.composite else self.previous)


def text_config(config):
    """The language model's config (a VLM's text_config, or the config itself)."""
    return getattr(config, "text_config", None) or config


@contextmanager
def lm_head_sees_only(model, index):
    """Inside, the LM head's input (B, K, H) becomes hidden[index] as (1, tokens, H): no logits are made where
    nothing is scored. What the model does to the logits after the head (soft-capping, scaling) still applies."""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda head, args: (args[0][index][None],))
    try:
        yield
    finally:
        hook.remove()


def check_layer_types(config):
    """Full and sliding-window attention are what the masks express; any other kind of layer (chunked attention,
    linear attention, ...) would be computed wrongly without a word, so it is refused."""
    config = text_config(config)
    unsupported = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if unsupported or getattr(config, "attention_chunk_size", None):
        kinds = ", ".join(sorted(unsupported)) or "chunked_attention"
        raise ValueError(
            f"prefix_grouper supports full and sliding-window attention layers; this model also has {kinds}: "
            f"use repeated_prefix_logprobs for it."
        )


def logprobs_from_logits(logits, targets, temperature=1.0, chunk_bytes=2**28):
    """log softmax(logits / temperature) at `targets`, and the entropy of each distribution. logits (..., V).

    Both are differentiable (an entropy bonus trains through the entropy). Exact and memory-lean: the float32
    copy of the logits (bf16 logits are upcast, as TRL does) is made for `chunk_bytes` of them at a time, and the
    backward recomputes it per chunk (activation checkpointing), so nothing (..., V)-sized is kept besides
    `logits` itself. A plain log_softmax keeps about 16 bytes per logit.
    """
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)  # (N, V), (N,)
    rows = max(1, chunk_bytes // (4 * logits.size(-1)))
    logps, entropy = [], []
    for chunk, chunk_targets in zip(flat_logits.split(rows), flat_targets.split(rows)):
        if chunk.requires_grad:
            chunk_logps, chunk_entropy = checkpoint(chunk_logprobs, chunk, chunk_targets, temperature,
                                                    use_reentrant=False)  # fmt: skip
        else:
            chunk_logps, chunk_entropy = chunk_logprobs(chunk, chunk_targets, temperature)
        logps.append(chunk_logps)
        entropy.append(chunk_entropy)
    return torch.cat(logps).view(targets.shape), torch.cat(entropy).view(targets.shape)


def chunk_logprobs(logits, targets, temperature):
    """log softmax(z)[y] = z_y - logsumexp(z), and H = logsumexp(z) - sum_v p_v z_v, with z = logits / temperature
    in float32 (float64 stays). (rows, V) -> (rows,), (rows,)"""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (rows, V)
    log_normaliser = z.logsumexp(dim=-1)  # (rows,)
    logps = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normaliser
    finite_z = z.clamp(min=torch.finfo(z.dtype).min)  # a -inf logit (a token never sampled) adds 0 * min, not nan
    entropy = log_normaliser - (z.softmax(dim=-1) * finite_z).sum(dim=-1)
    return logps, entropy


def default_kernel(model, kernel=None):
    """The kernel of the two calls: `kernel` if given, else the model's own if it takes explicit masks, else sdpa."""
    current = text_config(model.config)._attn_implementation
    return kernel or (current if current in KERNELS else "sdpa")


def packed_logits(model, layout, scored, **model_inputs):
    """Logits (tokens, V) at the `scored` (row, position) pairs of one forward of a packed layout (GroupLayout or
    TrieLayout) through the prefix_grouper attention function."""
    with use_prefix_grouper(model), lm_head_sees_only(model, scored):
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids, prefix_grouper=layout,
                       use_cache=False, **model_inputs).logits[0]  # fmt: skip
    if layout.calls == 0:
        raise ValueError(
            f"{type(model).__name__} never called the prefix_grouper attention function, so its result would be "
            f"wrong; this architecture cannot use prefix_grouper."
        )
    return logits


def shared_prefix_logprobs(
    model, prompts, completions, temperature=1.0, kernel=None, return_entropy=False, prompt_inputs=None,
    suppress_tokens=(),
):  # fmt: skip
    """Per-token log-probs of each completion given its prompt, each prompt encoded once.

    prompts: list of B 1-D id tensors; completions: for each prompt a list of 1-D id tensors (no padding).
    Returns for each prompt a list of 1-D log-prob tensors, one per completion (and the entropies, if asked).
    Differentiable when the model is in train mode. kernel: sdpa | eager | flex_attention (default: the model's
    current attention implementation if it is one of those, else sdpa). prompt_inputs: more model inputs, one row
    per prompt (a VLM's pixel_values: each image then goes through the vision tower once, not once per completion).
    suppress_tokens: token ids given probability 0, as generate's suppress_tokens does when sampling.
    """
    vocab_size = model.get_input_embeddings().num_embeddings
    layout = pack(prompts, completions, pad_token_id=0, kernel=default_kernel(model, kernel), device=model.device,
                  vocab_size=vocab_size)  # fmt: skip
    # position predicting each completion token: the last prompt token for the first, then the completion's own
    predictors, targets = [], []
    for row, (prompt, group) in enumerate(zip(prompts, completions)):
        start = len(prompt)
        for completion in group:
            s = len(completion)
            positions = torch.arange(start - 1, start + s - 1)
            if s:
                positions[0] = len(prompt) - 1  # the first token is predicted by the end of the shared prompt
            predictors.append(torch.stack([torch.full((s,), row), positions], dim=1))
            targets.append(completion)
            start += s
    predictors = torch.cat(predictors).to(model.device)  # (tokens, 2): (row, position)
    targets = torch.cat(targets).to(model.device)  # (tokens,)
    # logits only at the positions that predict a completion token: the model keeps the positions that do so in
    # any row (logits_to_keep), and the LM head gets exactly the (row, position) pairs that do
    keep = torch.unique(predictors[:, 1])  # sorted (K,)
    scored = (predictors[:, 0], torch.searchsorted(keep, predictors[:, 1].contiguous()))  # into (B, K)
    logits = packed_logits(model, layout, scored, logits_to_keep=keep, **(prompt_inputs or {}))  # (tokens, V)
    if suppress_tokens:
        logits = logits.index_fill(-1, torch.tensor(list(suppress_tokens), device=logits.device), float("-inf"))
    logps, entropy = logprobs_from_logits(logits, targets, temperature)
    sizes = [len(c) for group in completions for c in group]
    return unflatten(logps, sizes, completions, entropy if return_entropy else None)


def repeated_prefix_logprobs(model, prompts, completions, temperature=1.0, return_entropy=False, prompt_inputs=None):
    """The naive reference: one row per completion, [left-padded prompt][right-padded completion]; prompt_inputs'
    rows are repeated for each completion of their prompt."""
    check_inputs(prompts, completions, vocab_size=model.get_input_embeddings().num_embeddings)
    rows = [(prompt, completion) for prompt, group in zip(prompts, completions) for completion in group]
    p_max = max(len(p) for p, _ in rows)
    s_max = max(len(c) for _, c in rows)
    input_ids = torch.zeros(len(rows), p_max + s_max, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), p_max + s_max, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        input_ids[i, p_max - len(prompt) : p_max + len(completion)] = torch.cat([prompt, completion])
        attention_mask[i, p_max - len(prompt) : p_max + len(completion)] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=s_max + 1,
        **{
            k: v.repeat_interleave(torch.tensor([len(g) for g in completions], device=v.device), dim=0)
            for k, v in (prompt_inputs or {}).items()
        },
    ).logits[:, :-1]  # (N, S_max, V): position P_max - 1 + t predicts completion token t
    valid = attention_mask[:, p_max:].bool()  # (N, S_max)
    logps, entropy = logprobs_from_logits(logits[valid], input_ids[:, p_max:][valid], temperature)
    sizes = [len(c) for _, c in rows]
    return unflatten(logps, sizes, completions, entropy if return_entropy else None)


def trie_logprobs(model, sequences, starts, temperature=1.0, kernel=None, return_entropy=False):
    """Log-probs of sequences[i][starts[i]:] for each i (1-D tensors), equal to a forward of each sequence alone, with
    every distinct prefix of the sequences encoded once (pack_trie): a Tree-GRPO tree's leaves share its prompt and
    every step before they branch. Sequences may repeat, be prefixes of one another, and start inside a shared part.
    Differentiable when the model is in train mode. Returns a list of 1-D tensors (and the entropies, if asked).
    """
    if len(sequences) != len(starts) or not sequences:
        raise ValueError(f"need one start per sequence and at least one sequence, got {len(sequences)} sequences "
                         f"and {len(starts)} starts")  # fmt: skip
    for i, (sequence, start) in enumerate(zip(sequences, starts)):
        if sequence.dim() != 1 or not 1 <= start <= len(sequence):
            raise ValueError(
                f"sequence {i}: need a 1-D tensor and 1 <= start <= its length (the first token has nothing before "
                f"it to predict it), got shape {tuple(sequence.shape)}, start {start}"
            )
    layout = pack_trie(sequences, kernel=default_kernel(model, kernel), device=model.device)
    # the node of token t-1 predicts token t; nodes predicting a scored token, each once, go through the LM head
    predictors, targets = [], []
    for (row, path), sequence, start in zip(layout.paths, sequences, starts):
        predictors += [(row, node) for node in path[start - 1 : -1]]
        targets.append(sequence[start:])
    if not predictors:  # every start at the end: nothing to score
        empty = [sequence.new_zeros(0, dtype=torch.float32) for sequence in sequences]
        return (empty, empty) if return_entropy else empty
    targets = torch.cat(targets).to(model.device)
    nodes = sorted(set(predictors))
    where = {pair: k for k, pair in enumerate(nodes)}
    scored = tuple(torch.tensor(x, device=model.device) for x in zip(*nodes))  # (row, position) of each node
    logits = packed_logits(model, layout, scored)  # (unique predicting nodes, V)
    logits = logits[torch.tensor([where[pair] for pair in predictors], device=model.device)]  # (tokens, V)
    logps, entropy = logprobs_from_logits(logits, targets, temperature)
    sizes = [len(sequence) - start for sequence, start in zip(sequences, starts)]
    return (list(logps.split(sizes)), list(entropy.split(sizes))) if return_entropy else list(logps.split(sizes))


def unflatten(values, sizes, completions, entropy=None):
    """Split a flat (tokens,) tensor into [[per completion] per prompt]."""
    pieces = list(values.split(sizes))
    nested = [[pieces.pop(0) for _ in group] for group in completions]
    if entropy is None:
        return nested
    return nested, unflatten(entropy, sizes, completions)


# ----------------------------------------------------------------------------------------------------------------
# Equivalence check and benchmark (python prefix_grouper.py)


@dataclass
class Args:
    model: str = field(
        default="tiny",
        metadata={
            "help": "tiny (random 0.8M Qwen2) | small (random, width 512, 32k vocabulary) | "
            "qwen2.5-0.5b (random, that shape)"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16"})
    kernel: str = field(default="sdpa", metadata={"help": "attention kernel of both sides: sdpa | eager"})
    prompt_lengths: str = field(default="256,1024", metadata={"help": "P values, comma-separated"})
    completion_lengths: str = field(default="64,256", metadata={"help": "S values, comma-separated"})
    group_sizes: str = field(default="4,8", metadata={"help": "G values, comma-separated"})
    repeats: int = field(default=3, metadata={"help": "timed forward+backward passes per cell (median)"})
    trees: bool = field(default=True, metadata={"help": "also the tree table: trie_logprobs vs each leaf alone"})


def random_model(name, kernel, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shapes = {  # random weights: speed and memory depend on the shape only
        "tiny": dict(vocab_size=107, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2),
        "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2),
        "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2),
    }  # fmt: skip
    config = Qwen2Config(**shapes[name], tie_word_embeddings=True, max_position_embeddings=32768)
    config._attn_implementation = kernel
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def random_batch(vocab_size, prompt_lengths, completion_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab_size, (p,), generator=g) for p in prompt_lengths]
    completions = [[torch.randint(3, vocab_size, (s,), generator=g) for s in group] for group in completion_lengths]
    return prompts, completions


def check_equivalence(model):
    """Log-probs and gradients of both paths on a batch with uneven lengths, on the model's device; returns the
    largest differences."""
    prompts, completions = random_batch(model.config.vocab_size, [7, 3, 12], [[5, 2, 9], [4], [1, 6]])
    prompts = [p.to(model.device) for p in prompts]
    completions = [[c.to(model.device) for c in group] for group in completions]
    results = []
    for fn in (shared_prefix_logprobs, repeated_prefix_logprobs):
        model.zero_grad()
        logps = fn(model, prompts, completions)
        sum(lp.sum() for group in logps for lp in group).backward()
        results.append((torch.cat([lp for g in logps for lp in g]), [p.grad.clone() for p in model.parameters()]))
    (lp_grouped, g_grouped), (lp_naive, g_naive) = results
    logp_diff = (lp_grouped - lp_naive).abs().max().item()
    grad_diff = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(g_grouped, g_naive))
    return logp_diff, grad_diff


def forward_backward(fn, model, prompts, completions):
    """Seconds and peak memory of one forward+backward of the summed log-probs.

    Memory on CUDA is torch.cuda.max_memory_allocated above what was allocated before; on CPU (no allocator
    statistics) it is the bytes of the tensors autograd saves for backward, the activations that dominate it.
    """
    cuda = model.device.type == "cuda"
    saved = {}

    def pack_hook(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        logps = fn(model, prompts, completions)
    sum(lp.sum() for group in logps for lp in group).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - base if cuda else sum(saved.values())
    model.zero_grad(set_to_none=True)
    return seconds, memory


def benchmark(args: Args):
    from common import pick_device

    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = random_model(args.model, args.kernel, dtype, device).train()
    memory_kind = "peak CUDA memory" if device.type == "cuda" else "saved activations"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nforward+backward, {args.model} (random weights), {args.dtype}, {args.kernel}, {name}; "
          f"median of {args.repeats}; memory = {memory_kind}\n")  # fmt: skip
    print("| P | S | G | naive s | grouped s | speed-up | naive MB | grouped MB | memory ratio | ideal G(P+S)/(P+GS) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for p in map(int, args.prompt_lengths.split(",")):
        for s in map(int, args.completion_lengths.split(",")):
            for g in map(int, args.group_sizes.split(",")):
                prompts, completions = random_batch(model.config.vocab_size, [p], [[s] * g])
                prompts = [x.to(device) for x in prompts]
                completions = [[x.to(device) for x in group] for group in completions]
                cell = {}
                for label, fn in (("naive", repeated_prefix_logprobs), ("grouped", shared_prefix_logprobs)):
                    forward_backward(fn, model, prompts, completions)  # warm-up
                    runs = [forward_backward(fn, model, prompts, completions) for _ in range(args.repeats)]
                    cell[label] = (sorted(r[0] for r in runs)[len(runs) // 2], max(r[1] for r in runs))
                (tn, mn), (tg, mg) = cell["naive"], cell["grouped"]
                ideal = g * (p + s) / (p + g * s)
                row = dict(P=p, S=s, G=g, naive_s=tn, grouped_s=tg, naive_mb=mn / 2**20, grouped_mb=mg / 2**20)
                rows.append(row)
                print(f"| {p} | {s} | {g} | {tn:.3f} | {tg:.3f} | {tn / tg:.2f}x | {mn / 2**20:.0f} | "
                      f"{mg / 2**20:.0f} | {mn / mg:.2f}x | {ideal:.2f} |", flush=True)  # fmt: skip
    return rows


def random_tree(vocab_size, prompt_length, trees, expansions, turns, step_tokens, seed=0):
    """A Tree-GRPO-shaped rollout of one question: `trees` chains of `turns` steps of `step_tokens` tokens (a step
    and its observation), and per tree `expansions` more leaves, each branching off an existing leaf at a random
    step and finishing with new steps. Returns the prompt and the leaves' responses."""
    g = torch.Generator().manual_seed(seed)
    new_steps = lambda n: [torch.randint(3, vocab_size, (step_tokens,), generator=g) for _ in range(n)]  # noqa: E731
    prompt, responses = torch.randint(3, vocab_size, (prompt_length,), generator=g), []
    for _ in range(trees):
        leaves = [new_steps(turns)]
        for _ in range(expansions):
            parent = leaves[int(torch.randint(len(leaves), (1,), generator=g))]
            keep = int(torch.randint(turns, (1,), generator=g))  # branch after this many steps (0: at the root)
            leaves.append(parent[:keep] + new_steps(turns - keep))
        responses += [torch.cat(steps) for steps in leaves]
    return prompt, responses


def trie_of_groups(model, prompts, completions):
    """trie_logprobs with shared_prefix_logprobs's inputs and output (for the benchmark)."""
    sequences = [torch.cat([prompt, c]) for prompt, group in zip(prompts, completions) for c in group]
    starts = [len(prompt) for prompt, group in zip(prompts, completions) for _ in group]
    return unflatten(torch.cat(trie_logprobs(model, sequences, starts)), [len(c) for g in completions for c in g],
                     completions)  # fmt: skip


def tree_benchmark(args: Args, model):
    """Forward+backward of a tree's leaf log-probs: each leaf as its own row vs trie_logprobs."""
    print("\ntrees: trie_logprobs vs each leaf alone (repeated_prefix_logprobs), one question, forward+backward\n")
    print("| shape | leaves | leaf tokens | trie tokens | ideal | naive s | trie s | speed-up | naive MB | trie MB | "
          "memory ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    shapes = {  # (prompt, M trees, expansions per tree = N*L, turns, tokens per step and observation)
        "default (M=2, N=2, L=1, 4 turns)": (256, 2, 2, 4, 96),
        "deeper (M=2, N=4, L=3, 8 turns)": (256, 2, 12, 8, 64),
    }
    for name, (p, m, e, turns, step) in shapes.items():
        prompt, responses = random_tree(model.config.vocab_size, p, m, e, turns, step)
        prompt, responses = prompt.to(model.device), [r.to(model.device) for r in responses]
        sequences = [torch.cat([prompt, r]) for r in responses]
        trie_tokens = pack_trie(sequences).input_ids.numel()
        leaf_tokens = sum(map(len, sequences))
        cell = {}
        for label, fn in (("naive", repeated_prefix_logprobs), ("trie", trie_of_groups)):
            forward_backward(fn, model, [prompt], [responses])  # warm-up
            runs = [forward_backward(fn, model, [prompt], [responses]) for _ in range(args.repeats)]
            cell[label] = (sorted(r[0] for r in runs)[len(runs) // 2], max(r[1] for r in runs))
        (tn, mn), (tt, mt) = cell["naive"], cell["trie"]
        print(f"| {name} | {len(sequences)} | {leaf_tokens} | {trie_tokens} | {leaf_tokens / trie_tokens:.2f} | "
              f"{tn:.3f} | {tt:.3f} | {tn / tt:.2f}x | {mn / 2**20:.0f} | {mt / 2**20:.0f} | {mn / mt:.2f}x |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    from common import parse_args, pick_device

    args = parse_args(Args)
    tiny = random_model("tiny", args.kernel, torch.float32, pick_device(args.device)).train()  # where we benchmark
    logp_diff, grad_diff = check_equivalence(tiny)
    print(f"equivalence on the tiny model (float32, {args.kernel}, {tiny.device}): max |log-prob difference| "
          f"{logp_diff:.1e}, max relative gradient difference {grad_diff:.1e}")  # fmt: skip
    if logp_diff > 1e-5 or grad_diff > 1e-4:
        sys.exit("prefix_grouper does not match the naive computation")
    benchmark(args)
    if args.trees:
        tree_benchmark(args, random_model(args.model, args.kernel, {"float32": torch.float32, "bfloat16":
                                          torch.bfloat16}[args.dtype], pick_device(args.device)).train())  # fmt: skip
