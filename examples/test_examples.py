"""Tests of the TRL and verl recipes: they need trl and verl (the CI installs them in a venv
of their own, see .ci/run). Run: python -m pytest -q examples/test_examples.py"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import rlvr_entropy as R

# ----------------------------------------------------------------------------- TRL


def run_trl(tmp_path, method, steps=2, **kwargs):
    """`steps` optimizer steps of EntropyGRPOTrainer on an untrained tiny model. Its answers
    are never right, so the reward is the parity of the text's length: mixed groups. Each
    batch's old log-probs are also recomputed with rlvr_entropy's own forward."""
    pytest.importorskip("trl")
    import trl_entropy as T
    from datasets import Dataset
    from trl import GRPOConfig

    class Recorded(T.EntropyGRPOTrainer):
        batches: list

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            ids, mask = out["completion_ids"], out["completion_mask"]
            with torch.no_grad():
                logits = R.completion_logits(self.model, torch.cat([out["prompt_ids"], ids], 1),
                                             torch.cat([out["prompt_mask"], mask], 1), ids.shape[1])
                ours = R.token_logprobs(logits, ids, self.temperature)
            self.batches.append({**self.last_batch, "ours_logp": ours, "prompt_mask": out["prompt_mask"]})
            return out

    tok = R.build_char_tokenizer()
    data = Dataset.from_list([{"prompt": R.build_prompt(tok, p["question"]), "answer": p["answer"]}
                              for p in R.builtin_task(64, seed=0)])
    config = GRPOConfig(output_dir=str(tmp_path / method), max_steps=steps, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=8, learning_rate=1e-3, beta=0.0,
                        loss_type="dapo", report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                        seed=0)
    trainer = Recorded(model=R.build_tiny_model(tok, seed=0), processing_class=tok, args=config,
                       reward_funcs=lambda completions, **k: [float(len(c) % 2) for c in completions],
                       train_dataset=data, method=method, **kwargs)
    trainer.batches = []
    trainer.train()
    return trainer


def expected_advantages(b, method, **kw):
    """The shaping, written with rlvr_entropy's functions on the recorded batch."""
    A, mask = b["grpo"][:, None] * b["mask"], b["mask"]
    if method == "ppl":
        return A * R.ppl_weights(R.sequence_log_ppl(b["old_logp"], mask), 4, kw["ppl_alpha"])[:, None]
    if method == "position":
        return R.position_shaped_advantages(A, mask, kw["pos_alpha"], 15.0)
    if method == "posneg":
        return A * R.posneg_token_weights(A, b["pos_weight"], kw.get("neg_weight", 1.0))
    return A


@pytest.mark.parametrize("method,kw", [("ppl", {"ppl_alpha": 0.5}), ("position", {"pos_alpha": 0.1}),
                                       ("posneg", {"pos_weight": 0.3, "neg_weight": 0.7})])
def test_trl_methods_shape_the_advantages_as_the_file_does(tmp_path, method, kw):
    trainer = run_trl(tmp_path, method, **kw)
    assert len(trainer.batches) == 2  # one generation per optimizer step
    for b in trainer.batches:
        # TRL's forward and ours give the same log pi_old (an independent recomputation) on
        # unpadded prompts; on left-padded ones TRL passes no position ids, so they differ
        m = (b["mask"] > 0) & b["prompt_mask"].all(1, keepdim=True)
        assert m.any() and torch.allclose(b["old_logp"][m], b["ours_logp"][m], atol=1e-5)
        assert (b["grpo"] != 0).any()  # mixed groups: there is something to shape
        assert torch.allclose(b["advantages"], expected_advantages(b, method, **kw), atol=1e-6)
        assert not torch.allclose(b["advantages"], b["grpo"][:, None] * b["mask"])  # it did act


@pytest.mark.parametrize("method,kw", [("grpo", {}), ("ppl", {"ppl_alpha": 0.0}),
                                       ("position", {"pos_alpha": 0.0}),
                                       ("posneg", {"pos_weight": 1.0, "neg_weight": 1.0})])
def test_trl_methods_equal_grpo_where_inactive(tmp_path, method, kw):
    trainer = run_trl(tmp_path, method, **kw)
    for b in trainer.batches:
        assert torch.equal(b["advantages"], b["grpo"][:, None] * b["mask"])


def test_trl_entropy_guided_lambda_and_logs(tmp_path):
    trainer = run_trl(tmp_path, "posneg", steps=3, lambda_schedule="entropy", entropy_target=0.2,
                      lambda_step=0.05)
    logs = [h for h in trainer.state.log_history if "pos_weight" in h]
    lams = [h["pos_weight"] for h in logs]
    assert lams[0] == 0.0  # lambda_0 = 0 in [B]
    for prev, cur, h in zip(lams, lams[1:], logs):  # +0.05 above the target, -0.05 below
        assert cur == pytest.approx(R.entropy_guided_lambda(prev, h["entropy_sampling"], 0.2, 0.05))
    assert all("entropy_pos" in h or "entropy_neg" in h for h in logs)
    assert [b["pos_weight"] for b in trainer.batches] == pytest.approx(lams)


# ----------------------------------------------------------------------------- verl


def verl_batch(seed=0, groups=3, G=4, T=6):
    """A random batch in verl's layout: groups of G rows in shuffled order, 0/1 rewards on
    the last valid token, right-padded response masks."""
    g = torch.Generator().manual_seed(seed)
    B = groups * G
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).float()
    order = torch.randperm(B, generator=g)
    index = np.array([f"uid{i // G}" for i in range(B)], dtype=object)[order.numpy()]
    return rewards[order], mask[order], index, order


def grouped(values, index):
    """Rows regrouped contiguously by uid (uid0's G rows first): the layout R.* expects."""
    rows = np.argsort(index, kind="stable")
    return values[torch.as_tensor(rows)], rows


def test_verl_position_estimator_equals_the_file(monkeypatch):
    pytest.importorskip("verl")
    import verl_entropy  # noqa: F401  (registers the functions)
    from verl.trainer.ppo import core_algos

    monkeypatch.setenv("RLVR_POS_ALPHA", "0.3")
    rewards, mask, index, _ = verl_batch()
    got, _ = core_algos.get_adv_estimator_fn("rlvr_position")(token_level_rewards=rewards,
                                                              response_mask=mask, index=index)
    r, rows = grouped(rewards.sum(-1), index)
    m = mask[torch.as_tensor(rows)]
    want = R.position_shaped_advantages(R.grpo_advantages(r, 4)[0][:, None] * m, m, 0.3, 15.0)
    assert torch.allclose(got[torch.as_tensor(rows)], want, atol=1e-6)
    assert (want != 0).any()


def test_verl_ppl_estimator_equals_the_file(monkeypatch):
    pytest.importorskip("verl")
    import verl_entropy  # noqa: F401
    from verl.trainer.ppo import core_algos

    monkeypatch.setenv("RLVR_PPL_ALPHA", "0.5")
    rewards, mask, index, _ = verl_batch(seed=1)
    old = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) * 3 * mask
    fn = core_algos.get_adv_estimator_fn("rlvr_ppl")
    with pytest.raises(ValueError, match="pass_old_log_probs"):
        fn(token_level_rewards=rewards, response_mask=mask, index=index)
    got, _ = fn(token_level_rewards=rewards, response_mask=mask, index=index, old_log_probs=old)
    rows = torch.as_tensor(grouped(rewards.sum(-1), index)[1])
    r, m, lp = rewards.sum(-1)[rows], mask[rows], old[rows]
    weight = R.ppl_weights(R.sequence_log_ppl(lp, m), 4, 0.5)
    assert torch.allclose(got[rows], (R.grpo_advantages(r, 4)[0] * weight)[:, None] * m, atol=1e-6)
    assert not torch.allclose(weight, torch.ones_like(weight))


def test_verl_posneg_policy_loss_equals_the_file(monkeypatch):
    pytest.importorskip("verl")
    import verl_entropy  # noqa: F401
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    monkeypatch.setenv("RLVR_POS_WEIGHT", "0.25")
    monkeypatch.setenv("RLVR_NEG_WEIGHT", "0.5")
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(6, 7, generator=g) > 0.2).float()
    old = -torch.rand(6, 7, generator=g)
    new = old + 0.4 * (torch.rand(6, 7, generator=g) - 0.5)  # ratios 0.82..1.22: both clips act
    adv = torch.randn(6, 1, generator=g).expand(6, 7).clone()
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                               "clip_ratio_c": 3.0, "global_batch_info": {}})
    loss, metrics = core_algos.get_policy_loss_fn("rlvr_posneg")(old, new, adv, mask, "token-mean", config)
    token_loss, _ = R.clipped_token_loss(new, old, adv, 0.2, 0.28)
    want = R.aggregate_loss(token_loss * R.posneg_token_weights(adv, 0.25, 0.5), mask)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert metrics["actor/pos_weight"] == 0.25


@pytest.mark.parametrize("low, high", [(0.2, 0.28), (0.1, 0.28), (0.3, 0.2)])
def test_verl_cispo_loss_equals_the_file(low, high):
    """verl 0.9.1's own `cispo` policy loss (core_algos.compute_policy_loss_cispo: the
    weight clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high), detached, times -A log pi,
    token-mean) against cispo_token_loss through aggregate_loss: the same loss and the same
    gradient in log pi, off policy, with ratios on both sides of the range. verl also
    clamps log ratio to [-20, 20] before exp, which these ratios never reach. TRL 1.16's
    loss_type="cispo" differs on purpose: it caps the weight above only, at epsilon_high
    itself (min(ratio, 5.0) as ScaleRL advises), and is not compared here."""
    pytest.importorskip("verl")
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=1,
                         rollout_n=1, clip_ratio_low=low, clip_ratio_high=high)
    g = torch.Generator().manual_seed(11)
    mask = (torch.rand(6, 9, generator=g) > 0.25).float()
    old = -2 * torch.rand(6, 9, generator=g)
    new = old + 0.9 * (torch.rand(6, 9, generator=g) - 0.5)
    adv = torch.randn(6, 1, generator=g).expand(6, 9).clone()
    ratio = (new - old).exp()
    assert ((ratio < 1 - low) & (mask > 0)).any() and ((ratio > 1 + high) & (mask > 0)).any()
    theirs_in, ours_in = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    theirs, _ = core_algos.get_policy_loss_fn("cispo")(old, theirs_in, adv, mask, "token-mean",
                                                        config)
    ours = R.aggregate_loss(R.cispo_token_loss(ours_in, old, adv, low, high)[0], mask)
    theirs.backward()
    ours.backward()
    assert theirs.item() == pytest.approx(ours.item(), abs=1e-6)
    assert torch.allclose(theirs_in.grad, ours_in.grad, atol=1e-7)


def test_verl_driver_patch_hands_old_log_probs_to_ppl(monkeypatch):
    pytest.importorskip("verl")
    from types import SimpleNamespace

    import verl_entropy
    from verl.trainer.ppo import ray_trainer

    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)  # restored after
    verl_entropy.pass_old_log_probs()
    rewards, mask, index, _ = verl_batch(seed=4)
    old = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) * mask
    data = SimpleNamespace(batch={"token_level_rewards": rewards, "response_mask": mask, "old_log_probs": old},
                           non_tensor_batch={"uid": index})
    ray_trainer.compute_advantage(data, "rlvr_ppl")
    want, _ = verl_entropy.ppl_advantage(rewards, mask, index, old_log_probs=old)
    assert torch.equal(data.batch["advantages"], want)


README_TRL_CPU = "--method posneg --lambda-schedule entropy --max-steps 2 --batch-size 16 --warmup-steps 100"


def test_the_readme_cpu_command_runs(tmp_path):
    """The README's CPU command (`python examples/trl_entropy.py` + README_TRL_CPU), with
    its folders moved into tmp_path."""
    pytest.importorskip("trl")
    import trl_entropy as T

    trainer = T.main([*README_TRL_CPU.split(), "--output-dir", str(tmp_path / "trl"),
                      "--cache-dir", str(tmp_path / "cache")])
    logs = [h for h in trainer.state.log_history if "pos_weight" in h]
    assert trainer.state.global_step == 2 and logs[0]["pos_weight"] == 0.0  # lambda_0 = 0


# ----------------------------------------------------------------------------- verl / TRL entropy controls

def cov_batch(seed: int, B: int = 8, T: int = 9, spread: float = 3.0):
    """Random tokens whose centred products reach verl's Clip-Cov window (1, 5)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.15).float()
    mask[:, 0] = 1.0
    old = -spread * torch.rand(B, T, generator=g)
    adv = (torch.randn(B, 1, generator=g) * 1.5).expand(B, T).clone()
    return mask, old, adv


def test_verl_clip_cov_equals_the_file_on_policy():
    """verl 0.9.1's `clip_cov` loss against clipped_token_loss x (1 - clip_cov_mask), on an
    on-policy batch (log pi = log pi_old, the first update of every batch here), with the
    same global RNG state: verl draws its random subset with torch.randperm over the
    candidates in row-major order, as clip_cov_mask does. Off-policy the two differ on
    purpose: verl picks per micro-batch, from the current log-probs, among the tokens the
    clip has not already cut; this file picks once per batch from log pi_old, before any
    update, so the micro-batch size cannot change the pick."""
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    mask, old, adv = cov_batch(0)
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                               "clip_ratio_c": 3.0, "global_batch_info": {},
                               "policy_loss": {"clip_cov_ratio": 0.05, "clip_cov_lb": 1.0,
                                               "clip_cov_ub": 5.0}})
    cov = R.token_covariance(old, adv, mask)
    assert ((cov > 1) & (cov < 5) & (mask > 0)).sum() > int(0.05 * mask.sum())  # the draw matters
    torch.manual_seed(7)
    loss, _ = core_algos.get_policy_loss_fn("clip_cov")(old, old.clone(), adv, mask, "token-mean", config)
    torch.manual_seed(7)
    picked = R.clip_cov_mask(cov, mask, 0.05, 1.0, 5.0)
    token_loss, _ = R.clipped_token_loss(old, old, adv, 0.2, 0.28)
    want = R.aggregate_loss(token_loss * (~picked), mask)
    assert picked.sum() == int(0.05 * mask.sum())
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)


def test_verl_kl_cov_equals_the_file():
    """verl 0.9.1's `kl_cov` loss against kl_cov_token_loss on kl_cov_mask's tokens, off
    policy (the penalty is 0 on policy). verl ranks by the covariance of the current
    log-probs inside each micro-batch; given the same log-probs the two agree."""
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    mask, old, adv = cov_batch(1)
    new = old + 0.3 * (torch.rand(old.shape, generator=torch.Generator().manual_seed(2)) - 0.5)
    config = OmegaConf.create({"clip_ratio": 0.2, "global_batch_info": {},
                               "policy_loss": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.7}})
    loss, _ = core_algos.get_policy_loss_fn("kl_cov")(old, new, adv, mask, "token-mean", config)
    picked = R.kl_cov_mask(R.token_covariance(new, adv, mask), mask, 0.1)
    token_loss, _ = R.kl_cov_token_loss(new, old, adv, picked, 0.7)
    assert picked.sum() == int(0.1 * mask.sum())
    assert loss.item() == pytest.approx(R.aggregate_loss(token_loss, mask).item(), abs=1e-6)


def test_trl_entropy_mask_equals_the_file():
    """TRL 1.16's GRPOTrainer.get_high_entropy_mask (top_entropy_quantile q keeps the tokens
    at or above the q-quantile) against high_entropy_mask with top_fraction 1 - q, on one
    process. TRL calls it once per forward, so its threshold follows the micro-batch; this
    file calls it once per rollout batch."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(4)
    entropy, mask = torch.rand(6, 11, generator=g), (torch.rand(6, 11, generator=g) > 0.3).float()
    fake = SimpleNamespace(accelerator=SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t,
                                                       gather=lambda t: t))
    for q in (0.0, 0.5, 0.8, 0.95):
        theirs = GRPOTrainer.get_high_entropy_mask(fake, entropy, mask, q)
        assert torch.equal(theirs, R.high_entropy_mask(entropy, mask, 1.0 - q)), q
