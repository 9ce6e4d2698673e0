"""Memory of the gsm8k preset at its real shape, measured on the CPU (a benchmark, not a test).

The preset's step at Qwen2.5's real vocabulary (151,936) and hidden size, random weights:
  generate   16 prompts x G = 8 = 128 rows, a 160-token prompt, up to 512 new tokens
  no-grad    one micro-batch (--micro-batch-size rows) at 160 + 512 tokens: old log-probs and entropy
  update     one micro-batch forward + backward + an AdamW step, with AdamW's state already
             allocated (as for every mini-batch after a run's first), with or without
             --gradient-checkpointing
A full 24-layer step takes hours on 2 cores, so each phase runs at a few layer counts, in a
fresh process each (peak RSS, sampled every 2 ms, less the process's RSS before the model
was built), and a least-squares line through the layer counts is extrapolated to 24 layers
(0.5B) and 28 (1.5B). Generation runs 16 and 32 new tokens; its peak is extrapolated to 512
along the same kind of line (the KV cache grows by a fixed amount per token).
The CPU runs fp32 throughout. On CUDA the forward passes run under bf16 autocast, so
activations and logits take less there; weights, gradients and AdamW state are fp32 on both.

    python bench/memory.py [--shapes 0.5b,1.5b] [--layers 1,2,3] [--out bench/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "testdata")]

PROMPT, RESPONSE, ROWS = 160, 512, 128
GEN_TOKENS = (16, 32)  # generation lengths measured; the line through them reaches 512


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRSS:
    """Samples this process's RSS every 2 ms while active; .peak is the largest seen."""

    def __enter__(self):
        self.peak, self.running = rss_mb(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_mb())


def one(shape: str, layers: int, phase: str, micro: int, new_tokens: int, ckpt: bool) -> dict:
    """One phase in this process; returns its peak RSS above the pre-model baseline, in MB."""
    import qwen_fixture as Q
    import torch

    import rlvr_entropy as R

    torch.manual_seed(0)
    base = rss_mb()
    model = Q.build_qwen_model(layers, shape)
    model.generation_config.top_k = None
    V = model.config.vocab_size
    t0 = time.perf_counter()
    if phase == "generate":
        class Tok:  # the rollout needs only the padded prompts and two ids
            pad_token_id, eos_token_id = 151643, 151645

            def __call__(self, prompts, **kw):
                ids = torch.randint(0, 151643, (len(prompts), PROMPT))
                return type("Enc", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

        with PeakRSS() as p:
            ro = R.generate_rollouts(model, Tok(), ["q"] * (ROWS // 8), 8, new_tokens,
                                     eos_ids=[151645, 151643])
        assert ro["completion_ids"].shape == (ROWS, new_tokens), "a row stopped early"
    else:
        ids = torch.randint(0, 151643, (micro, PROMPT + RESPONSE))
        rollout = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "completion_ids": ids[:, PROMPT:], "completion_mask": torch.ones(micro, RESPONSE)}
        if phase == "no-grad":
            with PeakRSS() as p:
                R.old_policy_stats(model, rollout, 1.0, micro)
        else:
            if ckpt:
                R.enable_gradient_checkpointing(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
            for q in model.parameters():  # AdamW's state exists from the 2nd mini-batch on
                q.grad = torch.zeros_like(q)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            args = R.Args(micro_batch_size=micro, mini_batches=1)
            adv = torch.randn(micro, 1).sign().expand(micro, RESPONSE).contiguous()
            targets = {"old_logp": torch.full((micro, RESPONSE), -12.0), "advantages": adv,
                       "token_weights": torch.ones_like(adv), "kl_picked": None,
                       "rows": torch.arange(micro)}
            with PeakRSS() as p:
                R.policy_update(model, optimizer, rollout, targets, args)
    return {"shape": shape, "layers": layers, "phase": phase, "micro": micro,
            "new_tokens": new_tokens, "ckpt": ckpt, "peak_mb": p.peak - base,
            "seconds": time.perf_counter() - t0, "vocab": V, "torch": torch.__version__}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b,1.5b", help="Qwen2.5 sizes to measure")
    p.add_argument("--layers", default="1,2,3", help="layer counts of the fit")
    p.add_argument("--phases", default="generate,no-grad,update", help="phases to measure")
    p.add_argument("--out", default=str(HERE / "memory.json"), help="JSON of every measurement")
    p.add_argument("--report", nargs="+", help="only print the report of these JSON files")
    p.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # a single measurement (internal)
    a = p.parse_args()
    if a.report:
        results = [r for f in a.report for r in json.loads(Path(f).read_text())]
        report(results, sorted({r["shape"] for r in results}))
        return
    if a.one:
        shape, layers, phase, micro, new, ckpt = a.one
        print(json.dumps(one(shape, int(layers), phase, int(micro), int(new), ckpt == "1")))
        return
    plan, phases = [], a.phases.split(",")
    for shape in a.shapes.split(","):
        micros = (8, 4) if shape == "1.5b" else (8,)
        for layers in map(int, a.layers.split(",")):
            plan += [(shape, layers, "generate", 0, n, 0) for n in GEN_TOKENS]
            plan += [(shape, layers, "no-grad", m, 0, 0) for m in micros]
            plan += [(shape, layers, "update", m, 0, c) for m in micros for c in (0, 1)]
    plan = [job for job in plan if job[2] in phases]
    results = []
    for job in plan:
        out = subprocess.run([sys.executable, __file__, "--one", *map(str, job)], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.splitlines()[-1]))
        r = results[-1]
        print(f"{r['shape']} L={r['layers']} {r['phase']:8s} micro={r['micro']} new={r['new_tokens']} "
              f"ckpt={int(r['ckpt'])}: {r['peak_mb']:,.0f} MB ({r['seconds']:.0f} s)", flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    report(results, a.shapes.split(","))


def kv_cache_mb(shape: str, layers: int, tokens: int, rows: int = ROWS) -> float:
    """fp32 K and V of every layer for rows x tokens: computed, not measured."""
    import qwen_fixture as Q

    s = Q.SHAPES[shape]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    return rows * tokens * layers * 2 * s["num_key_value_heads"] * head_dim * 4 / 2**20


def report(results: list[dict], shapes: list[str]) -> None:
    """Fit each phase's peak over the layer counts and extrapolate to the full model."""
    import qwen_fixture as Q

    print("\nPeaks extrapolated to the full layer count (GiB; fp32 on the CPU):")
    for shape in shapes:
        full = Q.SHAPES[shape]["full_layers"]
        groups = {}
        for r in results:
            if r["shape"] == shape:
                groups.setdefault((r["phase"], r["micro"], r["ckpt"], r["new_tokens"]), []).append(r)
        for (phase, micro, ckpt, new), rs in sorted(groups.items()):
            layers = sorted(r["layers"] for r in rs)
            if len(set(layers)) < 2:  # no line through one point
                continue
            a0, b0 = fit([r["layers"] for r in rs], [r["peak_mb"] for r in rs])
            peak = a0 + b0 * full
            what = (f"generate {ROWS} rows, {new} new tokens" if phase == "generate" else
                    f"{phase} micro-batch {micro}{' + gradient checkpointing' if ckpt else ''}")
            print(f"  {shape}, {full} layers (fit over {layers}): {what}: {peak / 1024:.1f} "
                  f"({b0:,.0f} MB per layer)")
            if phase == "generate" and new == max(GEN_TOKENS):
                growth = (kv_cache_mb(shape, full, PROMPT + RESPONSE)
                          - kv_cache_mb(shape, full, PROMPT + new))
                print(f"  {shape}, {full} layers: generate {ROWS} rows, {RESPONSE} new tokens: about "
                      f"{(peak + growth) / 1024:.1f} (the {new}-token peak plus the KV cache's "
                      f"growth to {PROMPT + RESPONSE} tokens, {growth / 1024:.1f}, computed)")

if __name__ == "__main__":
    main()
