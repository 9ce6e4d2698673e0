"""The tiny preset's RL step inside TRL's GRPOTrainer, timed (a benchmark, not a test).

The same step as `rlvr_entropy.py`'s tiny preset: its default warm-up (the shipped weights,
as `rlvr_entropy.py` loads them), 32 prompts x G = 8,
at most 48 new tokens, 2 optimizer steps of 128 responses per rollout batch, lr 2e-4,
clip 0.2 / 0.28, no KL, token-mean ("dapo") loss, temperature 1, on the CPU, one thread.
One RL step is two optimizer steps; its time is the gap between every second step's end,
median over the steps after the first. Needs trl (examples/requirements.txt's venv):

    python bench/trl_grpo.py 11
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rlvr_entropy as R

torch.manual_seed(0)
torch.set_num_threads(1)  # as the tiny preset's RL (--threads 1)
cycles = int(sys.argv[1])
train_set = R.builtin_task(5000, seed=0)
model, tok = R.tiny_warm_model(R.parse_args(["--preset", "tiny"]))
data = Dataset.from_list([{"prompt": R.build_prompt(tok, p["question"]), "answer": p["answer"]}
                          for p in train_set])


def reward(completions, answer, **_):
    return [R.math_reward(c, a) for c, a in zip(completions, answer)]


stamps = []


class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.perf_counter())


cfg = GRPOConfig(output_dir="/tmp/trl_out", use_cpu=True, bf16=False, report_to="none",
                 save_strategy="no", logging_steps=1000, learning_rate=2e-4, weight_decay=0.0,
                 lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                 num_generations=8, per_device_train_batch_size=128, steps_per_generation=2,
                 num_iterations=1, max_completion_length=48, temperature=1.0, top_p=1.0,
                 beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
                 max_steps=2 * cycles, seed=0)
GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=cfg,
            train_dataset=data, callbacks=[Clock()]).train()
per_step = [b - a for a, b in zip(stamps[1::2], stamps[3::2])]  # 1 RL step = 2 optimizer steps
print(f"median {statistics.median(per_step):.3f} s per RL step over {len(per_step)} steps")
