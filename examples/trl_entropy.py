"""The methods of rlvr_entropy.py inside TRL's GRPOTrainer: [A]'s perplexity and position
shaping and [B]'s positive/negative-advantage weights, with the entropy-guided lambda.

Tested with trl 1.16.0 (pip install "trl>=1.16,<1.17"); the math comes from
rlvr_entropy.py, one folder up. On the CPU, the tiny model of the tiny preset:

    python examples/trl_entropy.py --method posneg --lambda-schedule entropy --max-steps 2 --batch-size 16 --warmup-steps 100

TRL computes GRPO's advantage A_i per response. EntropyGRPOTrainer turns it into token
advantages (B, T) before the loss, which TRL accepts from a subclass:
  ppl       A'_{i,t} = A_i * ppl_weights(log-PPL under pi_old)              (method A1)
  position  A'_{i,t} = position_shaped_advantages(A_i)                      (method A2)
  posneg    A'_{i,t} = w_{i,t} * A_i, w = lambda if A > 0, neg_weight if A < 0  (method B)
posneg folds into the advantages exactly: for w >= 0, w * min(r A, clip(r) A) =
min(r (w A), clip(r) (w A)), and TRL's loss (loss_type dapo, grpo, bnpo or dr_grpo) is that
minimum. The entropy of the sampling policy, of positive (A > 0) and negative (A < 0)
responses, and lambda go to TRL's logs. Groups must be whole on each process: keep
per_device_train_batch_size * steps_per_generation a multiple of num_generations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rlvr_entropy as R  # (after the path insert: the tutorial file holds the math)

TESTED_TRL = ">=1.16,<1.17"


def check_trl_version() -> None:
    """Warn when the installed trl is outside the range these recipes were tested with:
    they override a method of GRPOTrainer, whose internals change between releases."""
    import warnings

    import trl
    from packaging.version import Version

    if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
        warnings.warn(f"examples/trl_entropy.py was tested with trl {TESTED_TRL}, not {trl.__version__}",
                      stacklevel=2)


class EntropyGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with method = 'grpo', 'ppl', 'position' or 'posneg' (see the module doc).
    `last_batch` keeps the last batch's GRPO advantages, old log-probs, mask and shaped
    advantages, for tests and inspection."""

    def __init__(self, *args, method: str = "grpo", ppl_alpha: float = 0.01,
                 pos_alpha: float = 0.1, pos_k: float = 15.0, pos_weight: float = 1.0,
                 neg_weight: float = 1.0, lambda_schedule: str = "fixed",
                 entropy_target: float = 0.2, lambda_step: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        if method not in R.METHODS or lambda_schedule not in ("fixed", "entropy"):
            raise ValueError(f"method {method!r} / lambda schedule {lambda_schedule!r} not supported")
        self.method, self.ppl_alpha, self.pos_alpha, self.pos_k = method, ppl_alpha, pos_alpha, pos_k
        self.neg_weight, self.lambda_schedule = neg_weight, lambda_schedule
        self.entropy_target, self.lambda_step = entropy_target, lambda_step
        self.pos_weight = 0.0 if lambda_schedule == "entropy" else pos_weight  # lambda_0 = 0 in [B]
        self.last_batch: dict = {}

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mask = out["completion_mask"].float()
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():  # log pi_old and entropy, with TRL's own forward at its temperature
            old_logp, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, attention, mask.shape[1], compute_entropy=True)
        grpo = out["advantages"]  # (B,): TRL's GRPO advantage of each response on this process
        advantages, G = grpo[:, None] * mask, self.num_generations
        if self.method == "ppl":
            weight = R.ppl_weights(R.sequence_log_ppl(old_logp, mask), G, self.ppl_alpha)
            advantages = advantages * weight[:, None]
        elif self.method == "position":
            advantages = R.position_shaped_advantages(advantages, mask, self.pos_alpha, self.pos_k)
        elif self.method == "posneg":
            advantages = advantages * R.posneg_token_weights(advantages, self.pos_weight, self.neg_weight)
        out["advantages"] = advantages
        self.last_batch = {"grpo": grpo, "old_logp": old_logp, "mask": mask, "advantages": advantages,
                           "pos_weight": self.pos_weight}
        self._log_entropy(entropy, mask, grpo)
        return out

    def _log_entropy(self, entropy: torch.Tensor, mask: torch.Tensor, grpo: torch.Tensor) -> None:
        """Token-mean entropy over all, positive and negative responses (across processes),
        logged to TRL's metrics; then the entropy-guided lambda update of [B]."""
        mode = "train" if self.model.training else "eval"
        pos, neg = (grpo > 0)[:, None] * mask, (grpo < 0)[:, None] * mask
        sums = torch.stack([(entropy * m).sum() for m in (mask, pos, neg)] + [m.sum() for m in (mask, pos, neg)])
        sums = self.accelerator.gather(sums[None]).sum(0)
        h_all, h_pos, h_neg = (sums[k] / sums[k + 3] if sums[k + 3] > 0 else None for k in range(3))
        for name, h in (("entropy_sampling", h_all), ("entropy_pos", h_pos), ("entropy_neg", h_neg)):
            if h is not None:
                self._metrics[mode][name].append(h.item())
        if self.method == "posneg":
            self._metrics[mode]["pos_weight"].append(self.pos_weight)
            if self.lambda_schedule == "entropy" and h_all is not None:
                self.pos_weight = R.entropy_guided_lambda(self.pos_weight, h_all.item(),
                                                          self.entropy_target, self.lambda_step)


def tiny_setup(warmup_steps: int | None = None, cache_dir: str | None = None):
    """The tiny preset's warmed-up model (cached as in rlvr_entropy.py, with its default
    warm-up unless warmup_steps is given), its tokenizer and the built-in task as a TRL
    prompt dataset."""
    from datasets import Dataset

    args = R.parse_args(["--preset", "tiny",
                         *(["--warmup-steps", str(warmup_steps)] if warmup_steps else []),
                         *(["--cache-dir", cache_dir] if cache_dir else [])])
    train_set = R.builtin_task(args.train_size, seed=0)
    model, tok = R.tiny_warm_model(args)
    data = Dataset.from_list([{"prompt": R.build_prompt(tok, p["question"]), "answer": p["answer"]}
                              for p in train_set])
    return model, tok, data


def math_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: the verifiable reward of rlvr_entropy.py."""
    return [R.math_reward(c, a) for c, a in zip(completions, answer)]


def main(argv: list[str] | None = None) -> EntropyGRPOTrainer:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="grpo", choices=R.METHODS, help="advantage shaping or weights")
    p.add_argument("--model", default="tiny", help="'tiny' (built in, CPU) or a hub name / folder")
    p.add_argument("--output-dir", default="runs/trl", help="TRL's output folder")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="tiny model: supervised warm-up steps (default: rlvr_entropy.py's)")
    p.add_argument("--cache-dir", default=None, help="tiny model: where its warm-up is cached")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--num-generations", type=int, default=8, help="G")
    p.add_argument("--batch-size", type=int, default=32, help="per-device train batch (rows)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    p.add_argument("--max-completion-length", type=int, default=48, help="response length limit")
    p.add_argument("--use-vllm", action="store_true", help="generate with vLLM (GPU)")
    p.add_argument("--ppl-alpha", type=float, default=0.01, help="ppl: alpha")
    p.add_argument("--pos-alpha", type=float, default=0.1, help="position: alpha")
    p.add_argument("--pos-k", type=float, default=15.0, help="position: k")
    p.add_argument("--pos-weight", type=float, default=1.0, help="posneg: fixed lambda")
    p.add_argument("--neg-weight", type=float, default=1.0, help="posneg: weight of A < 0")
    p.add_argument("--lambda-schedule", choices=("fixed", "entropy"), default="fixed", help="posneg")
    p.add_argument("--entropy-target", type=float, default=0.2, help="entropy schedule: delta")
    p.add_argument("--lambda-step", type=float, default=0.05, help="entropy schedule: step")
    opts = p.parse_args(argv)
    check_trl_version()
    if opts.model == "tiny":
        model, tok, data = tiny_setup(opts.warmup_steps, opts.cache_dir)
    else:  # a hub model on GSM8K, with Qwen's math prompt
        from datasets import Dataset
        from transformers import AutoTokenizer

        model, tok = opts.model, AutoTokenizer.from_pretrained(opts.model)
        instruction = R.PRESETS["gsm8k"]["instruction"]
        data = Dataset.from_list([{"prompt": R.build_prompt(tok, q["question"], instruction),
                                   "answer": q["answer"]} for q in R.load_gsm8k("train")])
    config = GRPOConfig(output_dir=opts.output_dir, max_steps=opts.max_steps, learning_rate=opts.lr,
                        per_device_train_batch_size=opts.batch_size, num_generations=opts.num_generations,
                        max_completion_length=opts.max_completion_length, temperature=1.0,
                        epsilon=0.2, epsilon_high=0.28, beta=0.0, loss_type="dapo", logging_steps=1,
                        use_vllm=opts.use_vllm, report_to=[], save_strategy="no",
                        use_cpu=not torch.cuda.is_available())
    trainer = EntropyGRPOTrainer(model=model, reward_funcs=math_reward, args=config, train_dataset=data,
                                 processing_class=tok, method=opts.method, ppl_alpha=opts.ppl_alpha,
                                 pos_alpha=opts.pos_alpha, pos_k=opts.pos_k, pos_weight=opts.pos_weight,
                                 neg_weight=opts.neg_weight, lambda_schedule=opts.lambda_schedule,
                                 entropy_target=opts.entropy_target, lambda_step=opts.lambda_step)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
