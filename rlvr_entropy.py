"""rlvr_entropy.py: how entropy shapes RL with verifiable rewards (RLVR), in one file.

Trains a causal LM on math with GRPO and a verifiable 0/1 reward, logs token entropy,
response perplexity and what each update does, and implements the methods of
  [A] Deng et al., arXiv 2508.02260 (2025): perplexity-based ("ppl") and position-based
      ("position") advantage shaping;
  [B] Jin et al., arXiv 2511.05993 (2025): positive/negative-advantage token weights
      ("posneg") with a fixed, staged, epoch-wise or entropy-guided lambda;
beside the field's entropy controls (W-REINFORCE, forking tokens, Clip-Cov, KL-Cov, the
entropy bonus).

Read it top to bottom. The tutorial path is sections 1-9: data -> reward -> rollout ->
log-probs -> advantages -> loss -> one RL step (rl_step, section 7) -> evaluation -> the
loop. After it, not needed to follow the method: the live entropy analysis and the
metrics row (10), the grader's rules (11), the built-in tiny model, task and warm-up (12),
checkpoints (13), and the settings and command line (14).

    python rlvr_entropy.py --method ppl                 # tiny preset on CPU, a few minutes
    python rlvr_entropy.py --preset gsm8k --method ppl  # Qwen2.5-0.5B-Instruct on GSM8K, one GPU
    python tools/rlvr_tools.py compare --methods grpo,ppl,position --seeds 3 --jobs 2

The functions of sections 1-8 take tensors and plain values and return tensors or plain
values; each names in its docstring the helpers it calls, so it can be copied into another
trainer with them. Shapes: B = responses in a batch (prompts x G), G = group size,
T = completion length, V = vocabulary size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
import typing
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

# transformers, datasets, tokenizers and tqdm are imported where they are first needed, so
# the math in this file can be imported and tested without loading them.

METHODS = ("grpo", "ppl", "position", "posneg")


# =========================================================================================
# 1. Data
# Every example is a dict {"question": str, "answer": str}, "answer" the gold final answer
# only ("18"). Three sources: GSM8K from the hub, any local file, and a built-in arithmetic
# task made in code (section 12), so the tiny preset needs no download.
# =========================================================================================


def gold_answer(solution: str) -> str:
    """GSM8K writes the gold answer after '####' at the end of the worked solution."""
    _, sep, tail = solution.rpartition("####")
    return (tail if sep else solution).strip()


def load_gsm8k(split: str) -> list[dict]:
    """GSM8K ('main' config) from the Hugging Face hub: question + gold answer (gold_answer)."""
    from datasets import load_dataset

    rows = load_dataset("openai/gsm8k", "main", split=split)
    return [{"question": r["question"], "answer": gold_answer(r["answer"])} for r in rows]


def load_local_dataset(path: str, question_field: str = "question",
                       answer_field: str = "answer") -> list[dict]:
    """A .jsonl / .json / .parquet / .csv file, one problem a row (datasets.load_dataset;
    gold_answer cuts a worked solution). ValueError, one sentence, for a file it cannot use."""
    from datasets import load_dataset

    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    file, kind = Path(path), kinds.get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(f"dataset {path} must end in one of {', '.join(kinds)}")
    if file.is_dir():
        raise ValueError(f"dataset {path} is a folder, not a file")
    if not file.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    if file.stat().st_size == 0:
        raise ValueError(f"dataset {path} is empty")
    if kind == "json":  # name the first broken line (the loader's own error does not)
        text = file.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)  # one JSON document (a list of rows) is fine as it is
        except ValueError:
            for n, line in enumerate(text.splitlines(), 1):  # else JSON lines, one row each
                try:
                    line.strip() and json.loads(line)
                except ValueError:
                    raise ValueError(f"line {n} of {path} is not valid JSON") from None
    try:
        rows = load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 (a malformed file, in any of the loaders' words)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "corresponds to no data" in reason:  # a CSV with a header and no rows
            raise ValueError(f"dataset {path} has no rows") from None
        raise ValueError(f"could not read {path} ({reason})") from None
    if len(rows) == 0:
        raise ValueError(f"dataset {path} has no rows")
    for i, r in enumerate(rows):
        for key in (question_field, answer_field):
            if r.get(key) is None or str(r[key]).strip() == "":
                raise ValueError(f"row {i} of {path} has no field '{key}' "
                                 f"(set --question-field / --answer-field)")
    return [{"question": str(r[question_field]), "answer": gold_answer(str(r[answer_field]))}
            for r in rows]


def build_prompt(tokenizer, question: str, instruction: str = "") -> str:
    """The text the policy continues. Uses the tokenizer's chat template when it has one,
    because instruct models were trained on it. Otherwise a plain Question/Answer form."""
    content = f"{question}\n{instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return f"Question: {content}\nAnswer: "


# =========================================================================================
# 2. Verifiable reward
# r = 1 if the response's final answer equals the gold answer: the *last* marker's (\boxed{x},
# '#### x', 'the answer is x'; a later one is a self-correction), else a closing sentence's
# one computed number. Never "the last number in the text" unless asked: it rewards the
# right number met on the way to a wrong one. Section 11 normalises units, LaTeX and
# separators and compares exact rationals, in linear time, never evaluating text.
# =========================================================================================


def math_reward(completion: str, gold: str, last_number_fallback: bool = False) -> float:
    """Verifiable reward r in {0, 1}: does the response's final answer equal the gold one?
    Two numbers are compared exactly; a number never equals a non-number (so '1 8' is not
    18); two non-numbers are compared as normalised strings. Uses extract_answer,
    normalize_answer and parse_number (section 11)."""
    pred = extract_answer(completion, last_number_fallback)
    if pred is None:
        return 0.0
    p, g = normalize_answer(pred), normalize_answer(gold)
    pn, gn = parse_number(p), parse_number(g)
    if pn is not None or gn is not None:
        return float(pn == gn)
    return float(p != "" and p == g)


# =========================================================================================
# 3. Rollouts
# G responses per prompt, in one batched model.generate call with the KV cache. Prompts are
# left-padded, so the completions start together; prompt g's rows are g*G .. g*G+G-1.
# =========================================================================================


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: list[str], group_size: int,
                      max_new_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0,
                      greedy: bool = False, eos_ids: list[int] | None = None) -> dict:
    """Sample `group_size` completions for each prompt. Tensors on the model's device:
      input_ids       (B, P+T)  prompt + completion; B = len(prompts) * group_size
      attention_mask  (B, P+T)  1 on prompt tokens and valid completion tokens
      completion_ids  (B, T)
      completion_mask (B, T)    1.0 up to and including the first EOS, 0.0 after it
      truncated       (B,)      True if the response hit max_new_tokens without an EOS
    (both masks from completion_mask_from_ids)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0).to(device)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0).to(device)
    eos = eos_ids or [tokenizer.eos_token_id]
    # Every knob explicit: unset ones come from the checkpoint's generation_config (Qwen
    # ships top_k=20, repetition_penalty>1), and the sampler would not be the trained pi.
    sampling = {"do_sample": False, "repetition_penalty": 1.0} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0,
        "min_p": None, "typical_p": 1.0, "repetition_penalty": 1.0}
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                         max_new_tokens=max_new_tokens, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1]:]
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos)
    return {"input_ids": out,
            "attention_mask": torch.cat([prompt_mask, completion_mask.long()], 1),
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "truncated": truncated}


def completion_mask_from_ids(completion_ids: torch.Tensor,
                             eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> mask (B, T) float, 1.0 up to and including the first EOS, and
    truncated (B,) bool, True where no EOS was generated. generate() pads finished rows
    with pad tokens, which may equal EOS, so only the first EOS counts."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    eos_before = is_eos.int().cumsum(1) - is_eos.int()  # EOS tokens strictly before t
    return (eos_before == 0).float(), ~is_eos.any(1)


def stop_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the generation config may list several (Qwen instruct
    stops at <|im_end|> and <|endoftext|>)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    return sorted(set(ids if isinstance(ids, list) else [ids]))


def decode_completions(tokenizer, rollout: dict) -> list[str]:
    """Text of each valid completion (up to its first EOS), special tokens dropped."""
    lengths = rollout["completion_mask"].sum(1).long().tolist()
    return [tokenizer.decode(ids[:n], skip_special_tokens=True)
            for ids, n in zip(rollout["completion_ids"].tolist(), lengths)]


def autocast_ctx(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA. The weights and AdamW state stay fp32: at lr 1e-6 most
    updates are below bf16's resolution and pure-bf16 weights would not move."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def sample_responses(model, tokenizer, questions: list[str], group_size: int,
                     max_new_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0,
                     greedy: bool = False, instruction: str = "",
                     eos_ids: list[int] | None = None, bf16: bool = False) -> tuple[dict, list]:
    """questions -> prompts (build_prompt) -> group_size responses each (generate_rollouts,
    stopping at eos_ids, else stop_token_ids, under autocast_ctx) -> (rollout, the B texts
    from decode_completions). Used by both the RL step and evaluation."""
    device = next(model.parameters()).device
    prompts = [build_prompt(tokenizer, q, instruction) for q in questions]
    with autocast_ctx(device, bf16):
        rollout = generate_rollouts(model, tokenizer, prompts, group_size, max_new_tokens,
                                    temperature=temperature, top_p=top_p, greedy=greedy,
                                    eos_ids=eos_ids or stop_token_ids(model, tokenizer))
    return rollout, decode_completions(tokenizer, rollout)


# =========================================================================================
# 4. Token statistics: log-probs, entropy, perplexity
#   log pi(o_t)  = z[o_t] - logsumexp(z),  z = logits / temperature (applied once, in fp32)
#   H_t          = -sum_v pi(v) log pi(v)                 (the whole vocabulary)
#   log_ppl(o_i) = -(1/|o_i|) sum_t log pi(o_{i,t}),  PPL = exp(log_ppl)    (as in [A])
# =========================================================================================


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_completion: int) -> torch.Tensor:
    """Raw logits z that predict the last `n_completion` tokens: (B, T, V).
    logits_to_keep skips the LM head on prompt positions. Position ids are cumsum(mask) - 1,
    as generate() used on left-padded prompts, or the log-probs would not be the sampler's.
    No temperature here: token_logprobs and token_entropy apply it in fp32."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_completion + 1, use_cache=False)
    return out.logits[:, :-1]  # position t predicts token t+1, so drop the last one


def logit_chunks(logits: torch.Tensor, chunk_elems: int = 2**24) -> list[torch.Tensor]:
    """Split (B, T, V) into (n, V) views of at most ~chunk_elems logits (64 MB in fp32), row
    by row: views, not the copy that reshape(-1, V) of a non-contiguous slice would make."""
    n = max(1, chunk_elems // logits.shape[-1])
    return [chunk for row in logits for chunk in row.split(n)]


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T in at least fp32 (fp64 stays fp64): the upcast comes before the division."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z / temperature if temperature != 1.0 else z


def _scaled_logsumexp(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.logsumexp(_scaled(chunk, temperature), -1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   temperature: float = 1.0, chunk_elems: int = 2**24) -> torch.Tensor:
    """log pi(token) for each position: (B, T, V) raw logits, (B, T) -> (B, T), differentiable.
    log pi(o_t) = z[o_t] / T - logsumexp(z / T), T the *sampling* temperature (else the
    ratio is != 1 on-policy). No log_softmax tensor: logsumexp runs chunk by chunk (fp32, or
    fp64 for fp64 logits), checkpointed when the upcast makes a copy, so autograd never holds
    a second (B, T, V) tensor. Helpers: logit_chunks, _scaled, _scaled_logsumexp."""
    from torch.utils.checkpoint import checkpoint

    picked = _scaled(logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), temperature)
    copies = temperature != 1.0 or logits.dtype not in (torch.float32, torch.float64)
    lse = [checkpoint(_scaled_logsumexp, c, temperature, use_reentrant=False)
           if copies and c.requires_grad else _scaled_logsumexp(c, temperature)
           for c in logit_chunks(logits, chunk_elems)]
    return picked - torch.cat(lse).view(picked.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0,
                  chunk_elems: int = 2**24) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v, p = softmax(z / T), over the full vocabulary:
    (B, T, V) raw logits -> (B, T), fp32 (fp64 for fp64 logits). No grad, a chunk of
    positions at a time (logit_chunks, _scaled): the whole batch's fp32 log-softmax would
    be 5 GB at 8 x 1024 tokens of Qwen."""
    out = []
    for chunk in logit_chunks(logits, chunk_elems):
        logp = torch.log_softmax(_scaled(chunk, temperature), -1)
        out.append(-(logp.exp().mul_(logp)).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def sequence_log_ppl(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log PPL(o_i) = -(sum_t mask * log pi) / |o_i|: (B, T), (B, T) -> (B,)."""
    return -(logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean of x over mask == 1, or None if the mask is empty (None is JSON-safe, NaN is not)."""
    n = mask.sum()  # where(), not x * mask: an inf outside the mask must not become NaN
    return torch.where(mask > 0, x, 0).sum().item() / n.item() if n > 0 else None


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) of a 1-D tensor (linear interpolation), without the limit of
    2^24 elements that torch 2.13 has (a batch of the papers' size has far more tokens): the
    order statistics at floor and ceil of q (n - 1), by kthvalue, then lerp, the rank in x's
    dtype as torch computes it (its last bit can move between releases). (N,) -> scalar."""
    rank = torch.tensor(q, dtype=x.dtype) * (len(x) - 1)
    low = int(rank.floor())
    below, above = x.kthvalue(low + 1).values, x.kthvalue(min(low + 2, len(x))).values
    return torch.lerp(below, above, rank - low)


# =========================================================================================
# 5. Advantages: GRPO, then the shaping methods of paper [A]
# GRPO (Shao et al. 2024) needs no value network: each response is compared with the
# other answers to the same prompt:
#   A_i = (r_i - mean_g r) / (std_g r + eps)        (std unbiased, eps = 1e-6, as released)
# Dr. GRPO (Liu et al. 2025) drops the std (--no-std-scaling). A group of equal rewards
# has A = 0 everywhere and teaches nothing; zero_var_frac counts them as they grow.
# =========================================================================================


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (B,) -> advantages (B,), zero_variance (B // G,) bool."""
    r = rewards.view(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    if scale_by_std:
        centered = centered / (r.std(1, keepdim=True) + eps)
    zero_variance = (r == r[:, :1]).all(1)
    return centered.masked_fill(zero_variance[:, None], 0.0).reshape(-1), zero_variance


# --- Method A1, perplexity-based shaping ("ppl") -----------------------------------------
#   l_i = log PPL under pi_old;  per group: Q1, Q3, IQR = Q3 - Q1;
#   mu, sigma = mean and population std of the l_i inside [Q1 - 1.5 IQR, Q3 + 1.5 IQR]
#   z_i = (l_i - mu) / sigma  (for every response)
#   A'_{i,t} = A_{i,t} clamp(1 - alpha z_i, 0.8, 1.2)
# Low-perplexity responses (z < 0) get weight > 1. The released script (low_ppl.sh) computes
# this weight but never multiplies it in (see docs/methods.md). We apply it, as the paper intends.


def ppl_weights(log_ppl: torch.Tensor, group_size: int, alpha: float = 0.01,
                clip_range: tuple[float, float] = (0.8, 1.2)) -> torch.Tensor:
    """Per-response advantage weight from a robust z-score of log-PPL: (B,) -> (B,)."""
    x = log_ppl.float().view(-1, group_size)
    q1 = torch.quantile(x, 0.25, dim=1, keepdim=True)  # G values per row: far below the limit
    q3 = torch.quantile(x, 0.75, dim=1, keepdim=True)
    iqr = q3 - q1
    keep = (x >= q1 - 1.5 * iqr) & (x <= q3 + 1.5 * iqr)  # outliers out of the statistics only
    keep = keep | ~keep.any(1, keepdim=True)             # if none survive, use all
    n = keep.sum(1, keepdim=True)
    mu = (x * keep).sum(1, keepdim=True) / n
    sigma = (((x - mu) ** 2 * keep).sum(1, keepdim=True) / n).sqrt()
    sigma = torch.where(sigma <= 1e-6, torch.ones_like(sigma), sigma)
    z = (x - mu) / sigma
    return (1 - alpha * z).clamp(*clip_range).reshape(-1)


# --- Method A2, position-based shaping ("position") --------------------------------------
#   p_{i,t} = t / |o_i|  (t counts valid tokens from 0)
#   b_{i,t} = min(alpha sigmoid(k (p_{i,t} - 0.5)), 0.5 |A_{i,t}|)
#   A'_{i,t} = A_{i,t} + sign(A_{i,t}) b_{i,t}
# Late tokens of a correct response get more credit, late tokens of a wrong one more blame.


def position_shaped_advantages(advantages: torch.Tensor, mask: torch.Tensor,
                               alpha: float = 0.1, k: float = 15.0) -> torch.Tensor:
    """Token advantages (B, T) plus the sign-following end-of-response bonus -> (B, T).

    Completion tokens are contiguous from column 0, so token t's index is t itself.
    """
    length = mask.sum(1, keepdim=True).clamp(min=1)
    p = torch.arange(mask.shape[1], device=mask.device)[None, :] / length
    bonus = torch.minimum(alpha * torch.sigmoid(k * (p - 0.5)), 0.5 * advantages.abs())
    return (advantages + torch.sign(advantages) * bonus.detach()) * mask


def shaping_active(method: str, step: int, shape_from: int, shape_until: int) -> bool:
    """The shaping methods of [A] act inside [shape_from, shape_until); GRPO elsewhere."""
    return method in ("ppl", "position") and shape_from <= step < shape_until


# --- PSR / NSR / W-REINFORCE (Zhu et al., arXiv 2506.01347) --------------------------------
#   A_i = lambda if response i is correct, -1 if it is wrong: no group baseline, no std.
# PSR trains on the correct responses only (A = 1), NSR on the wrong ones (A = -1); as in
# the released code (batch.subset), rl_step drops the rows with A = 0 from the batch and the
# token-mean's denominator. W-REINFORCE keeps both with lambda = 0.1: mostly pushing down
# wrong answers, which the authors found keeps entropy and pass@k up.


def weighted_reinforce_advantages(rewards: torch.Tensor, pos_weight: float = 0.1,
                                  neg_weight: float = 1.0) -> torch.Tensor:
    """A_i = pos_weight if r_i = 1, -neg_weight if r_i = 0 (r > 0.5 counts as correct):
    (B,) -> (B,). PSR: (1, 0); NSR: (0, 1); W-REINFORCE: (0.1, 1)."""
    return torch.where(rewards > 0.5, rewards.new_tensor(pos_weight),
                       rewards.new_tensor(-neg_weight))


# =========================================================================================
# 6. Loss: the PPO-clipped token objective with Clip-Higher (DAPO), or CISPO
#   ratio = pi_theta(o_t) / pi_old(o_t)
#   L_t   = -min(ratio A_t, clip(ratio, 1 - eps_low, 1 + eps_high) A_t)
# eps_high > eps_low (0.28 vs 0.2) leaves more room to raise unlikely tokens: the
# standard guard against entropy collapse. CISPO clips the weight instead (--policy-loss).
# token-mean = sum over valid tokens / their count; seq-mean-token-mean = mean over
# responses of their token means. Both take explicit denominators, so summed micro-batches
# give exactly the mini-batch's gradient.
# =========================================================================================


def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       advantages: torch.Tensor, clip_low: float = 0.2,
                       clip_high: float = 0.28) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss and ratio: (B, T) x 3 -> (B, T), (B, T)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), ratio


def cispo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, clip_low: float = 0.2,
                     clip_high: float = 0.28) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585) clips the importance weight, not the update:
      L_t = -sg(clip(ratio_t, 1 - eps_low, 1 + eps_high)) A_t log pi_theta(o_t)
    A token outside the range keeps its gradient, at the clipped weight; where no ratio
    leaves it, the gradient -ratio A grad log pi is the clipped loss's (the values differ).
    verl's loss_mode=cispo is this (clip_ratio 0.2 / 0.2); TRL's loss_type="cispo" caps
    the weight above only, at epsilon_high itself (5.0 advised). (B, T) x 3 -> (B, T) x 2."""
    ratio = torch.exp(logprobs - old_logprobs)
    weight = ratio.clamp(1 - clip_low, 1 + clip_high).detach()
    return -weight * advantages * logprobs, ratio


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean",
                   n_tokens: float | None = None, n_seqs: float | None = None) -> torch.Tensor:
    """(B, T) token losses -> scalar. n_tokens / n_seqs default to this batch's own counts;
    pass the mini-batch totals when this is one micro-batch of it."""
    if loss_agg == "token-mean":
        return (token_loss * mask).sum() / (n_tokens if n_tokens is not None else mask.sum())
    if loss_agg == "seq-mean-token-mean":
        per_seq = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / (n_seqs if n_seqs is not None else mask.shape[0])
    raise ValueError(f"unknown loss aggregation {loss_agg!r}")


@torch.no_grad()
def clip_stats(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_low: float, clip_high: float) -> dict[str, float]:
    """Token fractions where the clip removed the gradient, and the k3 estimate of
    KL(pi_old || pi_theta) = E[(ratio - 1) - log ratio] (Schulman 2020), as masked_mean."""
    low = ((advantages < 0) & (ratio < 1 - clip_low)).float()
    high = ((advantages > 0) & (ratio > 1 + clip_high)).float()
    kl = (ratio - 1) - torch.log(ratio)
    return {"clip_frac_low": masked_mean(low, mask) or 0.0,
            "clip_frac_high": masked_mean(high, mask) or 0.0,
            "approx_kl": masked_mean(kl, mask) or 0.0}


# --- Method B, positive/negative-advantage reweighting ("posneg") -----------------------
# Why positive advantages collapse entropy ([B]): for the unclipped token objective, the
# gradient on the logit of vocabulary entry v at step t is
#     sampled v:  ratio_t (1 - pi(v)) A_t        any other v:  -ratio_t pi(v) A_t
# With A > 0 the sampled (usually likely) token takes mass from all others: sharper. With
# A < 0 its mass spreads over the rest: flatter. lambda < 1 tilts the balance to entropy:
#     w_{i,t} = lambda if A_{i,t} > 0,  neg_weight if A_{i,t} < 0,  else 1;  L'_t = w_t L_t


def posneg_token_weights(advantages: torch.Tensor, pos_weight: float,
                         neg_weight: float = 1.0) -> torch.Tensor:
    """Per-token loss weights from the advantage's sign: (B, T) -> (B, T)."""
    ones = torch.ones_like(advantages)
    return torch.where(advantages > 0, pos_weight * ones,
                       torch.where(advantages < 0, neg_weight * ones, ones))


def scheduled_lambda(schedule: str, step: int, total_steps: int, fixed: float = 1.0,
                     n_epochs: int = 2) -> float:
    """lambda at `step` (0-indexed) for the step-driven schedules of [B]:
      fixed:  lambda = fixed
      stage:  0 for the first half of the run, then linear from 0 up to 1 at the last step
      epoch:  (e - 1) / (E - 1) in epoch e of E, the run cut into E equal parts of steps
    """
    if schedule == "fixed":
        return fixed
    if schedule == "stage":
        half, ramp = total_steps // 2, total_steps - 1 - total_steps // 2
        if step < half:
            return 0.0
        return 1.0 if ramp <= 0 else min(1.0, (step - half) / ramp)  # ramp 0: one step, at 1
    if schedule == "epoch":
        epoch = 1 + step * n_epochs // total_steps  # 1 .. E
        return (epoch - 1) / (n_epochs - 1)
    raise ValueError(f"unknown lambda schedule {schedule!r}")


def entropy_guided_lambda(pos_weight: float, entropy: float, target: float = 0.2,
                          step_size: float = 0.05) -> float:
    """[B]'s recommended controller, run after each step k with batch entropy H_k:
    lambda_{k+1} = clip(lambda_k - step, 0, 1) if H_k < target, else clip(lambda_k + step, 0, 1).
    Entropy too low -> weaker positive updates -> entropy rises, and the reverse."""
    pos_weight = pos_weight - step_size if entropy < target else pos_weight + step_size
    return min(1.0, max(0.0, pos_weight))


# --- The field's entropy controls, beside the papers' methods -----------------------------
# Each picks its tokens once over the whole rollout batch (verl and TRL pick per
# micro-batch, so their set changes with the micro-batch size).
# Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617): one policy-gradient step changes
# entropy by about -eta Cov(log pi, A) over the batch's tokens, so the tokens of largest
#   cov_t = (A_t - mean A) (log pi_t - mean log pi)
# collapse it. Clip-Cov removes the gradient of a random few with lb < cov_t < ub; KL-Cov
# adds coef |log pi - log pi_old| to the loss of the top-k (verl's ratio 2e-4 is one token of
# the tiny preset's 8,000: it uses 5e-3 and 1e-2).
# Forking tokens (Wang et al., arXiv 2506.01939): the loss only on the tokens whose entropy
# is in the batch's top rho = 20%, the "forks" where the reasoning branches.


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """cov_t = (A_t - mean A)(log pi_t - mean log pi), the means over the valid tokens of
    the whole batch: (B, T) x 3 -> (B, T), 0 on padding."""
    valid = mask > 0
    a, lp = advantages[valid], logprobs[valid].detach()
    return torch.where(valid, (advantages - a.mean()) * (logprobs.detach() - lp.mean()), 0.0)


def clip_cov_mask(cov: torch.Tensor, mask: torch.Tensor, ratio: float = 2e-4,
                  low: float = 1.0, high: float = 5.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip-Cov's tokens: max(1, int(ratio N)) drawn at random among the valid tokens with
    low < cov < high (fewer if fewer qualify), N the valid tokens: (B, T) -> (B, T) bool.
    Their loss weight becomes 0 (the gradient is removed)."""
    candidates = ((cov > low) & (cov < high) & (mask > 0)).flatten().nonzero()[:, 0]
    n = min(max(1, int(ratio * int((mask > 0).sum()))), len(candidates))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
    picked = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    picked[chosen] = True
    return picked.view(cov.shape)


def kl_cov_mask(cov: torch.Tensor, mask: torch.Tensor, ratio: float = 2e-4) -> torch.Tensor:
    """KL-Cov's tokens: the max(1, int(ratio N)) valid tokens of largest cov:
    (B, T) -> (B, T) bool."""
    valid = (mask > 0).flatten()
    k = max(1, int(ratio * int(valid.sum())))
    scores = cov.flatten().masked_fill(~valid, -torch.inf)
    picked = torch.zeros_like(valid)
    picked[scores.topk(min(k, int(valid.sum()))).indices] = True
    return picked.view(cov.shape)


def kl_cov_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      advantages: torch.Tensor, picked: torch.Tensor,
                      coef: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-Cov's token loss, which replaces the clip: L_t = -ratio_t A_t, plus
    coef |log pi_t - log pi_old,t| where picked: (B, T) x 4 -> (B, T), ratio (B, T).
    On-policy (log pi = log pi_old) the penalty and its gradient are 0: KL-Cov acts only
    on updates after the first (--mini-batches or --updates-per-batch above 1)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    return -ratio * advantages + coef * picked * log_ratio.abs(), ratio


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor,
                      top_fraction: float = 0.2) -> torch.Tensor:
    """The forking tokens: valid tokens whose entropy is at least the (1 - top_fraction)
    quantile (linear interpolation, the helper quantile) of the batch's valid entropies:
    (B, T) -> (B, T) bool. top_fraction 1 keeps every valid token."""
    valid = mask > 0
    if not valid.any():
        return valid
    threshold = quantile(entropy[valid].float(), 1.0 - top_fraction)
    return valid & (entropy >= threshold)


# Entropy bonus: loss -= alpha H, H the current policy's token-mean entropy, with its gradient
# (TRL's entropy_coef, verl's entropy_coeff). Adaptive alpha (Skywork-OR1, arXiv 2505.22312):
# raised under a target entropy, lowered and off above. Released: 0.2, 1e-4, [0, 0.005], 0.


def trainable_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v with its graph, for the bonus: (B, T, V) -> (B, T). Unlike
    token_entropy (no graph, chunked), it keeps the log-softmax for backward. Uses _scaled."""
    logp = torch.log_softmax(_scaled(logits, temperature), -1)
    return -(logp.exp() * logp).sum(-1)


def adaptive_entropy_coef(coef: float, entropy: float, target: float = 0.2,
                          delta: float = 1e-4, max_coef: float = 0.005) -> tuple[float, float]:
    """Skywork-OR1's controller, run after step k with its batch entropy e_k:
    c_{k+1} = clip(c_k + delta if e_k < target else c_k - delta, 0, max_coef), and step
    k+1's bonus is alpha = c_{k+1} if e_k < target, else 0. Returns (c_{k+1}, alpha)."""
    coef = min(max_coef, max(0.0, coef + delta if entropy < target else coef - delta))
    return coef, (coef if entropy < target else 0.0)


# =========================================================================================
# 7. One RL step: the algorithm, top to bottom
# rl_step() is GRPO with the shaping of [A], the weights of [B] and the field's controls:
#   sample G responses per prompt (3) -> reward them (2) -> old log-probs and entropy, no
#   grad (4) -> advantages A_i, shaped (5) -> clipped-loss updates over mini-batches (6),
# with the plain values of `args` (Args, section 14) as its settings.
# =========================================================================================


def length_grouped(rows: torch.Tensor, lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split row indices into micro-batches of `size` rows of similar response length,
    longest first, so that each, cut to its longest response (trimmed_rows), carries little
    padding. Gradient accumulation makes the update independent of the grouping."""
    return list(rows[lengths[rows].argsort(descending=True, stable=True)].split(size))


def trimmed_rows(rollout: dict, idx: torch.Tensor,
                 length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of rows `idx`, cut after `length` completion tokens.
    Exact: the cut positions are padding after EOS, and a causal model never looks ahead."""
    end = rollout["input_ids"].shape[1] - rollout["completion_ids"].shape[1] + length
    return rollout["input_ids"][idx, :end], rollout["attention_mask"][idx, :end]


def micro_batch_logits(model, rollout: dict, rows: torch.Tensor, micro_batch_size: int,
                       bf16: bool = False):
    """The one micro-batched forward pass, shared by the no-grad pass and the update:
    yields (idx, n, logits) for each micro-batch of `rows` from length_grouped (size 0: all
    at once), logits (b, n, V) raw (completion_logits under autocast_ctx), cut by
    trimmed_rows to its longest response n."""
    lengths = rollout["completion_mask"].sum(1).long()
    for idx in length_grouped(rows, lengths, micro_batch_size or len(rows)):
        n = int(lengths[idx].max())
        with autocast_ctx(rows.device, bf16):
            yield idx, n, completion_logits(model, *trimmed_rows(rollout, idx, n), n)


@torch.no_grad()
def old_policy_stats(model, rollout: dict, temperature: float, micro_batch_size: int,
                     bf16: bool = False, with_top: bool = False):
    """log pi_old and entropy of every completion token under the sampling policy, no graph:
    (B, T), (B, T); 0 after each EOS. with_top: also (B, T) bool, whether the sampled token
    was the policy's most likely one. Uses micro_batch_logits, token_logprobs, token_entropy."""
    comp, mask = rollout["completion_ids"], rollout["completion_mask"]
    logps = ents = None
    tops = torch.zeros_like(mask, dtype=torch.bool)
    rows = torch.arange(len(comp), device=comp.device)
    for idx, n, logits in micro_batch_logits(model, rollout, rows, micro_batch_size, bf16):
        lp = token_logprobs(logits, comp[idx, :n], temperature)
        h = token_entropy(logits, temperature)
        if logps is None:  # in the logits' precision: fp64 for an fp64 model
            logps, ents = lp.new_zeros(mask.shape), h.new_zeros(mask.shape)
        logps[idx, :n], ents[idx, :n] = lp, h
        if with_top:  # a full-vocabulary argmax: only when asked for
            tops[idx, :n] = logits.argmax(-1) == comp[idx, :n]
    return (logps, ents, tops) if with_top else (logps, ents)


def mini_batch_gradient(model, rollout: dict, targets: dict, rows: torch.Tensor, args: Args, *,
                        entropy_coef: float = 0.0) -> tuple[float | None, list[dict]]:
    """loss.backward() over the micro-batches of the mini-batch `rows` (micro_batch_logits,
    token_logprobs). Token t's loss is w_t L_t (clipped_token_loss or cispo_token_loss, or
    kl_cov_token_loss on KL-Cov's picks) minus entropy_coef x trainable_entropy, each over
    the mini-batch's own counts (aggregate_loss). `targets`: the batch's (B, T) old_logp,
    advantages, token_weights, kl_picked (or None). Returns (the loss, None if not finite;
    per micro-batch, clip_stats times its share of the tokens of all planned updates)."""
    mask, comp = rollout["completion_mask"], rollout["completion_ids"]
    n_tokens, n_seqs = mask[rows].sum(), float(len(rows))
    planned = args.updates_per_batch * args.mini_batches  # the stats are the mean over these
    loss_sum, clip = 0.0, []
    for idx, n, logits in micro_batch_logits(model, rollout, rows, args.micro_batch_size,
                                             args.bf16):
        logp = token_logprobs(logits, comp[idx, :n], args.temperature)
        old, adv, m = targets["old_logp"][idx, :n], targets["advantages"][idx, :n], mask[idx, :n]
        if targets["kl_picked"] is None:
            objective = cispo_token_loss if args.policy_loss == "cispo" else clipped_token_loss
            token_loss, ratio = objective(logp, old, adv, args.clip_low, args.clip_high)
        else:
            token_loss, ratio = kl_cov_token_loss(logp, old, adv, targets["kl_picked"][idx, :n],
                                                  args.kl_cov_coef)
        weighted = token_loss * targets["token_weights"][idx, :n]
        loss = aggregate_loss(weighted, m, args.loss_agg, n_tokens, n_seqs)
        if entropy_coef:  # the bonus pushes every token's entropy up
            entropy = trainable_entropy(logits, args.temperature)
            loss = loss - entropy_coef * aggregate_loss(entropy, m, args.loss_agg, n_tokens,
                                                        n_seqs)
        if not torch.isfinite(loss):
            return None, clip
        loss.backward()
        loss_sum += loss.item()
        share = m.sum().item() / max(n_tokens.item(), 1) / planned
        stats = clip_stats(ratio, adv, m, args.clip_low, args.clip_high)
        clip.append({key: v * share for key, v in stats.items()})
    return loss_sum, clip


def policy_update(model, optimizer, rollout: dict, targets: dict, args: Args, *,
                  n_passes: int = 1, entropy_coef: float = 0.0) -> dict:
    """n_passes passes over targets["rows"], each cut into args.mini_batches random
    mini-batches: one optimizer step each, on mini_batch_gradient's gradient clipped to
    max_grad_norm; a non-finite loss skips its update. Returns the mean loss, clip fractions
    and approx KL (clip_stats), the mean grad norm and the counts."""
    stats = {"loss": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0, "approx_kl": 0.0}
    grad_norms, skipped, optimizer_s, rows = [], 0, 0.0, targets["rows"]
    model.train()
    for _ in range(n_passes):
        for mini_batch in rows[torch.randperm(len(rows), device=rows.device)].chunk(
                args.mini_batches):
            optimizer.zero_grad(set_to_none=True)
            loss, clip = mini_batch_gradient(model, rollout, targets, mini_batch, args,
                                             entropy_coef=entropy_coef)
            for part in clip:
                for key, v in part.items():
                    stats[key] += v
            if loss is None:
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            tic = time.perf_counter()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            grad_norms.append(norm.item())
            optimizer.step()
            optimizer_s += time.perf_counter() - tic
            stats["loss"] += loss
    stats["loss"] /= max(len(grad_norms), 1)
    return {**stats, "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
            "n_updates": len(grad_norms), "skipped_updates": skipped, "optimizer_s": optimizer_s}


def rl_step(model, tokenizer, optimizer, questions: list[str], golds: list[str], args: Args, *,
            reward_fn=math_reward, eos_ids: list[int] | None = None, pos_weight: float = 1.0,
            shaping: bool = False, entropy_coef: float = 0.0, now=time.perf_counter) -> dict:
    """One step of RL on len(questions) prompts x G responses (B rows); `pos_weight` is
    lambda of [B], `shaping` turns on [A]'s shaping, `entropy_coef` is the bonus alpha. In
    order: sample_responses, reward_fn, old_policy_stats, sequence_log_ppl, grpo_advantages
    (or weighted_reinforce_advantages), ppl_weights or position_shaped_advantages,
    posneg_token_weights, the controls' picks (high_entropy_mask, token_covariance,
    clip_cov_mask, kl_cov_mask), policy_update. Returns the step's tensors (rewards (B,),
    entropy (B, T), ...), the update's stats and seconds per phase."""
    device, G = next(model.parameters()).device, args.group_size
    clock = [now()]
    # rollouts (section 3): G samples per prompt from pi_old, rows g*G .. g*G+G-1
    rollout, texts = sample_responses(
        model, tokenizer, questions, G, args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, instruction=args.instruction, eos_ids=eos_ids, bf16=args.bf16)
    mask = rollout["completion_mask"]
    clock.append(now())
    # verifiable rewards (section 2); a NaN reward must not reach the weights
    row_golds = [g for g in golds for _ in range(G)]
    rewards = torch.tensor([reward_fn(text, g) for text, g in zip(texts, row_golds)], device=device)
    rewards_ok = bool(torch.isfinite(rewards).all())
    rewards = torch.nan_to_num(rewards, nan=0.0, posinf=0.0, neginf=0.0)
    clock.append(now())
    # log pi_old, entropy and log-PPL under the sampling policy (section 4)
    old_logp, entropy, is_top = old_policy_stats(model, rollout, args.temperature,
                                                 args.micro_batch_size, args.bf16, with_top=True)
    log_ppl = sequence_log_ppl(old_logp, mask)
    clock.append(now())
    # advantages (section 5): GRPO's A_i for every token of response i, then [A]'s shaping
    adv_seq, zero_var = grpo_advantages(rewards, G, not args.no_std_scaling)
    keep = torch.ones_like(rewards, dtype=torch.bool)  # (B,) the rows the update trains on
    if args.advantage_estimator == "reinforce":  # no baseline: lambda if right, -1 if wrong
        adv_seq = weighted_reinforce_advantages(rewards, args.reinforce_pos, args.reinforce_neg)
        keep = adv_seq != 0  # PSR / NSR: the rows with A = 0 leave the batch
    advantages = adv_seq[:, None] * mask
    ppl_weight = torch.ones_like(adv_seq)
    if shaping and args.method == "ppl":  # A'_{i,t} = A_{i,t} clamp(1 - alpha z_i, 0.8, 1.2)
        ppl_weight = ppl_weights(log_ppl, G, args.ppl_alpha)
        advantages = advantages * ppl_weight[:, None]
    if shaping and args.method == "position":  # A' = A + sign(A) min(alpha s(k(p - .5)), |A|/2)
        advantages = position_shaped_advantages(advantages, mask, args.pos_alpha, args.pos_k)
    token_weights = torch.ones_like(advantages)
    if args.method == "posneg":  # [B]: w = lambda where A > 0, neg_weight where A < 0
        token_weights = posneg_token_weights(advantages, pos_weight, args.neg_weight)
    # the field's controls, each picked once over the trained rows of the batch (section 6)
    picked, kl_picked = {}, None  # the tokens each control acts on, for the metrics row
    trained = mask * keep[:, None]  # the valid tokens of the rows the update trains on
    if args.forking_top < 1:  # loss on the batch's top-rho entropy tokens only
        picked["forking"] = high_entropy_mask(entropy, trained, args.forking_top)
        token_weights = token_weights * picked["forking"]
    if args.clip_cov or args.kl_cov:
        cov = token_covariance(old_logp, advantages, trained)
        if args.clip_cov:  # Clip-Cov: a few high-covariance tokens lose their gradient
            picked["clip_cov"] = clip_cov_mask(cov, trained, args.clip_cov_ratio,
                                               args.clip_cov_low, args.clip_cov_high)
            token_weights = token_weights * ~picked["clip_cov"]
        if args.kl_cov:  # KL-Cov: the top ones get |log pi - log pi_old| in their loss
            kl_picked = picked["kl_cov"] = kl_cov_mask(cov, trained, args.kl_cov_ratio)
    # clipped-loss updates (section 6); none at all when a reward was not finite
    targets = {"old_logp": old_logp, "advantages": advantages, "token_weights": token_weights,
               "kl_picked": kl_picked, "rows": keep.nonzero()[:, 0]}
    update = policy_update(model, optimizer, rollout, targets, args, entropy_coef=entropy_coef,
                           n_passes=args.updates_per_batch if rewards_ok and keep.any() else 0)
    update["skipped_updates"] += not rewards_ok
    clock.append(now())
    phases = {"rollout": clock[1] - clock[0], "reward": clock[2] - clock[1],
              "old_logp": clock[3] - clock[2], "optimizer": update["optimizer_s"],
              "loss_backward": clock[4] - clock[3] - update["optimizer_s"]}
    return {"rollout": rollout, "texts": texts, "rewards": rewards, "rewards_ok": rewards_ok,
            "old_logp": old_logp, "entropy": entropy, "is_top": is_top, "log_ppl": log_ppl,
            "zero_var": zero_var, "advantages": advantages, "ppl_weight": ppl_weight,
            "token_weights": token_weights, "picked": picked, "shaping": shaping,
            "update": update, "phases": phases}


# =========================================================================================
# 8. Evaluation: greedy accuracy, and avg@k / pass@k as the papers report them
#   avg@k  = mean over problems of c/k                (c correct among k samples)
#   pass@k = mean over problems of 1 - C(n-c, k) / C(n, k)   (Chen et al. 2021, unbiased;
#            with n = k samples it is the share of problems solved at least once)
# =========================================================================================


@torch.no_grad()
def eval_outcomes(model, tokenizer, problems: list[dict], k: int, max_new_tokens: int, *,
                  instruction: str = "", reward_fn=math_reward, batch_size: int = 256,
                  bf16: bool = False, eos_ids: list[int] | None = None, greedy: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, confidences: list | None = None,
                  micro_batch_size: int = 8) -> list[list[float]]:
    """1.0 / 0.0 (solved or not) for k responses to each problem (sample_responses, batch_size
    at a time): one list of k per problem. A `confidences` list gets each response's
    answer_confidence (old_policy_stats: one more forward, at T = 1 for greedy ones)."""
    from tqdm import tqdm

    outcomes = []
    per_batch = max(1, batch_size // k)
    # A transient bar, shown only on a terminal: the training bar and the log stay clean.
    desc = "eval greedy" if greedy else f"eval {k} samples each"
    for i in tqdm(range(0, len(problems), per_batch), desc=desc, leave=False, disable=None,
                  dynamic_ncols=True):
        chunk = problems[i:i + per_batch]
        rollout, texts = sample_responses(
            model, tokenizer, [p["question"] for p in chunk], k, max_new_tokens,
            temperature=temperature, top_p=top_p, greedy=greedy, instruction=instruction,
            eos_ids=eos_ids, bf16=bf16)
        # solved = reward above 0.5 (a NaN from a broken reward counts as unsolved)
        outcomes += [[float(reward_fn(texts[j * k + g], p["answer"]) > 0.5) for g in range(k)]
                     for j, p in enumerate(chunk)]
        if confidences is not None:
            logp, _ = old_policy_stats(model, rollout, 1.0 if greedy else temperature,
                                       micro_batch_size, bf16)
            confidences += answer_confidence(tokenizer, rollout["completion_ids"],
                                             rollout["completion_mask"], logp, texts).tolist()
    return outcomes


def greedy_calibration(model, tokenizer, problems: list[dict], max_new_tokens: int,
                       **eval_kw) -> dict:
    """Greedy accuracy (share of problems whose greedy response earns reward 1) and [B]'s
    calibration: ECE (expected_calibration_error) of the confidence in each greedy answer
    (answer_confidence), and the mean confidence. eval_kw: eval_outcomes' keywords."""
    confidences: list[float] = []
    outcomes = eval_outcomes(model, tokenizer, problems, 1, max_new_tokens, greedy=True,
                             confidences=confidences, **eval_kw)
    correct, conf = torch.tensor([o[0] for o in outcomes]), torch.tensor(confidences)
    return {"accuracy": sum(o[0] for o in outcomes) / max(1, len(problems)),
            "ece": expected_calibration_error(conf, correct), "confidence": conf.mean().item()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_sampled(model, tokenizer, problems: list[dict], k: int, temperature: float,
                     top_p: float, *, seed: int, max_new_tokens: int, **eval_kw) -> tuple:
    """(avg@k, pass@k by pass_at_k) over the problems, k samples each (eval_outcomes) at
    `temperature` / `top_p` (0.6 / 0.95 in [A]'s released runs), under a forked RNG seeded
    with `seed`: the score does not depend on when it is taken, nor moves the training RNG."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        outcomes = eval_outcomes(model, tokenizer, problems, k, max_new_tokens,
                                 temperature=temperature, top_p=top_p, **eval_kw)
    n = len(outcomes)
    avg = sum(sum(o) / len(o) for o in outcomes) / max(1, n)
    pas = sum(pass_at_k(len(o), int(sum(o)), len(o)) for o in outcomes) / max(1, n)
    return avg, pas


# =========================================================================================
# 9. The training loop: rl_step (section 7) inside evaluation, logging and checkpoints
# What changes from step to step lives in one LoopState, which a checkpoint saves (13).
# =========================================================================================


@dataclass
class LoopState:
    step: int = 0                   # the next step to run
    pos_weight: float = 1.0         # lambda of [B]
    order: list[int] = field(default_factory=list)  # what is left of this epoch's data order
    nonfinite_skips: int = 0        # updates skipped for a NaN / inf reward or loss
    accuracy: float | None = None   # the latest greedy held-out accuracy
    shape_from: int = 0             # first step of [A]'s shaping (moves to the plateau, if asked)
    stage_step: int | None = None   # the detected start of the plateau stage, once found
    entropy_coef: float = 0.0       # c of the adaptive entropy bonus (Skywork-OR1)
    entropy_bonus: float = 0.0      # alpha, the bonus of the next step


def next_batch(problems: list[dict], state: LoopState, order_rng: random.Random, n: int) -> list:
    """The next n problems of a shuffled pass over the data, reshuffled every epoch."""
    while len(state.order) < n:
        perm = list(range(len(problems)))
        order_rng.shuffle(perm)
        state.order += perm
    batch, state.order = [problems[i] for i in state.order[:n]], state.order[n:]
    return batch


def entropy_controllers(state: LoopState, args: Args, entropy: float) -> None:
    """After step k, from its batch entropy: [B]'s entropy-guided lambda and Skywork-OR1's
    adaptive bonus (entropy_guided_lambda, adaptive_entropy_coef) set step k+1's values."""
    if args.method == "posneg" and args.lambda_schedule == "entropy":
        state.pos_weight = entropy_guided_lambda(state.pos_weight, entropy, args.entropy_target,
                                                 args.lambda_step)
    if args.adaptive_entropy:
        state.entropy_coef, state.entropy_bonus = adaptive_entropy_coef(
            state.entropy_coef, entropy, args.entropy_coef_target, args.entropy_coef_delta,
            args.entropy_coef_max)


def start_loop(args: Args, model, resume: dict | None, metrics_path: Path) -> tuple:
    """What the loop carries from step to step, before its first step: (LoopState, AdamW,
    its LR schedule (linear warm-up), the data order's RNG, the rows so far, the start
    time). Fresh (lambda_0 = 0 under [B]'s entropy schedule), or restored from a checkpoint
    (restore_training, section 13), with the stage of [A] found again in the rows kept."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps)))
    order_rng = random.Random(args.seed)  # data order: reshuffled each epoch over the train set
    plateau = args.shape_from == "plateau"  # shaping waits for the detected plateau
    state = LoopState(pos_weight=0.0 if args.lambda_schedule == "entropy" else args.pos_weight,
                      shape_from=args.steps if plateau else args.shape_from,
                      entropy_coef=args.entropy_coef, entropy_bonus=args.entropy_coef)
    history, start = [], time.time()
    if resume is None:  # a fresh run starts an empty metrics.jsonl
        metrics_path.write_text("")
    else:  # every piece of state back, and the rows past the checkpoint dropped
        history, start = restore_training(resume, state, optimizer, scheduler, order_rng,
                                          metrics_path)
    state.stage_step = detect_plateau([r["entropy"] for r in history],
                                      [r["reward"] for r in history], args.stage_window,
                                      args.stage_frac, args.stage_patience)
    if plateau:  # shaping starts the step after the detection
        detected = next((r["step"] for r in history if r["stage"] == "plateau"), None)
        state.shape_from = args.steps if detected is None else detected + 1
    return state, optimizer, scheduler, order_rng, history, start


def train(args: Args, model, tokenizer, train_set: list[dict], eval_set: list[dict],
          out_dir: Path, *, resume: dict | None = None) -> dict:
    """The RL loop, every phase in plain sight. `resume`: a checkpoint's trainer state."""
    from tqdm import tqdm

    device, eos_ids = next(model.parameters()).device, stop_token_ids(model, tokenizer)
    reward_fn = reward_function(args.reward, args.last_number_fallback)
    eval_kw = {"max_new_tokens": args.max_new_tokens, "instruction": args.instruction,
               "reward_fn": reward_fn, "batch_size": args.eval_batch_size, "bf16": args.bf16,
               "eos_ids": eos_ids, "micro_batch_size": args.micro_batch_size or 8}
    sampled_kw = {"k": args.eval_k, "temperature": args.eval_temperature,
                  "top_p": args.eval_top_p, "seed": args.seed + 1, **eval_kw}
    metrics_path = out_dir / "metrics.jsonl"
    state, optimizer, scheduler, order_rng, history, start = start_loop(args, model, resume,
                                                                        metrics_path)

    def now() -> float:  # CUDA kernels run asynchronously: wait, or phase times are wrong
        if args.profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    stop = {"signum": None}  # set by SIGINT / SIGTERM: finish the step, save, exit
    previous_handlers = catch_stop_signals(stop)
    bar = tqdm(range(state.step, args.steps), desc=args.method, dynamic_ncols=True,
               initial=state.step, total=args.steps)
    for step in bar:
        t0, tic = time.time(), now()
        if device.type == "cuda":  # peak_mem_mb is this step's peak, printed or not
            torch.cuda.reset_peak_memory_stats(device)
        # 1. evaluate the policy that is about to sample this step's batch (section 8)
        due = step % args.eval_every == 0
        calibration = greedy_calibration(model, tokenizer, eval_set, **eval_kw) if due else None
        state.accuracy = calibration["accuracy"] if due else state.accuracy
        sampled = (evaluate_sampled(model, tokenizer, eval_set, **sampled_kw)
                   if step == 0 and args.eval_k else (None, None))
        eval_s = now() - tic
        # 2. one RL step (section 7) on the next batch, with this step's lambda and shaping
        batch = next_batch(train_set, state, order_rng, args.prompts_per_step)
        if args.method == "posneg" and args.lambda_schedule != "entropy":
            state.pos_weight = scheduled_lambda(args.lambda_schedule, step, args.steps,
                                                args.pos_weight, args.lambda_epochs)
        out = rl_step(model, tokenizer, optimizer, [p["question"] for p in batch],
                      [p["answer"] for p in batch], args, reward_fn=reward_fn, eos_ids=eos_ids,
                      pos_weight=state.pos_weight, entropy_coef=state.entropy_bonus, now=now,
                      shaping=shaping_active(args.method, step, state.shape_from,
                                             args.shape_until))
        # 3. what the update moved, re-scored under the new policy (section 10)
        movement, tic = None, now()
        if args.token_dynamics_every and step % args.token_dynamics_every == 0:
            movement = token_dynamics(model, out, args)
        out["phases"]["token_dynamics"] = now() - tic
        scheduler.step()
        if skipped := out["update"]["skipped_updates"]:
            state.nonfinite_skips += skipped
            tqdm.write(f"warning: non-finite {'loss' if out['rewards_ok'] else 'reward'} at "
                       f"step {step}; {skipped} update(s) skipped")
        # 4. one metrics row (section 10) and the stage of [A]
        loop = {"accuracy": state.accuracy if due else None, "sampled": sampled,
                "pos_weight": state.pos_weight if args.method == "posneg" else None,
                "lr": scheduler.get_last_lr()[0], "nonfinite_skips": state.nonfinite_skips,
                "eval_s": eval_s, "device": device, "step_time": time.time() - t0,
                "time": time.time() - start, "calibration": calibration, "movement": movement}
        row = metrics_row(step, out, loop, args.group_size)
        log_row(row, history, state, args, metrics_path, bar)
        # 5. the controllers set the next step's lambda and bonus; a checkpoint when due
        entropy_controllers(state, args, row["entropy"])
        state.step = step + 1
        if stop["signum"] is not None or (args.save_every and state.step % args.save_every == 0):
            save_checkpoint(out_dir, model, tokenizer, checkpoint_state(
                state, optimizer, scheduler, order_rng, time.time() - start))
            if stop["signum"] is not None:
                stop_after_signal(stop["signum"], step, out_dir, previous_handlers, bar)
    restore_signal_handlers(previous_handlers)
    final = greedy_calibration(model, tokenizer, eval_set, **eval_kw)
    sampled = evaluate_sampled(model, tokenizer, eval_set, **sampled_kw) if args.eval_k else (
        None, None)
    summary = run_summary(args, history, state, final, sampled, time.time() - start)
    if args.profile:
        print(format_profile("mean", summary["profile"]))
    return summary


# =========================================================================================
# 10. Entropy analysis of [A] and [B], computed live, and the metrics row (not needed to train)
# Stage: [A]'s rising stage (reward climbs, entropy falls fast) ends in a plateau. Online:
#   slope_x(t) = least-squares slope of x over the last w steps; up_R(t) = max_{s<=t}
#   slope_R(s), down_H(t) = max_{s<=t} -slope_H(s). The plateau starts once slope_R <
#   f up_R and -slope_H < f down_H for `patience` steps in a row (signed: a noisy wobble
#   down is not "still rising"), reported at the first of them minus w//2.
# Views per step: entropy and log-PPL of right vs wrong responses, where the top-20%
#   entropy tokens sit across PPL terciles and positions, diversity, calibration, and what
#   each update moved.
# =========================================================================================


def ls_slope(y: list[float]) -> float:
    """Least-squares slope of y against 0, 1, ..., len(y) - 1."""
    n = len(y)
    x_mean, y_mean = (n - 1) / 2, sum(y) / n
    return (sum((i - x_mean) * (v - y_mean) for i, v in enumerate(y))
            / sum((i - x_mean) ** 2 for i in range(n)))


def detect_plateau(entropy: list[float], reward: list[float], window: int = 10,
                   frac: float = 0.25, patience: int = 5) -> int | None:
    """Step where training leaves the rising stage, or None while it has not (see above).
    Causal: the answer for a prefix of the curves never changes when more steps arrive."""
    down_h = up_r = 0.0
    run = 0
    for t in range(window - 1, len(entropy)):
        s_h, s_r = ls_slope(entropy[t - window + 1:t + 1]), ls_slope(reward[t - window + 1:t + 1])
        down_h, up_r = max(down_h, -s_h), max(up_r, s_r)
        still_rising = s_r >= frac * up_r or -s_h >= frac * down_h
        run = 0 if still_rising else run + 1
        if run == patience:
            return max(0, t - patience + 1 - window // 2)
    return None


def ppl_tercile(log_ppl: torch.Tensor) -> torch.Tensor:
    """Tercile of each response by rank of its log-PPL: (B,) -> (B,) in {0 lowest, 1, 2}."""
    rank = torch.empty_like(log_ppl, dtype=torch.long)
    rank[log_ppl.argsort(stable=True)] = torch.arange(len(log_ppl), device=log_ppl.device)
    return rank * 3 // len(log_ppl)


def position_bin(mask: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Relative-position bin of each token: token t of a response of length L is in bin
    floor(bins * t / L). (B, T) -> (B, T) long."""
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    t = torch.arange(mask.shape[1], device=mask.device)[None, :].float()
    return (bins * t / lengths).floor().long().clamp(max=bins - 1)


def high_entropy_ppl_terciles(entropy: torch.Tensor, mask: torch.Tensor, log_ppl: torch.Tensor,
                              top_frac: float = 0.2) -> list[float]:
    """Share of the batch's high-entropy tokens (top `top_frac` of valid tokens) inside
    responses of low / middle / high perplexity (ppl_tercile).
    (B, T), (B, T), (B,) -> [low, mid, high], summing to 1."""
    valid = mask > 0
    threshold = quantile(entropy[valid].float(), 1 - top_frac)
    high = ((entropy >= threshold) & valid).sum(1).float()  # (B,) high-entropy tokens each
    tercile, total = ppl_tercile(log_ppl), high.sum().clamp(min=1)
    return [(high[tercile == k].sum() / total).item() for k in range(3)]


def entropy_by_position(entropy: torch.Tensor, mask: torch.Tensor,
                        bins: int = 10) -> list[float | None]:
    """Mean token entropy per relative-position bin (position_bin).
    (B, T), (B, T) -> `bins` values (None for an empty bin)."""
    which, out = position_bin(mask, bins), []
    for b in range(bins):
        sel = (which == b) & (mask > 0)
        out.append(entropy[sel].mean().item() if sel.any() else None)
    return out


# --- [B]'s diversity and calibration, and [A]'s token dynamics ---------------------------


def distinct_answers(texts: list[str], group_size: int) -> float:
    """Mean over groups of the number of distinct final answers among its G responses:
    answers compared as math_reward compares them (parse_number, else normalize_answer),
    "no answer" counting as one value. B texts -> a float in [1, G]. Collapse shows up as
    fewer distinct answers ([B])."""
    keys = [None if (a := extract_answer(t)) is None else
            (parse_number(n := normalize_answer(a)) or n) for t in texts]
    groups = [keys[i:i + group_size] for i in range(0, len(keys), group_size)]
    return sum(len(set(g)) for g in groups) / len(groups)


def shows_work(texts: list[str]) -> float:
    """Share of responses that write an equation ('=') before their final answer ('####' or
    the last \\boxed). On the built-in task it tells a worked solution from a bare guess
    '#### N': RL that rewards only the answer can teach a model to stop reasoning."""
    heads = [t.rsplit("####", 1)[0] if "####" in t else t.rsplit("\\boxed", 1)[0] for t in texts]
    return sum("=" in h for h in heads) / max(1, len(texts))


def distinct_ngram_ratio(completion_ids: torch.Tensor, mask: torch.Tensor, group_size: int,
                         n: int) -> float | None:
    """distinct-n (Li et al. 2016) per group: |distinct token n-grams| / |token n-grams| over
    the valid tokens of its G responses (EOS included); the mean over groups that have an
    n-gram. (B, T) ids, (B, T) mask -> a float in (0, 1], or None."""
    ids, lengths, ratios = completion_ids.tolist(), mask.sum(1).long().tolist(), []
    for g in range(0, len(ids), group_size):
        grams = [tuple(row[t:t + n]) for row, L in zip(ids[g:g + group_size],
                                                       lengths[g:g + group_size])
                 for t in range(L - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return sum(ratios) / len(ratios) if ratios else None


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor,
                               bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins
    [b/bins, (b+1)/bins), the last one closed at 1. (N,), (N,) -> float in [0, 1]."""
    which = (confidence * bins).long().clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.float().mean().item() * abs(correct[sel].float().mean().item()
                                                   - confidence[sel].float().mean().item())
    return ece


def answer_confidence(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor,
                      logprobs: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The model's confidence in each response's final answer: the product of pi(o_t) over
    the tokens that spell the answer (their characters overlap the answer's last occurrence
    in the text, found with extract_answer); 0 when there is no answer. If the answer's text
    cannot be located, the whole response's tokens count. (B, T) x 3, B texts -> (B,)."""
    out = []
    for row, L, lp, text in zip(completion_ids.tolist(), mask.sum(1).long().tolist(),
                                logprobs.tolist(), texts):
        answer = (extract_answer(text) or "").strip()
        if not answer:
            out.append(0.0)
            continue
        pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in row[:L]]
        start, pos, total = "".join(pieces).rfind(answer), 0, 0.0
        for t, piece in enumerate(pieces):
            if start < 0 or (pos < start + len(answer) and pos + len(piece) > start):
                total += lp[t]
            pos += len(piece)
        out.append(math.exp(total))
    return torch.tensor(out)


@torch.no_grad()
def token_movement(old_logp: torch.Tensor, new_logp: torch.Tensor, entropy: torch.Tensor,
                   mask: torch.Tensor, log_ppl: torch.Tensor, *, top_frac: float = 0.2,
                   still: float = 0.01, bins: int = 10) -> dict:
    """What one step's updates moved, token by token ([A]'s plateau-stage analysis):
      d_t = |log pi_new(o_t) - log pi_old(o_t)|,  M = sum of d_t over valid tokens
      barely_moved       share of valid tokens with |pi_new(o_t) - pi_old(o_t)| < still
      move_high_entropy  sum of d_t over the top `top_frac` entropy tokens / M
      move_ppl_terciles  [sum of d_t in low / mid / high log-PPL responses] / M (ppl_tercile)
      move_by_position   [sum of d_t in each relative-position bin] / M (position_bin)
    (B, T) x 4, (B,) -> dict. entropy and log-PPL are the sampling policy's."""
    valid = mask > 0
    d = torch.where(valid, (new_logp - old_logp).abs(), 0.0)
    total = d.sum().clamp(min=1e-12)
    still_frac = ((new_logp.exp() - old_logp.exp()).abs() < still)[valid].float().mean().item()
    high = valid & (entropy >= quantile(entropy[valid].float(), 1 - top_frac))
    per_response, tercile, which = d.sum(1), ppl_tercile(log_ppl), position_bin(mask, bins)
    return {"barely_moved": still_frac,
            "move_high_entropy": (d[high].sum() / total).item(),
            "move_ppl_terciles": [(per_response[tercile == k].sum() / total).item()
                                  for k in range(3)],
            "move_by_position": [(d[which == b].sum() / total).item() for b in range(bins)]}


QUADRANTS = ("pos_top", "pos_other", "neg_top", "neg_other")


def entropy_change_by_quadrant(entropy_old: torch.Tensor, entropy_new: torch.Tensor,
                               advantages: torch.Tensor, is_top: torch.Tensor,
                               mask: torch.Tensor) -> dict:
    """[B]'s sign rule, read off a run: dH_t = H_new,t - H_old,t at each valid token, split
    by the sign of A_t and by whether o_t was pi_old's top token (pos_top, pos_other,
    neg_top, neg_other; A = 0 in none). dh_share_q = share of valid tokens in q; dh_sum_q =
    sum of dH_t over q / valid tokens. The rule predicts dH < 0 for pos_top and neg_other,
    > 0 for the others; dH comes from the whole update, so this measures where entropy
    moved, not what moved it. (B, T) x 5 -> dict."""
    valid = mask > 0
    n = valid.sum().clamp(min=1)
    d = torch.where(valid, entropy_new - entropy_old, 0.0)
    out = {}
    for name, sign_ok, top in zip(QUADRANTS, (advantages > 0, advantages > 0, advantages < 0,
                                              advantages < 0), (True, False, True, False)):
        q = valid & sign_ok & (is_top if top else ~is_top)
        out[f"dh_share_{name}"] = (q.sum() / n).item()
        out[f"dh_sum_{name}"] = (d[q].sum() / n).item()
    return out


def format_profile(step: int | str, profile: dict) -> str:
    """One line of --profile output: seconds per phase, tokens/s and peak memory."""
    order = ("eval_s", "rollout_s", "reward_s", "old_logp_s", "loss_backward_s", "optimizer_s",
             "token_dynamics_s")
    phases = " ".join(f"{k[:-2]} {profile[k]:.3f}s" for k in order if k in profile)
    mem = profile.get("peak_mem_mb")
    return (f"[profile] step {step}: {phases} | {profile['gen_tokens_per_s']:.0f} tok/s | "
            f"peak mem {'n/a' if mem is None else f'{mem:.0f} MB'}")

@torch.no_grad()
def logp_adv_covariance(logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor) -> float:
    """Cov(log pi(o_t), A_t) over the batch's valid tokens: (B, T) x 3 -> float. One policy
    gradient step changes entropy by about -lr times it (Cui et al., arXiv 2505.22617)."""
    n = mask.sum()
    mean_lp, mean_a = (logprobs * mask).sum() / n, (advantages * mask).sum() / n
    return (((logprobs - mean_lp) * (advantages - mean_a) * mask).sum() / n).item()


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory so far: CUDA max_memory_allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def token_dynamics(model, out: dict, args: Args) -> dict:
    """Re-score the step's batch (`out`, from rl_step) under the updated policy (no grad,
    no RNG) and measure what moved: token_movement ([A]) and entropy_change_by_quadrant
    ([B]'s sign rule)."""
    mask = out["rollout"]["completion_mask"]
    new_logp, new_entropy = old_policy_stats(model, out["rollout"], args.temperature,
                                             args.micro_batch_size, args.bf16)
    return {**token_movement(out["old_logp"], new_logp, out["entropy"], mask, out["log_ppl"]),
            **entropy_change_by_quadrant(out["entropy"], new_entropy, out["advantages"],
                                         out["is_top"], mask)}


def log_row(row: dict, history: list[dict], state: LoopState, args: Args, metrics_path: Path,
            bar) -> None:
    """Find the stage of [A] online (detect_plateau on the rows so far; found under
    --shape-from plateau, the shaping starts with the next batch), append the row to
    metrics.jsonl (on disk before the next step starts) and to history, and show it on the
    progress bar (and, with --profile, as a line: format_profile)."""
    from tqdm import tqdm

    if state.stage_step is None:
        state.stage_step = detect_plateau([r["entropy"] for r in history] + [row["entropy"]],
                                          [r["reward"] for r in history] + [row["reward"]],
                                          args.stage_window, args.stage_frac,
                                          args.stage_patience)
        if state.stage_step is not None and args.shape_from == "plateau":
            state.shape_from = row["step"] + 1
            tqdm.write(f"plateau detected at step {row['step']} (transition ~step "
                       f"{state.stage_step}); shaping from step {row['step'] + 1}")
    row["stage"] = "rising" if state.stage_step is None else "plateau"
    row["entropy_coef"] = state.entropy_bonus  # the bonus alpha this step trained with
    with metrics_path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    history.append(row)
    bar.set_postfix({"reward": f"{row['reward']:.2f}", "acc": f"{state.accuracy:.2f}",
                     "H": f"{row['entropy']:.3f}", "stage": row["stage"],
                     **({"lambda": f"{state.pos_weight:.2f}"} if args.method == "posneg" else {})})
    if args.profile:
        tqdm.write(format_profile(row["step"], row["profile"]))


def metrics_row(step: int, out: dict, loop: dict, group_size: int) -> dict:
    """One row of metrics.jsonl (docs/outputs.md lists the fields) from what rl_step
    returned (`out`) and the loop's values for this step (`loop`: accuracy, sampled (avg@k,
    pass@k), pos_weight, lr, nonfinite_skips, eval_s, device, step_time, time, the step's
    greedy_calibration and token_dynamics, each None when not taken). Uses masked_mean,
    high_entropy_ppl_terciles, entropy_by_position, logp_adv_covariance, distinct_answers,
    distinct_ngram_ratio, shows_work and peak_memory_mb."""
    rewards, mask = out["rewards"], out["rollout"]["completion_mask"]
    entropy, log_ppl, update, phases = out["entropy"], out["log_ppl"], out["update"], out["phases"]
    is_pos = rewards > 0.5
    pos, neg = is_pos[:, None] * mask, ~is_pos[:, None] * mask
    calibration, movement = loop["calibration"], loop["movement"]
    return {
        "step": step, "reward": rewards.mean().item(), "accuracy": loop["accuracy"],
        "entropy": masked_mean(entropy, mask), "entropy_pos": masked_mean(entropy, pos),
        "entropy_neg": masked_mean(entropy, neg), "log_ppl": log_ppl.mean().item(),
        "log_ppl_pos": log_ppl[is_pos].mean().item() if is_pos.any() else None,
        "log_ppl_neg": log_ppl[~is_pos].mean().item() if (~is_pos).any() else None,
        "high_entropy_ppl_terciles": high_entropy_ppl_terciles(entropy, mask, log_ppl),
        "entropy_by_position": entropy_by_position(entropy, mask),
        "distinct_answers": distinct_answers(out["texts"], group_size),
        **{f"distinct_{n}": distinct_ngram_ratio(out["rollout"]["completion_ids"], mask,
                                                 group_size, n) for n in (1, 2, 3)},
        "ece": calibration and calibration["ece"],
        "confidence": calibration and calibration["confidence"],
        **{k: movement and movement[k] for k in ("barely_moved", "move_high_entropy",
                                                  "move_ppl_terciles", "move_by_position",
                                                  *(f"dh_{m}_{q}" for m in ("share", "sum")
                                                    for q in QUADRANTS))},
        "response_len": mask.sum(1).mean().item(), "shows_work": shows_work(out["texts"]),
        "truncated_frac": out["rollout"]["truncated"].float().mean().item(),
        "zero_var_frac": out["zero_var"].float().mean().item(), "shaping": out["shaping"],
        "ppl_weight_min": out["ppl_weight"].min().item(),
        "ppl_weight_max": out["ppl_weight"].max().item(),
        "adv_abs_mean": masked_mean(out["advantages"].abs(), mask),
        "pos_weight": loop["pos_weight"],
        **{f"{c}_frac": (out["picked"][c].sum() / mask.sum().clamp(min=1)).item()
           if c in out["picked"] else None for c in ("forking", "clip_cov", "kl_cov")},
        "cov_logp_adv": logp_adv_covariance(out["old_logp"],
                                            out["advantages"] * out["token_weights"], mask),
        **{k: update[k] for k in ("loss", "clip_frac_low", "clip_frac_high", "approx_kl",
                                  "grad_norm")},
        "lr": loop["lr"], "nonfinite_skips": loop["nonfinite_skips"],
        "avg_at_k": loop["sampled"][0], "pass_at_k": loop["sampled"][1],
        "step_time": loop["step_time"], "time": loop["time"],
        "profile": {"eval_s": loop["eval_s"], **{f"{k}_s": v for k, v in phases.items()},
                    "gen_tokens_per_s": mask.sum().item() / max(phases["rollout"], 1e-9),
                    "peak_mem_mb": peak_memory_mb(loop["device"])},
    }


def run_summary(args: Args, history: list[dict], state: LoopState, final: dict,
                final_sampled: tuple, train_time: float) -> dict:
    """summary.json: start and final accuracy and calibration (`final`: greedy_calibration
    after the last step), avg@k / pass@k, entropy over the first and last steps, the stage
    transition and skips (from the loop's `state`), time, and the mean of each profile
    field."""
    def mean_of(key: str, rows: list[dict]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    peaks = [r["profile"]["peak_mem_mb"] for r in history
             if r["profile"]["peak_mem_mb"] is not None]
    first = history[0]
    return {
        "method": args.method, "seed": args.seed, "steps": args.steps,
        "start_accuracy": first["accuracy"], "final_accuracy": final["accuracy"],
        "start_ece": first["ece"], "final_ece": final["ece"],
        "start_confidence": first["confidence"], "final_confidence": final["confidence"],
        "eval_k": args.eval_k, "start_avg_at_k": first["avg_at_k"],
        "final_avg_at_k": final_sampled[0], "start_pass_at_k": first["pass_at_k"],
        "final_pass_at_k": final_sampled[1],
        "entropy_first10": mean_of("entropy", history[:10]),
        "entropy_last10": mean_of("entropy", history[-10:]),
        "final_entropy": mean_of("entropy", history[-20:]),  # the last 20 steps, as in [B]
        "final_distinct_answers": mean_of("distinct_answers", history[-20:]),
        "stage_step": state.stage_step, "nonfinite_skips": state.nonfinite_skips,
        "train_time": train_time,
        "profile": {**{key: mean_of(key, [r["profile"] for r in history])
                       for key in history[-1]["profile"] if key != "peak_mem_mb"},
                    "peak_mem_mb": max(peaks) if peaks else None},
    }


# =========================================================================================
# 11. Reading the final answer: the grader's rules behind math_reward (section 2)
# extract_answer finds the last final-answer marker, normalize_answer turns what it read into
# a canonical number or string, and parse_number makes it an exact Fraction. Linear-time on
# any input. docs/reward.md lists what is accepted, and why. An appendix to section 2.
# =========================================================================================

_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?")
_LAST_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")
_THOUSANDS = re.compile(r"(?<=[0-9])(?:,|\{,\}|\\,)(?=[0-9]{3}(?![0-9]))")
_TEXT = re.compile(r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mbox|operatorname) ?\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac")
_MIXED_WHOLE = re.compile(r"(?<![0-9.])(-?)([0-9]+) ?$")  # the whole part just before a fraction
_UNITS = re.compile(r"[a-z .'/()-]*(?:\^\{?[23]\}?)?[a-z .'/()-]*")
_SPACE_NOT_BETWEEN_DIGITS = re.compile(r"(?<![0-9]) | (?![0-9])")
_PHRASE = re.compile(r"(?: to the (?:question|problem)(?= is\b))?[*_ \t]{0,4}"
                     r"((?:is|was|would be|will be|should be|equals)\b|[:=])?"
                     r"[*_ \t:]{0,6}(?:(?:therefore|thus|then|so|simply|just|clearly|indeed)"
                     r"[ \t,]{1,3})?")
# Words that make a stated number no answer: a negation, a hedge, a bound, a condition.
_HEDGE = re.compile(r"\b(?:not|no|never|either|or|between|about|approximately|around|roughly|"
                    r"nearly|almost|maybe|perhaps|probably|least|most|(?:more|less|fewer) than|"
                    r"if|unless)\b|n't")
_RESULT = re.compile(r"=[ \t$\\*]{0,6}(-?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?)")  # '= \$1,200'
_LATEX_SPACE = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ",
                "\\quad", "\\qquad", "~", "\\(", "\\)", "\\[", "\\]", "**", "__")
_LATEX_DROP = ("^{\\circ}", "^\\circ", "\\circ", "\\degree", "\u00b0", "\\%", "%", "\\$", "$")
MAX_ANSWER_CHARS = 256  # a longer "answer" is spam: compared as raw text, never parsed
MAX_BOX_CHARS = 4096    # a \boxed{} still open after this many characters is spam
MAX_NUMBER_CHARS = 64   # longer "numbers" are compared as strings (no huge-int parsing)
MARKERS_TRIED = 20      # how many earlier '####' lines / answer phrases a grader looks back


def _braced(text: str, start: int) -> str | None:
    """Content of the {...} group that opens at or after `start` (spaces allowed), or None
    if the braces do not close within MAX_BOX_CHARS (cut off, or spam). One bounded scan."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, min(len(text), i + MAX_BOX_CHARS)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _last_box(text: str) -> tuple[int, str | None]:
    """(position, content) of the last \\boxed{} or \\fbox{}; content None if it never
    closes (a truncated response); position -1 if there is none."""
    k = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if k < 0:
        return -1, None
    return k, _braced(text, k + (6 if text.startswith("\\boxed", k) else 5))


def _last_hash_answer(text: str) -> tuple[int, str | None, str | None]:
    """(position, numeric answer, heading text) from the '####' lines, last line first.
    The first '####' line whose text reads as a number is the answer; the text of the very
    last '####' line is kept as well, for a text answer ('#### Yes') when nothing else is
    found. Looks back at most MARKERS_TRIED lines, each by rfind: linear-time."""
    end, heading = len(text), None
    for _ in range(MARKERS_TRIED):
        k = text.rfind("####", 0, end)
        if k < 0:
            break
        line_end = text.find("\n", k)
        line = text[k + 4:line_end if line_end >= 0 else len(text)].strip()
        if line and parse_number(normalize_answer(line)) is not None:
            return k, line, heading
        heading = heading if heading is not None else (line or None)
        end = text.rfind("\n", 0, k) + 1  # the earlier lines; 0 ends the loop next time
        if end == 0:
            break
    return -1, None, heading


def _last_phrase_answer(text: str) -> tuple[int, str | None]:
    """(position, answer) of the last 'the answer is x' / 'Final Answer: x' whose x reads
    as a number. x runs to the end of its sentence; after 'final answer' at the end of a
    line (a heading) it is the next line."""
    low, end = text.lower(), len(text)
    for _ in range(MARKERS_TRIED):
        k = low.rfind("answer", 0, end)
        if k < 0:
            break
        end = k
        if k > 0 and low[k - 1].isalnum():  # 'reanswer', 'answers' are not the phrase
            continue
        final = low[max(0, k - 8):k].rstrip(" *_").endswith("final")
        tail = _PHRASE.match(text, k + 6, k + 6 + 40)
        joined = tail.end() > k + 6 and re.search(r"[a-z:=]", low[k + 6:tail.end()])
        if not (final or joined):  # 'the answer 18' without 'is' or ':' is not a statement
            continue
        rest = text[tail.end():tail.end() + MAX_ANSWER_CHARS]
        if final and rest.lstrip(" \t*_:").startswith("\n"):  # '### Final Answer' heading
            rest = rest.lstrip(" \t*_:\n")
        rest = rest.split("\n", 1)[0]
        stop = re.search(r"[.,;!?](?:\s|$)", rest)  # the clause ends; '18.5' does not
        answer = rest[:stop.start()] if stop else rest
        if stop and re.match(r",\s*[-$\\]*[0-9]", rest[stop.start():]):
            continue  # 'the answer is 17, 18, 19': an enumeration
        if parse_number(normalize_answer(answer)) is not None and not _HEDGE.search(answer.lower()):
            return k, answer
        # 'The answer is: Henry baked 50 cookies.' states one number in a sentence
        if (final or tail.group(1)) and (answer := _sentence_answer(rest)) is not None:
            return k, answer
    return -1, None


def _sentence_answer(text: str) -> str | None:
    """The one number that the sentence opening `text` states, after its last '=' if it has
    one: 'he needs 6 more boxes.' -> '6'. None if it states two or more ('John has 5 and
    Mary 7'), or negates or hedges ('not 18', 'either 5 or 6', 'about 18'): a careful
    grader does not guess between them."""
    stop = re.search(r"[.;!?](?:\s|$)", text)
    sentence = text[:stop.start()] if stop else text
    if _HEDGE.search(sentence.lower()):
        return None
    s = normalize_answer(sentence)
    found = [m.group() for m in _NUMBER.finditer(s) if s[m.start() - 1:m.start()] != "^"]
    values = {parse_number(n) for n in found}
    return found[0] if len(values) == 1 and None not in values else None


def _final_sentence_answer(text: str) -> str | None:
    """With no marker at all, the number of the response's closing sentence ('Therefore,
    the fourth child is 72 inches tall.'), read by _sentence_answer, if the work computed
    it: the same value follows an '=' somewhere (a number restated from the question does
    not). Up to two closing lines with no digit ('I hope this helps!') are passed over. A
    question, or a line of fewer than two words ('3+4=7', '3c+8o1=92'), states none."""
    tail = text[-MAX_ANSWER_CHARS:].rstrip(" \t\n*_")
    parts = [p for p in re.split(r"(?<=[.!?])(?=\s)|\n\s*\n", tail) if p.strip()]
    parts = parts[1:] if len(text) > MAX_ANSWER_CHARS else parts  # the first may be cut
    closing = next((p for p in reversed(parts[-3:]) if re.search(r"[0-9]", p)), "")
    words = [w for w in closing.split() if w.strip(".,;:!?*_()'\"").isalpha()]
    if closing.endswith("?") or len(words) < 2:
        return None
    value = parse_number(answer) if (answer := _sentence_answer(closing)) else None
    return answer if value is not None and value in map(Fraction, {
        m.group(1).replace(",", "") for m in _RESULT.finditer(text)}) else None


def extract_answer(text: str, last_number_fallback: bool = False) -> str | None:
    """Final answer of a response: the content of the last final-answer marker (a
    \\boxed{}, a '####' line that reads as a number, or an answer phrase followed by a
    number or by a sentence stating one), as raw text; with no marker, the closing
    sentence's computed number (_final_sentence_answer). A last box that never closes means
    the response was cut off: no answer. A '####' line that is not a number ('#### Yes')
    counts only when no other marker exists. With last_number_fallback, the last number in
    the text when there is no marker at all. None if there is no answer."""
    box_at, box = _last_box(text)
    hash_at, hash_answer, heading = _last_hash_answer(text)
    phrase_at, phrase = _last_phrase_answer(text)
    at, answer = max((box_at, box), (hash_at, hash_answer), (phrase_at, phrase),
                     key=lambda c: c[0])
    if at >= 0:
        return answer  # None if the last box is unclosed
    if (closing := _final_sentence_answer(text)) is not None:
        return closing
    if heading is not None:
        return heading
    if last_number_fallback:
        last = None
        for last in _LAST_NUMBER.finditer(text):
            pass
        return last.group(0) if last else None
    return None


def _strip_wrappers(s: str) -> str:
    """'(18)', '{18}', '[18]' -> '18', repeatedly, only when the pair encloses everything."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    while len(s) >= 2 and pairs.get(s[0]) == s[-1]:
        depth = 0
        for i, ch in enumerate(s):
            depth += (ch == s[0]) - (ch == s[-1])
            if depth == 0 and i < len(s) - 1:
                return s  # '(1)+(2)': the first pair closes early
        s = s[1:-1].strip()
    return s


def _latex_fractions(s: str) -> str:
    """'\\frac{3}{4}', '\\dfrac34' -> '3/4'; a mixed number '2\\frac{1}{2}' -> '5/2'.
    A fraction whose parts are not plain numbers is left as it is."""
    out, pos = [], 0
    for m in _FRAC.finditer(s):
        if m.start() < pos:
            continue
        parts, j = [], m.end()
        while len(parts) < 2 and j < len(s):
            if s[j] == " ":
                j += 1
            elif s[j] == "{":
                close = s.find("}", j)
                if close < 0:
                    break
                parts.append(s[j + 1:close].strip())
                j = close + 1
            else:
                parts.append(s[j])
                j += 1
        if len(parts) < 2 or not all(_NUMBER.fullmatch(p) and "/" not in p for p in parts) \
                or Fraction(parts[1]) == 0:
            continue
        value, head = Fraction(parts[0]) / Fraction(parts[1]), s[pos:m.start()]
        whole = _MIXED_WHOLE.search(head) if value >= 0 else None
        if whole:
            value += int(whole.group(2))
            value, head = (-value if whole.group(1) else value), head[:whole.start()]
        out += [head, str(value)]  # Fraction prints '5/2', or '3' when whole
        pos = j
    return "".join(out) + s[pos:]


def normalize_answer(s: str) -> str:
    """Canonical form of an answer, as a careful grader reads it:
    NFKC (full-width digits -> ASCII), unicode minus -> '-', lower case;
    \\text{..} and similar unwrapped; LaTeX spacing, '$', '%', degrees and markdown bold
    dropped; the last right-hand side of an equation ('6 \\times 3 = 18', 'x = 18');
    LaTeX fractions and mixed numbers -> 'p/q'; wrappers '(18)', '{18}' removed; thousands
    separators (',', '{,}', '\\,') removed; trailing '.' dropped.
    A number followed only by units or words ('18 dollars', '18 cm^2', '18/hour') -> the
    number. Anything else -> the string without spaces (but '1 8' keeps its space).
    Longer than MAX_ANSWER_CHARS: returned as it is (spam, never parsed)."""
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = unicodedata.normalize("NFKC", s.replace("\u00b2", "^2").replace("\u00b3", "^3"))
    s = s.replace("\u2212", "-").replace("\u2013", "-").lower()
    s = _TEXT.sub(r"\1", _TEXT.sub(r"\1", s))  # twice: '\text{\textbf{18}}'
    s = _THOUSANDS.sub("", re.sub(r"\\(?=[0-9])", "", s))  # '\15': a stray backslash
    for junk in _LATEX_DROP:
        s = s.replace(junk, "")
    for space in _LATEX_SPACE:
        s = s.replace(space, " ")
    s = _latex_fractions(s).rsplit("=", 1)[-1]  # the last right-hand side
    s = _strip_wrappers(s.strip().rstrip(".").strip())
    s = re.sub(r"^- ", "-", s)
    number = _NUMBER.match(s)
    if number and len(number.group()) < len(s) and _UNITS.fullmatch(s[number.end():]):
        return number.group().rstrip(".")  # '18 dollars' -> '18'
    return _SPACE_NOT_BETWEEN_DIGITS.sub("", s)  # 'x + 1' -> 'x+1', but '1 8' stays


def parse_number(s: str) -> Fraction | None:
    """An exact rational for a normalised plain number ('-12', '0.75', '3/4'), else None."""
    if len(s) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_verify_reward(completion: str, gold: str) -> float:
    """The same reward judged by the `math-verify` library, for LaTeX answers (MATH-style).
    It is an optional dependency: pip install math-verify."""
    from math_verify import parse, verify

    return float(verify(parse(f"${gold}$"), parse(completion)))


def reward_function(name: str = "math", last_number_fallback: bool = False):
    """The (completion, gold) -> reward callable that --reward names."""
    if name == "math-verify":
        return math_verify_reward
    return lambda completion, gold: math_reward(completion, gold, last_number_fallback)


# =========================================================================================
# 12. The tiny preset: a character-level tokenizer, a small Qwen2, a supervised warm-up
# Real RLVR starts from an instruct model that answers in the right format, with
# systematic mistakes that RL can fix. The warm-up builds that start: it imitates a
# student who shows every step of the built-in sums but gets most carries and borrows
# wrong (student_solution), so the converged model is right only on the problems without
# one (about 19%), whatever the seed or torch build. RL must find the carry, which the
# model still writes with probability 1 - slip. The default warm-up's weights ship in
# testdata/ (0.8 MB): trained here, they would move with the CPU's float kernels. Other
# warm-ups, and the default with --train-warmup, are trained and cached on disk.
# =========================================================================================

TINY_MODEL = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
# torch's own thread count, read before --threads changes it: the warm-up's batches gain
# from every core, RL's do not.
DEFAULT_THREADS = torch.get_num_threads()
SHIPPED_WARMUPS = Path(__file__).resolve().parent / "testdata"  # tiny-warmup-<key>.safetensors
POOL_SIZE = 5000  # built-in problems, the default --train-size


def make_arithmetic_problem(rng: random.Random, n_terms: tuple[int, int] = (4, 5),
                            max_operand: int = 9, max_value: int = 19) -> dict:
    """One built-in problem: question "7-1+9-7", solution "7-1=6 6+9=15 15-7=8 #### 8",
    answer "8". Every running value stays in [0, max_value]: about 200 one-step facts to
    learn, and what makes a problem hard is chaining them."""
    value = rng.randint(1, max_operand)
    question, steps = str(value), []
    for _ in range(rng.randint(*n_terms) - 1):
        term = rng.randint(1, max_operand)
        ops = [op for op, new in (("+", value + term), ("-", value - term))
               if 0 <= new <= max_value]
        op = rng.choice(ops)  # never empty when max_value >= 2 * max_operand
        new = value + term if op == "+" else value - term
        question += f"{op}{term}"
        steps.append(f"{value}{op}{term}={new}")
        value = new
    return {"question": question, "solution": " ".join(steps) + f" #### {value}",
            "answer": str(value)}


def builtin_task(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n problems drawn with random.Random(seed), skipping the questions in `exclude`
    (the held-out split excludes every training question)."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        p = make_arithmetic_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def build_char_tokenizer():
    """One token per printable ASCII character and newline, plus <pad>, <eos>, <unk>.
    Space and newline are spelled 'Ġ' and 'Ċ' as in GPT-2's byte-level alphabet, so the
    Qwen2Tokenizer that AutoTokenizer makes of a saved tiny model gives the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = ["\u010a", "\u0120"] + [chr(c) for c in range(33, 127)]  # Ċ = newline, Ġ = space
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # " " -> "Ġ", ...
        pre_tokenizers.Split(Regex("."), behavior="isolated")])             # one char each
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def build_tiny_model(tokenizer, seed: int):
    """A randomly initialised Qwen2 of 191,488 parameters for the char tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, **TINY_MODEL)
    return Qwen2ForCausalLM(config)


def crossing(value: int, op: str, term: int) -> bool:
    """Whether a step carries (7+5: ones digits sum past 9) or borrows (15-7: 5 < 7): the
    steps a student gets wrong, and the warm-up teaches the tiny model to (student_solution)."""
    if value < 0:  # only reachable after a slip; no mistake is planted there
        return False
    return value % 10 + term % 10 >= 10 if op == "+" else value % 10 < term % 10 <= value


def student_solution(question: str, rng: random.Random, slip: float = 0.75,
                     off_by_one: float = 1 / 3, comma: float = 0.0) -> str:
    """The worked solution of a student with a systematic bug, for the warm-up targets.
    On a crossing step the student slips with probability `slip` and forgets the ten
    (7+5=2, 15-7=18); a share `off_by_one` of those slips also miscounts by one (7+5=1 or
    3). Later steps go on from the slipped value; every other step is right. Between two
    steps the student writes ', ' with probability `comma` (a style fork the reward does
    not read, for probing [B]), else ' '. A converged warm-up imitates the student, so its
    greedy answer is right exactly on the problems without a crossing step; the slips are
    likely tokens, so its wrong responses are confident ones."""
    terms = re.findall(r"[+-]?[0-9]+", question)
    value, steps = int(terms[0]), []
    for t in terms[1:]:
        op, term = t[0], int(t[1:])
        new = value + term if op == "+" else value - term
        if crossing(value, op, term) and rng.random() < slip:
            new += -10 if op == "+" else 10  # the ten forgotten
            if rng.random() < off_by_one:
                new += rng.choice((-1, 1))  # and miscounted
        steps.append(f"{value}{op}{term}={new}")
        value = new
    text = steps[0]
    for step in steps[1:]:
        text += (", " if rng.random() < comma else " ") + step
    return text + f" #### {value}"


def supervised_warmup(model, tokenizer, problems: list[dict], steps: int, *, batch_size: int,
                      lr: float, seed: int, slip: float = 0.75, off_by_one: float = 1 / 3,
                      comma: float = 0.0) -> list[float]:
    """Teacher-forced cross-entropy on prompt -> student_solution + EOS (prompt tokens
    masked out of the loss), with a fresh draw of the student's slips every time a problem
    is seen. Returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Cosine decay to 10%: the model ends on the student's probabilities, averaged over
    # many draws of the slips, not on the last batches' draws.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / max(1, steps))))
    from tqdm import tqdm

    losses = []
    model.train()
    bar = tqdm(range(steps), desc="warm-up", leave=False, disable=None, dynamic_ncols=True)
    for step in bar:
        batch = rng.sample(problems, batch_size)
        targets = [student_solution(p["question"], rng, slip, off_by_one, comma) for p in batch]
        # One tokenizer call per batch, not per string: a tenth of the step otherwise.
        prompt_ids = tokenizer([build_prompt(tokenizer, p["question"]) for p in batch],
                               add_special_tokens=False).input_ids
        target_ids = [ids + [tokenizer.eos_token_id]
                      for ids in tokenizer(targets, add_special_tokens=False).input_ids]
        width = max(len(a) + len(b) for a, b in zip(prompt_ids, target_ids))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (a, b) in enumerate(zip(prompt_ids, target_ids)):  # left padding, as at rollout
            ids[i, width - len(a) - len(b):] = torch.tensor(a + b)
            labels[i, width - len(b):] = torch.tensor(b)
            attn[i, width - len(a) - len(b):] = 1
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def warmup_pool(train_size: int) -> list[dict]:
    """The built-in problems that the warm-up imitates and RL draws from (its first N)."""
    return builtin_task(max(train_size, POOL_SIZE), seed=0)


def tiny_warm_model(args: Args):
    """The tiny model after the supervised warm-up on warmup_pool: the shipped weights, else
    the cache, else trained here (supervised_warmup) and cached."""
    from transformers import AutoModelForCausalLM

    tokenizer, problems = build_char_tokenizer(), warmup_pool(args.train_size)
    key = json.dumps({"model": TINY_MODEL, "steps": args.warmup_steps, "lr": args.warmup_lr,
                      "slip": args.warmup_slip, "off_by_one": args.warmup_off_by_one,
                      "comma": args.warmup_comma,
                      "batch": args.warmup_batch_size, "seed": args.warmup_seed,
                      "data": [problems[0], len(problems)], "v": 3}, sort_keys=True)
    name = f"tiny-warmup-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    shipped, folder = SHIPPED_WARMUPS / f"{name}.safetensors", Path(args.cache_dir) / name
    if shipped.exists() and not args.train_warmup:
        from safetensors.torch import load_model
        print(f"warm-up: using its shipped weights, testdata/{shipped.name} "
              "(--train-warmup trains them here: about 3.5 minutes on 2 cores)")
        model = build_tiny_model(tokenizer, args.warmup_seed)  # any transformers reads it
        load_model(model, shipped)
        return model.eval(), tokenizer  # as from_pretrained returns it
    if not (folder / "config.json").exists():
        print(f"warm-up: {args.warmup_steps} supervised steps on the built-in task "
              f"(cached in {folder} for later runs)")
        rl_threads = torch.get_num_threads()
        torch.set_num_threads(args.warmup_threads or DEFAULT_THREADS)
        try:  # RL's thread count comes back even if the warm-up is interrupted
            model = build_tiny_model(tokenizer, args.warmup_seed)
            losses = supervised_warmup(
                model, tokenizer, problems, args.warmup_steps, batch_size=args.warmup_batch_size,
                lr=args.warmup_lr, seed=args.warmup_seed, slip=args.warmup_slip,
                off_by_one=args.warmup_off_by_one, comma=args.warmup_comma)
        finally:
            torch.set_num_threads(rl_threads)
        print(f"warm-up: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(folder) if not folder.exists() else shutil.rmtree(tmp)
    else:
        print(f"warm-up: using the cached model in {folder}")
    # Always load from disk, so a first run and a cached run start from identical weights.
    return AutoModelForCausalLM.from_pretrained(folder), tokenizer


# =========================================================================================
# 13. Checkpoints, resume and interruptions (not needed to follow the method)
# A checkpoint holds the model and tokenizer (save_pretrained) and trainer_state.pt: the
# LoopState, optimizer and LR scheduler, and every RNG, so a resumed CPU run reproduces
# the uninterrupted run's rows exactly. The write is atomic (checkpoint.tmp/, then two
# renames): a crash at any instant leaves a complete checkpoint/ or checkpoint.old/.
# =========================================================================================


def save_checkpoint(out_dir: Path, model, tokenizer, state: dict) -> bool:
    """Write out_dir/checkpoint atomically. Refuses (returns False) if any weight is NaN/inf."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        print("warning: non-finite weights; checkpoint not written")
        return False
    final, tmp, old = (out_dir / n for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return True


def find_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint in out_dir: checkpoint/, else checkpoint.old/ (a crash came
    between the two renames). checkpoint.tmp/ is never complete, so it is ignored."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out_dir / name / "trainer_state.pt").exists():
            return out_dir / name
    return None


def read_metrics(metrics_path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl, in order: a run killed mid-write leaves a
    cut-off last line, which is dropped."""
    rows = []
    for line in metrics_path.read_text().splitlines() if metrics_path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_metrics(metrics_path: Path, first_step: int) -> list[dict]:
    """Keep the rows of steps before `first_step` (a killed run may have written later
    ones, and a cut-off last line), rewrite the file with them, and return them."""
    rows = [r for r in read_metrics(metrics_path) if r["step"] < first_step]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def catch_stop_signals(stop: dict) -> dict:
    """SIGINT / SIGTERM record themselves in stop["signum"]; a second one stops at once."""
    def handler(signum, frame):
        if stop["signum"] is not None:
            raise KeyboardInterrupt
        stop["signum"] = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def stop_after_signal(signum: int, step: int, out_dir: Path, previous: dict, bar) -> None:
    """After the checkpoint that a SIGINT / SIGTERM asked for: say how to resume, and exit."""
    bar.close()
    restore_signal_handlers(previous)
    print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
          f"{out_dir / 'checkpoint'}. Resume with the same command plus --resume")
    raise SystemExit(128 + signum)


def checkpoint_state(state, optimizer, scheduler, order_rng: random.Random,
                     elapsed: float) -> dict:
    """trainer_state.pt: the loop's state (LoopState) plus optimizer, LR scheduler, the data
    order's RNG, every other RNG, and the seconds trained so far."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {**asdict(state), "order_rng": order_rng.getstate(), "elapsed": elapsed,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}}


def restore_training(resume: dict, state, optimizer, scheduler, order_rng: random.Random,
                     metrics_path: Path) -> tuple[list[dict], float]:
    """The reverse of checkpoint_state. Cuts metrics.jsonl back to the checkpoint's step
    and returns (the rows kept, the wall-clock start that makes `time` continue)."""
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    order_rng.setstate(resume["order_rng"])
    state.step, state.order = resume["step"], resume["order"]
    state.nonfinite_skips, state.accuracy = resume["nonfinite_skips"], resume["accuracy"]
    state.pos_weight = resume["pos_weight"]
    state.entropy_coef, state.entropy_bonus = resume["entropy_coef"], resume["entropy_bonus"]
    history = truncate_metrics(metrics_path, state.step)
    random.setstate(resume["rng"]["python"])  # last: nothing above draws from an RNG
    torch.set_rng_state(resume["rng"]["torch"])
    if resume["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    return history, time.time() - resume["elapsed"]


# =========================================================================================
# 14. Settings and the command line
# Every setting is declared once, as a field of Args: its default (the tiny preset's), help,
# valid range and whether --resume must match it. The flags, the range checks, the
# resume check and what rl_step reads all come from these fields; a preset is a dict of
# overrides. Ranges are intervals: '[0, 1)' allows 0 and not 1; NaN and inf never pass.
# =========================================================================================


def setting(default, help: str, range: str | None = None, choices: tuple | None = None, *,
            run: bool = True, group: str | None = None, parse=None):
    """One field of Args. run: the setting defines the run (--resume refuses to change it);
    group: the --help group this field opens; parse: argparse's type, if not the field's."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices,
                                            "run": run, "group": group, "parse": parse})


def step_or_plateau(value: str) -> int | str:
    """--shape-from: a step number, or 'plateau' (the step after the detected plateau)."""
    if value == "plateau":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step or 'plateau', got '{value}'") from None


@dataclass
class Args:
    """Every setting of a run. The flag of a field is --field-name (--no-bf16 for bf16)."""
    method: str = setting("grpo", "grpo; ppl or position [A]; posneg [B]", choices=METHODS,
                          group="run")
    preset: str | None = setting(None, "tiny (CPU) or gsm8k (GPU); default: gsm8k if CUDA",
                                 choices=("gsm8k", "tiny"))
    seed: int = setting(0, "seed of data order, sampling and initialisation", "[0, inf)")
    steps: int = setting(100, "RL steps", "[1, inf)", run=False)
    out_dir: str | None = setting(None, "default runs/<preset>-<method>-seed<seed>", run=False)
    save_every: int = setting(0, "checkpoint every N steps (0: on a signal)", "[0, inf)",
                              run=False)
    resume: bool = setting(False, "continue from <out-dir>/checkpoint", run=False)
    overwrite: bool = setting(False, "replace a run already in --out-dir", run=False)
    model: str = setting("tiny", "hub name or local folder; tiny: the built-in one",
                         group="data and reward")
    dataset: str = setting("builtin", "builtin, gsm8k, or a .jsonl/.json/.parquet/.csv file")
    question_field: str = setting("question", "question column of a dataset file")
    answer_field: str = setting("answer", "answer column of a dataset file")
    train_size: int | None = setting(POOL_SIZE, "training problems (a file: its first N)",
                                     "[1, inf)")
    eval_size: int = setting(500, "held-out problems", "[1, inf)")
    instruction: str = setting("", "text appended to each question in the prompt")
    reward: str = setting("math", "grader: the exact one, or math-verify",
                          choices=("math", "math-verify"))
    last_number_fallback: bool = setting(False, "no answer marker: grade the last number")
    prompts_per_step: int = setting(32, "prompts per RL step", "[1, inf)", group="rollouts")
    group_size: int = setting(8, "responses per prompt (G)", "[2, inf)")
    max_new_tokens: int = setting(48, "response length limit", "[1, inf)")
    temperature: float = setting(1.0, "sampling temperature T", "(0, inf)")
    top_p: float = setting(1.0, "nucleus sampling threshold", "(0, 1]")
    no_std_scaling: bool = setting(False, "no division by the group std (Dr. GRPO)",
                                   group="advantages and the shaping of [A]")
    ppl_alpha: float = setting(0.01, "ppl: alpha of clamp(1 - alpha z, 0.8, 1.2)", "[0, inf)")
    pos_alpha: float = setting(0.1, "position: bonus scale alpha", "[0, inf)")
    pos_k: float = setting(15.0, "position: sigmoid steepness k", "(0, inf)")
    shape_from: int | str | None = setting(None, "first shaped step (default steps/3), or "
                                           "plateau", "[0, inf)", parse=step_or_plateau)
    shape_until: int | None = setting(None, "first unshaped step (default steps/2)", "[0, inf)")
    stage_window: int = setting(10, "stage detector: steps per slope", "[3, inf)")
    stage_frac: float = setting(0.25, "stage detector: share of the steepest slope", "(0, 1)")
    stage_patience: int = setting(5, "stage detector: steps below it", "[1, inf)")
    pos_weight: float = setting(1.0, "lambda, the weight of A > 0 tokens; 0: negative-only",
                                "[0, 1]", group="posneg [B]")
    neg_weight: float = setting(1.0, "weight of A < 0 tokens; 0: positive-only", "[0, inf)")
    lambda_schedule: str = setting("fixed", "how lambda moves",
                                   choices=("fixed", "stage", "epoch", "entropy"))
    entropy_target: float = setting(0.027, "entropy schedule: delta ([B] 0.2)", "(0, inf)")
    lambda_step: float = setting(0.05, "entropy schedule: lambda change per step", "(0, 1]")
    lambda_epochs: int | None = setting(None, "epoch schedule: E (default: data passes)",
                                        "[2, inf)")
    advantage_estimator: str = setting("grpo", "reinforce: W-REINFORCE / PSR / NSR",
                                       choices=("grpo", "reinforce"),
                                       group="the field's entropy controls")
    reinforce_pos: float = setting(0.1, "reinforce: A if right (0.1: W-REINFORCE)", "[0, inf)")
    reinforce_neg: float = setting(1.0, "reinforce: -A if wrong", "[0, inf)")
    forking_top: float = setting(1.0, "loss on the top share of token entropies (1: off)",
                                 "(0, 1]")
    clip_cov: bool = setting(False, "Clip-Cov: no gradient for a few high-covariance tokens")
    clip_cov_ratio: float = setting(5e-3, "Clip-Cov: share of tokens (verl 2e-4)", "(0, 1]")
    clip_cov_low: float = setting(1.0, "Clip-Cov: lower covariance bound", "[0, inf)")
    clip_cov_high: float = setting(5.0, "Clip-Cov: upper covariance bound", "(0, inf)")
    kl_cov: bool = setting(False, "KL-Cov: |log pi - log pi_old| on top-covariance tokens")
    kl_cov_ratio: float = setting(1e-2, "KL-Cov: share of tokens (verl 2e-4)", "(0, 1]")
    kl_cov_coef: float = setting(1.0, "KL-Cov: the penalty's coefficient", "[0, inf)")
    entropy_coef: float = setting(0.0, "entropy bonus alpha (adaptive: its start)", "[0, inf)")
    adaptive_entropy: bool = setting(False, "adapt alpha to a target entropy (Skywork-OR1)")
    entropy_coef_target: float = setting(0.05, "adaptive bonus: target (released 0.2)",
                                         "(0, inf)")
    entropy_coef_delta: float = setting(5e-3, "adaptive bonus: step (released 1e-4)",
                                        "(0, inf)")
    entropy_coef_max: float = setting(0.1, "adaptive bonus: ceiling (released 0.005)",
                                      "[0, inf)")
    clip_low: float = setting(0.2, "PPO clip epsilon_low", "[0, 1]", group="loss and updates")
    clip_high: float = setting(0.28, "PPO clip epsilon_high (Clip-Higher)", "[0, inf)")
    policy_loss: str = setting("clip", "token objective: the PPO clip, or cispo (a clipped "
                               "weight)", choices=("clip", "cispo"))
    loss_agg: str = setting("token-mean", "how token losses are averaged",
                            choices=("token-mean", "seq-mean-token-mean"))
    updates_per_batch: int = setting(1, "passes over each rollout batch", "[1, inf)")
    mini_batches: int = setting(2, "optimizer steps per pass", "[1, inf)")
    micro_batch_size: int = setting(64, "rows per forward (0: mini-batch)", "[0, inf)",
                                    run=False)
    lr: float = setting(2e-4, "AdamW learning rate", "(0, inf)")
    lr_warmup_steps: int = setting(0, "linear LR warm-up, in RL steps", "[0, inf)")
    weight_decay: float = setting(0.0, "AdamW weight decay", "[0, inf)")
    max_grad_norm: float = setting(1.0, "gradient-norm clip", "(0, inf)")
    eval_every: int = setting(20, "greedy held-out accuracy every N steps", "[1, inf)",
                              group="evaluation and machine")
    eval_batch_size: int = setting(256, "responses per evaluation batch", "[1, inf)", run=False)
    eval_k: int = setting(8, "avg@k and pass@k at the start and end (0: off)", "[0, inf)")
    eval_temperature: float = setting(0.6, "T of avg@k / pass@k", "(0, inf)")
    eval_top_p: float = setting(0.95, "top-p of avg@k / pass@k", "(0, 1]")
    token_dynamics_every: int = setting(5, "log what moved every N steps (0: off)", "[0, inf)",
                                        run=False)
    profile: bool = setting(False, "print seconds per phase and peak memory", run=False)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward",
                                           run=False)
    device: str | None = setting(None, "cuda, cpu, ... (default: cuda if found)", run=False)
    threads: int = setting(1, "torch's CPU threads in RL (0: its default)", "[0, inf)",
                           run=False)
    bf16: bool = setting(True, "on CUDA, fp32 instead of bf16 autocast", run=False)
    trust_remote_code: bool = setting(False, "allow model code from the hub", run=False)
    warmup_steps: int = setting(1500, "supervised warm-up steps", "[1, inf)",
                                group="the tiny preset's warm-up")
    warmup_lr: float = setting(3e-3, "warm-up learning rate", "(0, inf)")
    warmup_batch_size: int = setting(64, "warm-up batch size", "[1, inf)")
    warmup_threads: int = setting(0, "warm-up CPU threads (0: torch's default)", "[0, inf)",
                                  run=False)
    warmup_seed: int = setting(0, "seed of the warm-up", "[0, inf)")
    warmup_slip: float = setting(0.75, "the student's chance to miss a carry", "[0, 1]")
    warmup_off_by_one: float = setting(1 / 3, "share of slips one off", "[0, 1]")
    warmup_comma: float = setting(0.0, "the student's chance of ', ' between steps", "[0, 1]")
    train_warmup: bool = setting(False, "train the default warm-up, not load it", run=False)
    cache_dir: str = setting(os.path.join(Path.home(), ".cache", "rlvr_entropy"),
                             "where warm-ups are cached", run=False)


# A preset is the overrides of Args' defaults (tiny's) that fit a model and a machine.
PRESETS = {
    "tiny": {},
    "gsm8k": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "gsm8k", "steps": 300,
              "prompts_per_step": 16, "max_new_tokens": 512, "lr": 1e-6, "lr_warmup_steps": 10,
              "weight_decay": 0.1, "mini_batches": 4, "micro_batch_size": 8, "eval_every": 25,
              "eval_size": 200, "train_size": None, "token_dynamics_every": 25,
              "entropy_target": 0.2, "entropy_coef_target": 0.2, "clip_cov_ratio": 2e-4,
              "kl_cov_ratio": 2e-4, "entropy_coef_delta": 1e-4, "entropy_coef_max": 0.005,
              "threads": 0, "instruction": "Please reason step by step, and put your final "
                                           "answer within \\boxed{}."},
}


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def flag_name(name: str) -> str:
    return "--no-bf16" if name == "bf16" else "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The flags, one per field of Args, in its groups. A flag that is not given is absent
    from the result (SUPPRESS), so parse_args can tell it from a preset's value."""
    p = argparse.ArgumentParser(
        description="GRPO with entropy analysis, the advantage shaping of [A] (Deng et al. "
                    "2025) and the positive/negative weights of [B] (Jin et al. 2025).",
        epilog="Plots and comparisons of finished runs: tools/rlvr_tools.py (plot, compare).",
        argument_default=argparse.SUPPRESS)
    hints, group = typing.get_type_hints(Args), p
    for f in fields(Args):
        m = f.metadata
        group = p.add_argument_group(m["group"]) if m["group"] else group
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)),
                    hints[f.name])
        gsm8k = PRESETS["gsm8k"].get(f.name, f.default)
        shown = (f" (default {f.default}" + (f"; gsm8k {gsm8k})" if gsm8k != f.default else ")")
                 if f.default is not None and kind is not bool else "")
        if kind is bool:
            group.add_argument(flag_name(f.name), dest=f.name, help=m["help"],
                               action="store_false" if f.default else "store_true")
        else:
            group.add_argument(flag_name(f.name), help=m["help"] + shown, choices=m["choices"],
                               type=m["parse"] or kind)
    return p


def parse_args(argv: list[str] | None = None) -> Args:
    """The flags over the preset over Args' defaults, and the shaping window resolved."""
    given = vars(build_parser().parse_args(argv))
    if "preset" not in given:
        given["preset"] = "gsm8k" if torch.cuda.is_available() else "tiny"
        print(f"preset: {given['preset']} (CUDA "
              f"{'found' if given['preset'] == 'gsm8k' else 'not found'}; pass --preset to choose)")
    args = Args(**{**PRESETS[given["preset"]], **given})
    plateau = args.shape_from == "plateau"  # train() moves the window when it detects it
    if args.shape_from is None:
        args.shape_from = args.steps // 3
    if args.shape_until is None:
        args.shape_until = args.steps if plateau else args.steps // 2
    if args.out_dir is None:
        args.out_dir = f"runs/{args.preset}-{args.method}-seed{args.seed}"
    return args


def in_range(value: float, interval: str) -> bool:
    """Whether value lies in an interval written '[lo, hi)', '(0, inf)', ...; never NaN/inf."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return (math.isfinite(value) and (value >= low if interval[0] == "[" else value > low)
            and (value <= high if interval[-1] == "]" else value < high))


def check_args(args: Args) -> None:
    """Reject bad values before anything is loaded or written: one sentence, no traceback."""
    for f in fields(Args):
        v, interval = getattr(args, f.name), f.metadata["range"]
        if interval and v is not None and v != "plateau" and not in_range(v, interval):
            low, high = interval[1:-1].split(", ")
            rule = (f"in {interval}" if high != "inf" else f"at least {low}"
                    if interval[0] == "[" else f"greater than {low}")
            raise SystemExit(f"error: {flag_name(f.name)} must be {rule} (got {v})")
    B = args.prompts_per_step * args.group_size
    checks = [
        (args.mini_batches <= B, f"--mini-batches must be between 1 and {B} (prompts x G)"),
        (args.model != "tiny" or args.dataset == "builtin",
         "the tiny model only knows the built-in task; use --dataset builtin or pass --model"),
        (args.dataset != "builtin" or args.train_size is not None,
         "--dataset builtin needs --train-size (how many problems to make)"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
        (args.clip_cov_low < args.clip_cov_high, "--clip-cov-low must be below --clip-cov-high"),
        (not (args.kl_cov and args.policy_loss == "cispo"),
         "--kl-cov brings its own token loss; it does not combine with --policy-loss cispo"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    if args.reward == "math-verify":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise SystemExit("error: --reward math-verify needs the math-verify package: "
                             "pip install math-verify") from None


def run_settings(args: Args) -> dict:
    """The run-defining settings (run=True) that this run's method uses, as args.json
    stores them: a grpo run ignores the shaping and lambda flags, so extending it with
    --steps is not refused for the --lambda-epochs that follows --steps."""
    schedule = args.lambda_schedule if args.method == "posneg" else None
    used = {"shape_from": args.method in ("ppl", "position"), "shape_until": args.method in
            ("ppl", "position"), "ppl_alpha": args.method == "ppl",
            "pos_alpha": args.method == "position", "pos_k": args.method == "position",
            "pos_weight": schedule == "fixed", "lambda_epochs": schedule == "epoch",
            "entropy_target": schedule == "entropy", "lambda_step": schedule == "entropy",
            "lambda_schedule": schedule is not None, "neg_weight": schedule is not None,
            "reinforce_pos": args.advantage_estimator == "reinforce",
            "reinforce_neg": args.advantage_estimator == "reinforce"}
    for switch, names in (("clip_cov", "clip_cov_ratio clip_cov_low clip_cov_high"),
                          ("kl_cov", "kl_cov_ratio kl_cov_coef"), ("adaptive_entropy",
                          "entropy_coef_target entropy_coef_delta entropy_coef_max")):
        used.update(dict.fromkeys(names.split(), getattr(args, switch)))
    settings = {f.name: getattr(args, f.name) for f in fields(Args) if f.metadata["run"]
                and used.get(f.name, args.model == "tiny" or not f.name.startswith("warmup_"))}
    if schedule in ("stage", "epoch"):  # lambda follows the run's length
        settings["steps"] = args.steps
    return settings


def settings_differences(saved: dict, now: dict) -> list[str]:
    """'--flag: A in the run, B now' for each run-defining setting that differs.
    Settings missing from `saved` (an older args.json) are not compared."""
    return [f"{flag_name(k)} {saved[k]!r} in the run, {now[k]!r} now" for k in now
            if k in saved and saved[k] != now[k]]


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --out-dir that is a file, holds a run the command would overwrite, or
    cannot be written. Leaves nothing behind: folders it creates to test are removed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: --out-dir {out_dir} is a file, not a folder")
    held = [n for n in ("metrics.jsonl", "checkpoint", "checkpoint.old") if (out_dir / n).exists()]
    if held and not (resume or overwrite):
        raise SystemExit(f"error: {out_dir} already holds a run ({', '.join(held)}); pass "
                         "--resume to continue it, --overwrite to replace it, or choose "
                         "another --out-dir")
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f".write-test-{os.getpid()}").write_text("")
        (out_dir / f".write-test-{os.getpid()}").unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out-dir {out_dir} ({e.strerror})") from None
    finally:
        for p in created:  # only the empty folders it made: never anything else
            try:
                p.rmdir()
            except OSError:
                pass


def read_args_json(out_dir: Path) -> dict | None:
    """The run record (args.json) of a run folder, or None if it is missing or unreadable."""
    try:
        record = json.loads((out_dir / "args.json").read_text())
    except (OSError, ValueError):
        return None
    return {"history": [], **record} if isinstance(record, dict) else None


def read_resume(args: Args, out_dir: Path, checkpoint: Path) -> tuple[dict, dict | None]:
    """--resume: (the checkpoint's trainer state, the run record args.json), once this
    command's run-defining settings are found to be the run's."""
    try:
        resume = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated or foreign file: one sentence)
        raise SystemExit(f"error: --resume: {checkpoint / 'trainer_state.pt'} cannot be "
                         f"read ({type(e).__name__}); start afresh with --overwrite") from None
    record = read_args_json(out_dir)
    if record is None:
        print(f"warning: {out_dir / 'args.json'} is missing; the run's settings cannot be "
              "checked against this command")
    elif differ := settings_differences(record, run_settings(args)):
        steps_hint = (" (the defaults of --shape-from, --shape-until and --lambda-epochs "
                      "follow --steps: pass the run's values)"
                      if record.get("steps") != args.steps else "")
        raise SystemExit(f"error: --resume: this command differs from the run in {out_dir}: "
                         f"{'; '.join(differ)}{steps_hint}. Pass the run's values, or start "
                         "a new run with another --out-dir")
    if args.steps < resume["step"]:
        raise SystemExit(f"error: --resume: --steps {args.steps} is before the checkpoint's "
                         f"step {resume['step']}")
    return resume, record


def clear_run(out_dir: Path) -> None:
    """--overwrite: delete what a run wrote (metrics, checkpoints, summary, model, args)."""
    for name in ("metrics.jsonl", "summary.json", "args.json"):
        (out_dir / name).unlink(missing_ok=True)
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "model"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def load_data(args: Args) -> tuple[list[dict], list[dict]]:
    """Train and held-out problems for the chosen --dataset."""
    if args.dataset == "builtin":
        # Fixed problem sets (like a real dataset): --seed changes the order, not the problems.
        # --train-size N takes the first N of the pool, so runs of any size share the held-out
        # problems and the warm-up: only their RL data differ.
        pool = warmup_pool(args.train_size)
        eval_set = builtin_task(args.eval_size, seed=1, exclude={p["question"] for p in pool})
        return pool[:args.train_size], eval_set
    if args.dataset == "gsm8k":
        print("loading GSM8K from the hub (or its local cache)")
        try:
            train_set, eval_set = load_gsm8k("train"), load_gsm8k("test")
        except Exception as e:  # noqa: BLE001 (offline, hub down, ...: the same advice for all)
            raise SystemExit(f"error: could not load GSM8K from the hub ({type(e).__name__}); "
                             "use --preset tiny, or --dataset PATH with a local file") from None
        return train_set[:args.train_size], eval_set[:args.eval_size]
    try:
        rows = load_local_dataset(args.dataset, args.question_field, args.answer_field)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if len(rows) <= args.eval_size:
        raise SystemExit(f"error: {args.dataset} has {len(rows)} rows; need more than "
                         f"--eval-size {args.eval_size} to hold some out")
    # A fixed split, as for the other sources: --seed changes the order, not the problems,
    # so runs of several seeds are scored on the same held-out problems.
    random.Random(0).shuffle(rows)
    return rows[args.eval_size:][:args.train_size], rows[:args.eval_size]


def load_model(args: Args, checkpoint: Path | None = None):
    """(model, tokenizer) on args.device: from a checkpoint, the warmed-up tiny model, or a
    hub / local LM (with gradient checkpointing if asked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if checkpoint is not None:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(checkpoint))
    elif args.model == "tiny":
        try:  # before the warm-up, which takes a while, not after it
            Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot use --cache-dir {args.cache_dir} ({e.strerror})"
                             ) from None
        model, tokenizer = tiny_warm_model(args)
    else:
        if not Path(args.model).exists():
            print(f"loading {args.model} from the hub (or its local cache)")
        try:
            remote = {"trust_remote_code": args.trust_remote_code}
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.model, **remote))
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **remote)
        except Exception as e:  # noqa: BLE001 (offline, no such repo, ...: the same advice)
            raise SystemExit(f"error: could not load model '{args.model}' ({type(e).__name__});"
                             " if you are offline, use --preset tiny or pass --model a local "
                             "folder") from None
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.to(args.device), tokenizer


def enable_gradient_checkpointing(model) -> None:
    """Keep each layer's input and recompute the layer in backward (train mode only, so
    generation keeps its KV cache); non-reentrant, which also works with frozen inputs."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_tokenizer(tokenizer):
    """Left padding (every prompt ends at the same column, section 3) and a pad token, for a
    tokenizer loaded from the hub, a folder or a checkpoint. The padding side is also put
    where save_pretrained writes it, so a saved model reloads with it."""
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(argv: list[str] | None = None) -> dict:
    """Check the flags, load data and model (or the checkpoint), record the run in
    args.json, train, and save the model and summary.json."""
    import sys

    from transformers.utils import logging as hf_logging

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("plot", "compare"):
        raise SystemExit(f"error: {argv[0]} lives in tools/rlvr_tools.py now: "
                         f"python tools/rlvr_tools.py {argv[0]} ...")
    hf_logging.disable_progress_bar()  # no bars for reading or writing a few MB of weights
    # Offline, the hub client prints a warning for each of its retries; the error that
    # load_data or load_model raises after them says it in one sentence.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    args = parse_args(argv)
    check_args(args)
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, args.resume, args.overwrite)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    checkpoint = find_checkpoint(out_dir) if args.resume else None
    if args.resume and checkpoint is None:  # e.g. a run killed before its first save
        raise SystemExit(f"error: --resume: no complete checkpoint in {out_dir}; to start "
                         "that run afresh, pass --overwrite instead of --resume")
    train_set, eval_set = load_data(args)
    if args.lambda_epochs is None:  # the epoch schedule's E: passes over the training set
        args.lambda_epochs = max(2, math.ceil(args.steps * args.prompts_per_step / len(train_set)))
    resume, record = read_resume(args, out_dir, checkpoint) if checkpoint else (None, None)
    model, tokenizer = load_model(args, checkpoint)
    if checkpoint is not None:
        print(f"resuming from {checkpoint} at step {resume['step']}")
    # Reseed after loading: a warm-up run and a cached run then sample the same RL batches.
    set_seed(args.seed)
    if args.overwrite:  # only now, once every input has loaded: a failing command loses nothing
        clear_run(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # args.json: the run's settings (the latest values) and every command that ran it
    history = record["history"] if record is not None else []
    history.append({"argv": list(argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "from_step": resume["step"] if resume else 0})
    values = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}
    (out_dir / "args.json").write_text(json.dumps({**values, "history": history}, indent=1))
    print(f"{args.method} on {args.dataset} with {args.model}: {args.steps} steps, "
          f"{args.prompts_per_step} prompts x G={args.group_size}, device {args.device}; "
          f"shaping window [{args.shape_from}, {args.shape_until})")
    summary = train(args, model, tokenizer, train_set, eval_set, out_dir, resume=resume)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    sampled = (f"avg@{args.eval_k} {summary['final_avg_at_k']:.3f}, pass@{args.eval_k} "
               f"{summary['final_pass_at_k']:.3f}; " if args.eval_k else "")
    print(f"greedy accuracy {summary['start_accuracy']:.3f} -> {summary['final_accuracy']:.3f}; "
          f"{sampled}entropy (first 10 -> last 10 steps) {summary['entropy_first10']:.3f} -> "
          f"{summary['entropy_last10']:.3f}; plateau from step {summary['stage_step']}; "
          f"saved to {out_dir}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        raise SystemExit("interrupted: the rows logged so far stay in metrics.jsonl; continue "
                         "from the last checkpoint, if any, with --resume") from None
    except OSError as e:  # disk full, a folder removed mid-run, ...: a sentence, not a traceback
        raise SystemExit(f"error: {e.strerror or e}"
                         + (f": {e.filename}" if e.filename else "")) from None
