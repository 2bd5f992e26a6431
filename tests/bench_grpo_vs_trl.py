"""Benchmark: wall time of one GRPO step, grpo.py vs TRL's GRPOTrainer, same model, batch and lengths, one process.

    pip install -r requirements-bench.txt      # trl, for this script only
    python tests/bench_grpo_vs_trl.py          # prints a table; --steps, --prompts_per_step, ... to change the setup

Both sides start from the same warm-started tiny model, sample 16 prompts x G=8 completions of at most 32 tokens
at temperature 1 (top-k off), use the dapo loss with beta=0 and one optimiser step per batch, on the same device.
TRL runs with gradient checkpointing off (its default is on, which would slow it down for no memory need here).
A step is everything from picking the prompts to the optimiser step: generation, rewards, log-probs, backward.
The first `--warmup` steps of each side are dropped; the table gives the median of the rest.
"""

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from common import load_model, parse_args  # noqa: E402


@dataclass
class BenchArgs:
    steps: int = field(default=22, metadata={"help": "steps per side, warm-up included"})
    warmup: int = field(default=2, metadata={"help": "steps dropped from the front of each side"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest completion"})
    device: str = field(default="cpu", metadata={"help": "device for both sides"})
    output: str = field(default="", metadata={"help": "optional JSON file for the numbers"})


def time_ours(bench: BenchArgs, output_dir: str):
    args = grpo.Args(
        num_steps=bench.steps,
        prompts_per_step=bench.prompts_per_step,
        group_size=bench.group_size,
        max_new_tokens=bench.max_new_tokens,
        num_eval=8,
        eval_every=10**9,  # only the final evaluation, which is outside the step time
        device=bench.device,
        output_dir=output_dir,
    )
    results = grpo.train(args)
    records = [json.loads(line) for line in (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    return [r["step_time"] for r in steps], statistics.mean(r["completions/mean_length"] for r in steps)


def time_trl(bench: BenchArgs, output_dir: str):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    defaults = grpo.Args()
    train_items, _, demos = grpo.make_arithmetic_task(defaults.num_train, defaults.num_eval, 0, defaults.demo_noise)
    model, tokenizer = load_model("tiny", demos=demos, device=bench.device, sft_steps=defaults.sft_steps)
    dataset = Dataset.from_list([{"prompt": x["question"], "answer": x["answer"]} for x in train_items])
    lengths = []

    def reward(completions, answer, completion_ids, **kwargs):
        lengths.extend(len(ids) for ids in completion_ids)
        return grpo.reward_function(completions, answer)["total"].tolist()

    class StepTimer(TrainerCallback):
        times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=bench.prompts_per_step * bench.group_size,  # TRL counts completions
        num_generations=bench.group_size,
        max_completion_length=bench.max_new_tokens,
        max_steps=bench.steps,
        learning_rate=defaults.learning_rate,
        temperature=1.0,
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
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return StepTimer.times, statistics.mean(lengths)


def main():
    bench = parse_args(BenchArgs)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_len = time_ours(bench, tmp)
        trl_times, trl_len = time_trl(bench, tmp)
    ours_median = statistics.median(ours[bench.warmup :])
    trl_median = statistics.median(trl_times[bench.warmup :])
    import torch
    import trl

    rows = [
        ("grpo.py", ours_median, ours_len),
        (f"TRL {trl.__version__} GRPOTrainer", trl_median, trl_len),
    ]
    batch = f"{bench.prompts_per_step} prompts x G={bench.group_size}, <= {bench.max_new_tokens} new tokens"
    print(f"\nGRPO step on the tiny model ({batch}), device {bench.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {bench.steps - bench.warmup} steps\n")  # fmt: skip
    print("| implementation | s / step | mean completion tokens |")
    print("|---|---|---|")
    for name, seconds, length in rows:
        print(f"| {name} | {seconds:.3f} | {length:.1f} |")
    print(f"\nratio grpo.py / TRL = {ours_median / trl_median:.2f} (below 1: grpo.py is faster)")
    if bench.output:
        Path(bench.output).write_text(
            json.dumps(
                {"ours_s": ours, "trl_s": trl_times, "ratio": ours_median / trl_median, "setup": batch}, indent=2
            )
        )


if __name__ == "__main__":
    main()
