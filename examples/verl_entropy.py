"""The methods of rlvr_entropy.py inside verl (tested with verl 0.9.1's registries, on the CPU).

Importing this module registers, in verl.trainer.ppo.core_algos:
  advantage estimator "rlvr_position"  GRPO's A_i, then [A]'s position shaping (method A2)
  advantage estimator "rlvr_ppl"       GRPO's A_i times [A]'s perplexity weight (method A1)
  policy loss "rlvr_posneg"            verl's clipped loss with [B]'s token weights (method B)
The math comes from rlvr_entropy.py, one folder up. Hyperparameters come from environment
variables, read at each call: RLVR_POS_ALPHA (0.1), RLVR_POS_K (15), RLVR_PPL_ALPHA (0.01),
RLVR_POS_WEIGHT (lambda, 1.0), RLVR_NEG_WEIGHT (1.0). On a Ray cluster set them for the
workers too (runtime_env env_vars). The entropy-guided lambda is not wired here: it needs
each step's entropy on the driver.

rlvr_ppl needs the old log-probs, which verl's compute_advantage does not pass to a
registered estimator. pass_old_log_probs() wraps verl's ray_trainer.compute_advantage so
that it does, for rlvr_ppl alone. Call it in the driver before training starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from verl.trainer.ppo import core_algos

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rlvr_entropy as R  # (after the path insert: the tutorial file holds the math)


def setting(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def grpo_by_index(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                  index: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
    """GRPO's A_i = (r_i - mean_g r) / (std_g r + 1e-6), groups given by verl's `index`
    (uid per prompt, in any order): (B, T), (B, T), (B,) -> A (B,), the row indices per group."""
    scores = token_level_rewards.sum(-1)
    groups = [np.flatnonzero(index == uid) for uid in dict.fromkeys(index.tolist())]
    A = torch.zeros_like(scores)
    for rows in groups:
        if len(rows) > 1:
            A[rows] = R.grpo_advantages(scores[rows], len(rows))[0]
    return A, groups


@core_algos.register_adv_est("rlvr_position")
def position_advantage(token_level_rewards, response_mask, index, config=None, **kwargs):
    """GRPO's A_i on every token, plus the sign-following end-of-response bonus of [A]."""
    A, _ = grpo_by_index(token_level_rewards, response_mask, index)
    mask = response_mask.float()
    shaped = R.position_shaped_advantages(A[:, None] * mask, mask, setting("RLVR_POS_ALPHA", 0.1),
                                          setting("RLVR_POS_K", 15.0))
    return shaped, shaped


@core_algos.register_adv_est("rlvr_ppl")
def ppl_advantage(token_level_rewards, response_mask, index, old_log_probs=None, config=None, **kwargs):
    """GRPO's A_i times clamp(1 - alpha z_i, 0.8, 1.2), z_i the robust z-score of the
    response's log-PPL under pi_old within its group (needs pass_old_log_probs())."""
    if old_log_probs is None:
        raise ValueError("rlvr_ppl needs old_log_probs: call verl_entropy.pass_old_log_probs() "
                         "in the driver before training")
    A, groups = grpo_by_index(token_level_rewards, response_mask, index)
    mask = response_mask.float()
    log_ppl, weight = R.sequence_log_ppl(old_log_probs, mask), torch.ones_like(A)
    for rows in groups:
        weight[rows] = R.ppl_weights(log_ppl[rows], len(rows), setting("RLVR_PPL_ALPHA", 0.01))
    shaped = (A * weight)[:, None] * mask
    return shaped, shaped


@core_algos.register_policy_loss("rlvr_posneg")
def posneg_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                       config=None, rollout_is_weights=None):
    """verl's vanilla clipped loss on w_{i,t} A_{i,t}, w = lambda if A > 0, neg_weight if
    A < 0: exact, since for w >= 0 every term of the clipped (and dual-clipped) objective
    scales by w."""
    lam, neg = setting("RLVR_POS_WEIGHT", 1.0), setting("RLVR_NEG_WEIGHT", 1.0)
    weighted = advantages * R.posneg_token_weights(advantages, lam, neg)
    loss, metrics = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob, log_prob, weighted, response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, {**metrics, "actor/pos_weight": lam}


def pass_old_log_probs() -> None:
    """Make verl's driver hand old_log_probs to the rlvr_ppl estimator (for the others,
    verl's own compute_advantage runs unchanged)."""
    from verl.trainer.ppo import ray_trainer

    original = ray_trainer.compute_advantage

    def compute_advantage(data, adv_estimator, *args, **kwargs):
        if str(adv_estimator) != "rlvr_ppl":
            return original(data, adv_estimator, *args, **kwargs)
        advantages, returns = ppl_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                            data.non_tensor_batch["uid"], data.batch["old_log_probs"])
        data.batch["advantages"], data.batch["returns"] = advantages, returns
        return data

    ray_trainer.compute_advantage = compute_advantage
