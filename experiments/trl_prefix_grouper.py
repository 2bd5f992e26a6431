"""Prefix Grouper inside TRL: `PrefixGrouperGRPOTrainer` is TRL's GRPOTrainer, built with the same arguments, whose
log-prob passes encode each group's shared prompt once. A TRL user changes one import:

    from experiments.trl_prefix_grouper import PrefixGrouperGRPOTrainer as GRPOTrainer   # was: from trl import ...
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()

What changes. TRL scores the completions (the policy, the old policy, the reference model; entropies when it
asks) with one padded forward of G rows per prompt, [pad][prompt][completion][pad]. This trainer finds the groups
in the tokens (rows whose prompts are the same tokens, wherever they sit in the batch: TRL shuffles the rows
before it cuts its micro-batches) and scores each group with prefix_grouper.shared_prefix_logprobs, one packed
row [prompt][completion 1]...[completion G]. Everything else is TRL's: sampling, rewards, advantages, the loss,
logging. What it cannot change: generation, where TRL's model.generate still prefills the prompt in each row.

Exact: per-token log-probs, entropies, the loss and every gradient equal TRL's own forward up to float rounding
(tests/test_trl_prefix_grouper.py runs both trainers' steps side by side). Positions: TRL's scoring forward
numbers a left-padded row from its first pad, shared_prefix_logprobs from the first real token (as generation
does); with rotary embeddings only differences of positions enter attention, so both give the same numbers.

Where our attention function cannot express the model or the batch, the pass is TRL's own, with one warning per
reason, never a wrong number: chunked or linear attention layers, a model whose attention is not in transformers'
AttentionInterface, a wrapped model (PEFT, DDP, FSDP, DeepSpeed: untested here), images, a mixture-of-experts
auxiliary loss, cast_lm_head_to_fp32 on a model that is not float32, padding other than TRL's (left-padded
prompts, right-padded completions), a left-padded prompt on a model without rotary embeddings.

The policy's (and the reference model's) attention becomes "prefix_grouper" for the whole run: gradient
checkpointing (TRL's default) recomputes the forward in the backward, and must find the same function there.
Without a layout that function is plain sdpa, so generation runs sdpa.

Tested with TRL 1.16 (requirements-bench.txt): it overrides a private method of GRPOTrainer whose arguments change
between releases, so on any other release it refuses to start.
"""

import sys
import warnings
from pathlib import Path

import torch
import trl
from packaging.version import Version
from transformers import PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from prefix_grouper import KERNELS, NAME, check_layer_types, shared_prefix_logprobs, text_config  # noqa: E402

TESTED = ("1.16", "1.17")  # the TRL releases whose GRPOTrainer internals this file knows: [first, last)


class PrefixGrouperGRPOTrainer(trl.GRPOTrainer):
    """trl.GRPOTrainer, same arguments; its per-token log-prob passes share each group's prompt."""

    def __init__(self, *args, **kwargs):
        if not Version(TESTED[0]) <= Version(trl.__version__) < Version(TESTED[1]):
            raise RuntimeError(
                f"PrefixGrouperGRPOTrainer overrides GRPOTrainer internals of TRL {TESTED[0]}.x and was tested with "
                f"those only; this is TRL {trl.__version__}. Install `pip install -r requirements-bench.txt`."
            )
        super().__init__(*args, **kwargs)
        self.warned, self.kernels = set(), {}
        for model in (self.model, self.ref_model):
            reason = model is not None and self.model_unsupported(model)
            if reason:
                self.warn(reason)
            elif model is not None:  # for the whole run (see the docstring); plain sdpa where no layout is passed
                kernel = text_config(model.config)._attn_implementation  # the two calls keep it if they can
                self.kernels[id(model)] = kernel if kernel in KERNELS else "sdpa"
                composite = text_config(model.config) is not model.config  # a VLM: only its language model's
                model.set_attn_implementation({"text_config": NAME} if composite else NAME)

    def model_unsupported(self, model) -> str | None:
        """Why prefix_grouper cannot score with `model` (None if it can)."""
        if not isinstance(model, PreTrainedModel):
            return f"{type(model).__name__} is not a transformers model (PEFT, DDP, FSDP, DeepSpeed are untested)"
        try:
            check_layer_types(model.config)
        except ValueError as error:
            return str(error).split(":")[0]
        if not getattr(model, "_supports_attention_backend", False):
            return f"{type(model).__name__}'s attention is not in transformers' AttentionInterface"
        if self.args.cast_lm_head_to_fp32 and model.dtype != torch.float32:
            return "cast_lm_head_to_fp32 on a model that is not float32"
        return None

    def batch_unsupported(self, model, prompt_mask, completion_mask, compute_aux_loss, inputs) -> str | None:
        """Why this batch needs TRL's forward (None if it does not)."""
        if id(model) not in self.kernels:
            return self.model_unsupported(model) or "a model this trainer did not set up"
        if compute_aux_loss:
            return "a mixture-of-experts auxiliary loss"
        if any(value is not None for value in inputs.values()):
            return f"model inputs besides the tokens ({', '.join(k for k, v in inputs.items() if v is not None)})"
        left_padded = (prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all() and prompt_mask[:, -1].all()
        if not left_padded or not (completion_mask[:, 1:] <= completion_mask[:, :-1]).all():
            return "padding other than left-padded prompts and right-padded completions"
        if not prompt_mask.all() and getattr(text_config(model.config), "rope_parameters", None) is None:
            return "a left-padded prompt on a model without rotary position embeddings"
        if not completion_mask.any():
            return "a batch without a completion token (TRL keeps it differentiable)"
        return None

    def warn(self, reason):
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"PrefixGrouperGRPOTrainer: {reason}; TRL's own forward scores it", stacklevel=3)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **inputs,
    ):  # fmt: skip
        """TRL's method, same arguments and results: log-probs (B, C) of the last C = logits_to_keep tokens of each
        row, entropies (B, C) if compute_entropy, 0 where a token is padding; no auxiliary loss."""
        width = input_ids.shape[1] - logits_to_keep  # P: the prompts' padded width
        prompt_ids, completion_ids = input_ids[:, :width], input_ids[:, width:]  # (B, P), (B, C)
        prompt_mask, completion_mask = attention_mask[:, :width].bool(), attention_mask[:, width:].bool()
        reason = self.batch_unsupported(model, prompt_mask, completion_mask, compute_aux_loss, inputs)
        if reason:
            self.warn(reason)
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **inputs,
            )  # fmt: skip
        # the groups, from the tokens: rows whose prompts are the same tokens, wherever they sit in the batch
        keys = prompt_ids.masked_fill(~prompt_mask, -1)  # (B, P) padding equals no token
        group = torch.unique(keys, dim=0, return_inverse=True)[1]  # (B,) each row's group
        groups = [(group == g).nonzero().squeeze(1).tolist() for g in range(int(group.max()) + 1)]
        # whole groups per chunk, at most batch_size rows (TRL's chunk) unless one group alone is larger
        chunks, rows = [[]], batch_size or len(input_ids)
        for members in groups:
            if chunks[-1] and sum(map(len, chunks[-1])) + len(members) > rows:
                chunks.append([])
            chunks[-1].append(members)
        lengths = completion_mask.sum(dim=1).tolist()  # (B,) completion tokens of each row
        logps, entropies, index = [], [], []
        for chunk in chunks:
            prompts = [prompt_ids[members[0]][prompt_mask[members[0]]] for members in chunk]
            completions = [[completion_ids[r, : lengths[r]] for r in members] for members in chunk]
            if not any(lengths[r] for members in chunk for r in members):
                continue  # nothing to score here (every completion masked): zeros
            with self.accelerator.autocast():  # TRL's mixed precision, as in its own forward
                chunk_logps, chunk_entropies = shared_prefix_logprobs(
                    model, prompts, completions, self.temperature, self.kernels[id(model)], return_entropy=True
                )
            logps += [x for group_logps in chunk_logps for x in group_logps]
            entropies += [x for group_entropies in chunk_entropies for x in group_entropies]
            index += [r * logits_to_keep + t for members in chunk for r in members for t in range(lengths[r])]
        index = torch.tensor(index, device=input_ids.device)

        def scatter(values):  # the flat per-token values back to (B, C), zeros on padding (as TRL's)
            flat = torch.cat(values)
            return flat.new_zeros(completion_ids.numel()).index_copy(0, index, flat).view(completion_ids.shape)

        return scatter(logps), scatter(entropies) if compute_entropy else None, None
