"""Prefix Grouper inside TRL: `PrefixGrouperGRPOTrainer` is TRL's GRPOTrainer, built with the same arguments, whose
log-prob passes encode each group's shared prompt once. A TRL user copies this file and prefix_grouper.py into
their training script's folder (or a package folder, `rl/`: then `from rl.trl_prefix_grouper import ...`; this file
puts its own folder first on sys.path to import prefix_grouper) and changes one import:

    from trl_prefix_grouper import PrefixGrouperGRPOTrainer as GRPOTrainer   # was: from trl import GRPOTrainer
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()

What changes. TRL scores the completions (the policy, the old policy, the reference model; entropies when it
asks) with one padded forward of G rows per prompt, [pad][prompt][completion][pad]. This trainer finds the groups
in the tokens (rows whose prompts are the same tokens, wherever they sit in the batch: TRL shuffles the rows
before it cuts its micro-batches) and scores each group with prefix_grouper.shared_prefix_logprobs, one packed
row [prompt][completion 1]...[completion G]. TRL's generation (model.generate, not vLLM) prefills each prompt once
and shares its KV cache with its group's rows (prefix_grouper.shared_prompt_cache): the same samples. Everything else is
TRL's: sampling, rewards, advantages, the loss, logging. LoRA (TRL's peft_config) lives in the model's layers, so
our passes run it; under `accelerate launch` they run through DDP's forward, which prepares the gradient all-reduce.

Exact: per-token log-probs, entropies, the loss and every gradient equal TRL's own forward up to float rounding
(tests/test_trl_prefix_grouper.py runs both trainers' steps side by side). Positions: TRL's scoring forward
numbers a left-padded row from its first pad, shared_prefix_logprobs from the first real token (as generation
does); with rotary embeddings only differences of positions enter attention, so both give the same numbers.

Where our attention function cannot express the model or the batch, the pass is TRL's own, with one warning per
reason, never a wrong number: chunked or linear attention layers, a model whose attention is not in transformers'
AttentionInterface, a model loaded with a kernel that takes no explicit mask (flash attention), PEFT prompt or
prefix tuning, FSDP or DeepSpeed (untested: FSDP does not run on CPU here), images, a mixture-of-experts auxiliary
loss, cast_lm_head_to_fp32 on a model that is not float32, padding other than TRL's (left-padded prompts,
right-padded completions), a left-padded prompt on a model without rotary embeddings. Generation is TRL's own for
a model our passes cannot run (the model-level reasons above), and with vLLM, continuous batching, images, rows
without a run of equal prompts, or left-padded prompts on a model without rotary embeddings.

Our passes run the attention kernel the model was loaded with, or eager where sdpa would drop the model's attention
sinks or soft-capping. With gradient checkpointing (TRL's default) the model stays on "prefix_grouper" after our
first pass, since the backward recomputes the forward and must find the same function there; without a layout that
function runs the kernel the model was loaded with, so generation and every fallback are TRL's, token for token.

Tested with TRL 1.16 (requirements-bench.txt): it overrides a private method of GRPOTrainer whose arguments change
between releases, so on any other release, a pre-release of 1.16 or 1.17 included, it refuses to start.
"""

import inspect
import itertools
import math
import sys
import warnings
from pathlib import Path

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

here = Path(__file__).resolve().parent  # prefix_grouper.py: beside this file (copied into a project), or one up
sys.path.insert(0, str(here if (here / "prefix_grouper.py").exists() else here.parent))

from prefix_grouper import (  # noqa: E402
    KERNELS,
    NAME,
    check_layer_types,
    default_kernel,
    shared_prefix_logprobs,
    shared_prompt_cache,
    text_config,
)

TESTED = "1.16"  # the TRL release series whose GRPOTrainer internals this file knows: its releases, 1.16.x
PADDED_ABSOLUTE = "a left-padded prompt on a model without rotary position embeddings"  # generation and passes: TRL's
WHOLE_MODEL = "TRL's own generation and forward run it"  # what a model our passes cannot run gets


def without_ddp(model):
    """The model inside accelerate's DDP wrapper (the model itself where there is none)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def inner_model(model):
    """The transformers model inside the one TRL passes: inside accelerate's DDP wrapper, a PEFT model's base."""
    model = without_ddp(model)
    return model.get_base_model() if is_peft_model(model) else model


def sharing_rows(prompt_ids) -> int:
    """How many rows share each prefill: the largest number dividing each run of equal prompts (G, or fewer where
    accelerate splits a group between processes)."""
    return math.gcd(*(len(list(run)) for _, run in itertools.groupby(map(tuple, prompt_ids))))


class ThroughWrapper:
    """The inner transformers model's attributes with the forward of the model TRL passes: DDP prepares its gradient
    all-reduce in its forward, PEFT applies its adapters (LoRA's live in the inner model's layers, either way)."""

    def __init__(self, wrapper):
        self.wrapper, self.inner = wrapper, inner_model(wrapper)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)


class PrefixGrouperGRPOTrainer(trl.GRPOTrainer):
    """trl.GRPOTrainer, same arguments; its per-token log-prob passes share each group's prompt."""

    def __init__(self, *args, **kwargs):
        version = Version(trl.__version__)
        if f"{version.major}.{version.minor}" != TESTED or version.is_prerelease:
            raise RuntimeError(
                f"PrefixGrouperGRPOTrainer overrides GRPOTrainer internals of TRL {TESTED}.x and was tested with "
                f'those only; this is TRL {trl.__version__}. Install it: pip install "trl=={TESTED}.*"'
            )
        super().__init__(*args, **kwargs)
        self.warned, self.kernels = set(), {}
        for model in (self.model, self.ref_model):
            reason = model is not None and self.model_unsupported(model)
            if reason:
                self.warn(reason, WHOLE_MODEL)
            elif model is not None:
                self.kernels[id(inner_model(model))] = default_kernel(inner_model(model))

    def model_unsupported(self, model) -> str | None:
        """Why prefix_grouper cannot score with `model` (None if it can)."""
        peft = without_ddp(model)
        if is_peft_model(peft) and peft.active_peft_config.is_prompt_learning:
            return "a PEFT prompt-learning adapter (prefix or prompt tuning adds tokens or keys of its own)"
        model = inner_model(model)
        if torch.distributed.is_available():  # FSDP2 shards the model in place: still a transformers model
            from torch.distributed.fsdp import FSDPModule

            if isinstance(model, FSDPModule):
                return f"{type(model).__name__} is sharded by FSDP (untested here)"
        if not isinstance(model, PreTrainedModel):
            return f"{type(model).__name__} is not a transformers model (FSDP and DeepSpeed are untested here)"
        try:
            check_layer_types(model.config)
        except ValueError as error:
            return str(error).split(":")[0]
        if not getattr(model, "_supports_attention_backend", False):
            return f"{type(model).__name__}'s attention is not in transformers' AttentionInterface"
        kernel = text_config(model.config)._attn_implementation
        if kernel not in (*KERNELS, NAME):
            return f"a model loaded with {kernel} attention, which takes no explicit mask (load it with sdpa or eager)"
        if self.args.cast_lm_head_to_fp32 and model.dtype != torch.float32:
            return "cast_lm_head_to_fp32 on a model that is not float32"
        return None

    def batch_unsupported(self, model, prompt_mask, completion_mask, compute_aux_loss, inputs) -> str | None:
        """Why this batch needs TRL's forward (None if it does not)."""
        reason = self.model_unsupported(model)  # again: accelerate wraps or shards the model after __init__
        if reason or id(inner_model(model)) not in self.kernels:
            return reason or "a model this trainer did not set up"
        if compute_aux_loss:
            return "a mixture-of-experts auxiliary loss"
        if any(value is not None for value in inputs.values()):
            return f"model inputs besides the tokens ({', '.join(k for k, v in inputs.items() if v is not None)})"
        left_padded = (prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all() and prompt_mask[:, -1].all()
        if not left_padded or not (completion_mask[:, 1:] <= completion_mask[:, :-1]).all():
            return "padding other than left-padded prompts and right-padded completions"
        if not prompt_mask.all() and getattr(text_config(model.config), "rope_parameters", None) is None:
            return PADDED_ABSOLUTE
        if not completion_mask.any():
            return "a batch without a completion token (TRL keeps it differentiable)"
        return None

    def warn(self, reason, fallback="TRL's own forward scores it"):
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"PrefixGrouperGRPOTrainer: {reason}; {fallback}", stacklevel=3)

    def generation_unsupported(self, prompt_ids, images, multimodal_fields) -> str | None:
        """Why generate cannot share each prompt's prefill across its rows (None if it can)."""
        if self.use_vllm or self.use_transformers_continuous_batching:
            return "generation by vLLM or continuous batching"
        if images is not None or multimodal_fields:
            return "generation with images or other multimodal inputs"
        rotary = getattr(text_config(self.model.config), "rope_parameters", None)
        if len({len(ids) for ids in prompt_ids}) > 1 and not rotary:
            return PADDED_ABSOLUTE
        if sharing_rows(prompt_ids) < 2:
            return "generation for rows without a run of equal prompts"
        return None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation (its transformers branch), each prompt prefilled once and its KV cache shared by its
        rows (prefix_grouper.shared_prompt_cache): the same samples as TRL's prefill of each row."""
        arguments = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        unsupported = self.model_unsupported(self.model_wrapped)  # again: accelerate wraps the model after __init__
        if unsupported:
            self.warn(unsupported, WHOLE_MODEL)
        # nothing to share: one row per prompt (a tool call's next turn), or a model our passes do not run
        if num_generations < 2 or unsupported or id(inner_model(self.model)) not in self.kernels:
            return super()._generate_single_turn(*arguments)
        reason = self.generation_unsupported(prompt_ids, images, multimodal_fields)
        if reason:
            both = reason == PADDED_ABSOLUTE  # the log-prob passes fall back for it too: one warning for both
            self.warn(reason, WHOLE_MODEL if both else "TRL's own generation prefills each row")
            return super()._generate_single_turn(*arguments)
        model = self.accelerator.unwrap_model(self.model_wrapped)  # the model TRL's generation calls
        forward = inspect.signature(inner_model(model).forward).parameters
        cache_name = "cache" if "cache" in forward else "past_key_values"  # renamed `cache` in transformers 5.2x
        generate, copies = model.generate, sharing_rows(prompt_ids)

        def generate_sharing_prompts(**inputs):  # TRL's generate call, with the prompts' shared cache
            prompts = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            return generate(**inputs, **{cache_name: shared_prompt_cache(model, prompts, copies)})

        model.generate = generate_sharing_prompts  # for this call only
        try:
            return super()._generate_single_turn(*arguments)
        finally:
            del model.generate

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
        scorer = ThroughWrapper(model)  # the transformers model, its forward through DDP's and PEFT's
        logps, entropies, index = [], [], []
        for chunk in chunks:
            prompts = [prompt_ids[members[0]][prompt_mask[members[0]]] for members in chunk]
            completions = [[completion_ids[r, : lengths[r]] for r in members] for members in chunk]
            if not any(lengths[r] for members in chunk for r in members):
                continue  # nothing to score here (every completion masked): zeros
            with self.accelerator.autocast():  # TRL's mixed precision, as in its own forward
                chunk_logps, chunk_entropies = shared_prefix_logprobs(
                    scorer, prompts, completions, self.temperature, self.kernels[id(scorer.inner)], return_entropy=True
                )
            logps += [x for group_logps in chunk_logps for x in group_logps]
            entropies += [x for group_entropies in chunk_entropies for x in group_entropies]
            index += [r * logits_to_keep + t for members in chunk for r in members for t in range(lengths[r])]
        index = torch.tensor(index, device=input_ids.device)

        def scatter(values):  # the flat per-token values back to (B, C), zeros on padding (as TRL's)
            flat = torch.cat(values)
            return flat.new_zeros(completion_ids.numel()).index_copy(0, index, flat).view(completion_ids.shape)

        return scatter(logps), scatter(entropies) if compute_entropy else None, None
