"""Tools that read finished runs of rlvr_entropy.py: plots, and a comparison of methods over
seeds. They import the teaching file; it never imports them.

    python tools/rlvr_tools.py plot RUN_DIR [RUN_DIR ...] -o fig.png [--overview]
    python tools/rlvr_tools.py compare --methods grpo,ppl,position --seeds 3 --jobs 2 [FLAGS]
    python tools/rlvr_tools.py compare --variant 'neg-only=--method posneg --pos-weight 0'

compare trains every row on seeds 0..N-1 (any other flag goes to every run), reuses the
finished runs of the same settings, then writes compare.md and compare.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rlvr_entropy as R


def read_run(run_dir: Path) -> dict:
    """A run folder as plain data: its args, metrics rows and (if finished) summary."""
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise SystemExit(f"error: run folder {run_dir} "
                         f"{'is not a folder' if run_dir.exists() else 'does not exist'}")
    if not metrics.is_file():
        raise SystemExit(f"error: {run_dir} is not a run folder (no metrics.jsonl)")
    rows = R.read_metrics(metrics)
    if not rows:
        raise SystemExit(f"error: {metrics} has no complete rows yet")
    args = R.read_args_json(run_dir) or {}
    summary = run_dir / "summary.json"
    stage = R.detect_plateau([r["entropy"] for r in rows], [r["reward"] for r in rows],
                           args.get("stage_window", 10), args.get("stage_frac", 0.25),
                           args.get("stage_patience", 5))
    return {"dir": run_dir, "args": args, "rows": rows, "stage_step": stage,
            "summary": json.loads(summary.read_text()) if summary.exists() else None}


def moving_average(values: list[float | None], window: int = 5) -> list[float | None]:
    """Trailing mean over the last `window` non-missing values (None stays None)."""
    out, seen = [], []
    for v in values:
        if v is not None:
            seen.append(v)
        out.append(sum(seen[-window:]) / len(seen[-window:]) if v is not None else None)
    return out


def save_figure(fig, out_path: Path) -> Path:
    """Write a matplotlib figure as PNG (one sentence if it cannot be written), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=110)
    except OSError as e:
        raise SystemExit(f"error: cannot write the figure {out_path} ({e.strerror})") from None
    finally:
        plt.close(fig)
    return out_path


def plot_runs(run_dirs: list[Path], out_path: Path, smooth: int = 5,
              labels: dict | None = None) -> Path:
    """Draw reward/accuracy, entropy, positive vs negative entropy and the position profile
    of each run, one colour per method (or per labels[str(run_dir)]), a dotted line at each
    run's stage transition."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    runs = [read_run(Path(d)) for d in run_dirs]
    for run in runs:
        run["label"] = (labels or {}).get(str(run["dir"])) or run["args"].get("method", "?")
    methods = list(dict.fromkeys(r["label"] for r in runs))
    palette = [f"C{i}" for i in range(10)] if len(methods) <= 10 else plt.get_cmap("tab20").colors
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, ax = plt.subplots(3, 4, figsize=(24, 12.5))
    labelled = set()
    for run in runs:
        rows, method = run["rows"], run["label"]
        c = colour[method]
        label = method if method not in labelled else None
        labelled.add(method)
        steps = [r["step"] for r in rows]
        ax[0, 0].plot(steps, moving_average([r["reward"] for r in rows], smooth), c=c, lw=1,
                      label=label and f"{label}: train reward")
        acc = [(r["step"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
        if run["summary"] is not None:
            acc.append((rows[-1]["step"] + 1, run["summary"]["final_accuracy"]))
        ax[0, 0].plot(*zip(*acc), c=c, ls="--", marker="o", ms=3, lw=1,
                      label=label and f"{label}: held-out greedy acc")
        ax[0, 1].plot(steps, moving_average([r["entropy"] for r in rows], smooth), c=c, lw=1,
                      label=label)
        ax[1, 0].plot(steps, moving_average([r["entropy_pos"] for r in rows], smooth), c=c, lw=1,
                      label=label and f"{label}: positive (r=1)")
        ax[1, 0].plot(steps, moving_average([r["entropy_neg"] for r in rows], smooth), c=c,
                      lw=1, ls="--", label=label and f"{label}: negative (r=0)")
        if run["stage_step"] is not None:
            for a in (ax[0, 0], ax[0, 1], ax[1, 0]):
                a.axvline(run["stage_step"], c=c, ls=":", lw=1)
        if method in ("ppl", "position") and label and run["args"].get("shape_from") != "plateau":
            lo, hi = run["args"].get("shape_from"), run["args"].get("shape_until")
            if lo is not None and hi is not None and lo < hi:  # the shaping window of [A]
                ax[0, 1].axvspan(lo, hi, color=c, alpha=0.08, lw=0)
        n = max(1, len(rows) // 10)  # first and last 10% of the steps
        for part, ls, name in ((rows[:n], "--", "early"), (rows[-n:], "-", "late")):
            profile = []
            for b in range(10):
                vals = [r["entropy_by_position"][b] for r in part
                        if r["entropy_by_position"][b] is not None]
                profile.append(sum(vals) / len(vals) if vals else float("nan"))
            which = "first" if name == "early" else "last"
            ax[1, 1].plot([b * 10 + 5 for b in range(10)], profile, c=c, ls=ls, marker=".",
                          label=label and f"{label}: {name} ({which} {n} steps)")
        plot_analysis_panels(ax, run, c, label, smooth)
        ax[2, 3].plot(steps, [r.get("entropy_coef") or 0.0 for r in rows], c=c, lw=1, label=label)
    plot_sign_rule_panels(ax[0, 3], ax[1, 3], runs, colour)
    quadrant, position = "sign of A, and whether o_t was pi_old's top token", "position (%)"
    titles = {
        (0, 0): (f"reward ({smooth}-step mean) and held-out accuracy; dotted: plateau starts",
                 "step"),
        (0, 1): (f"token entropy ({smooth}-step mean); shaded: shaping window", "step"),
        (1, 0): ("entropy of positive vs negative responses", "step"),
        (1, 1): ("entropy by relative position in the response", position),
        (0, 2): (f"diversity [B]: distinct final answers per group ({smooth}-step mean)", "step"),
        (1, 2): ("distinct-n of each group's responses: n = 1 (dotted), 2 (solid), 3 (dashed)",
                 "step"),
        (2, 0): ("calibration [B]: ECE (solid), mean confidence (dashed), accuracy (dotted)",
                 "step"),
        (2, 1): (("token movement [A]: barely moved (solid), top-20% entropy (dashed), "
                 "low-PPL third (dotted)"), "step"),
        (2, 2): ("share of the movement by relative position (mean over logged steps)", position),
        (0, 3): (("sign rule [B]: an update's entropy change, summed by quadrant (mean over "
                 "logged steps)"), quadrant),
        (1, 3): ("share of tokens by quadrant (mean over logged steps)", quadrant),
        (2, 3): ("entropy bonus alpha (--entropy-coef)", "step")}
    for (i, j), (title, xlabel) in titles.items():
        a = ax[i, j]
        a.set_title(title, fontsize=10)
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return save_figure(fig, out_path)


def plot_sign_rule_panels(ax_sum, ax_share, runs: list[dict], colour: dict) -> None:
    """Bars of dh_sum_* and dh_share_* (entropy_change_by_quadrant), each the mean over a
    label's runs and their logged steps: one group of bars per quadrant, one bar per label."""
    labels = list(colour)
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        rows = [r for run in runs if run["label"] == label for r in run["rows"]
                if r.get("dh_sum_pos_top") is not None]
        if not rows:
            continue
        x = [q + (i - (len(labels) - 1) / 2) * width for q in range(len(R.QUADRANTS))]
        for a, kind in ((ax_sum, "sum"), (ax_share, "share")):
            a.bar(x, [sum(r[f"dh_{kind}_{q}"] for r in rows) / len(rows) for q in R.QUADRANTS],
                  width, color=colour[label], label=label)
    for a in (ax_sum, ax_share):
        a.set_xticks(range(len(R.QUADRANTS)), ["A>0, top", "A>0, other", "A<0, top", "A<0, other"])
    ax_sum.axhline(0, c="k", lw=0.5)


def plot_analysis_panels(ax, run: dict, c: str, label: str | None, smooth: int) -> None:
    """The panels of diversity, calibration and token movement (section 10) for one run."""
    rows = run["rows"]

    def series(key, pick=lambda v: v):
        pts = [(r["step"], pick(r[key])) for r in rows if r.get(key) is not None]
        return list(zip(*pts)) if pts else ([], [])

    steps = [r["step"] for r in rows]
    ax[0, 2].plot(steps, moving_average([r.get("distinct_answers") for r in rows], smooth), c=c,
                  lw=1, label=label)
    for n, ls in ((1, ":"), (2, "-"), (3, "--")):
        ax[1, 2].plot(steps, moving_average([r.get(f"distinct_{n}") for r in rows], smooth), c=c,
                      lw=1, ls=ls, label=label if n == 2 else None)
    for key, ls in (("ece", "-"), ("confidence", "--"), ("accuracy", ":")):
        ax[2, 0].plot(*series(key), c=c, ls=ls, marker=".", lw=1,
                      label=label if key == "ece" else None)
    for key, pick, ls in (("barely_moved", None, "-"), ("move_high_entropy", None, "--"),
                          ("move_ppl_terciles", lambda v: v[0], ":")):
        ax[2, 1].plot(*series(key, pick or (lambda v: v)), c=c, ls=ls, lw=1,
                      label=label if ls == "-" else None)
    profiles = [r["move_by_position"] for r in rows if r.get("move_by_position")]
    if profiles:
        mean = [sum(p[b] for p in profiles) / len(profiles) for b in range(len(profiles[0]))]
        ax[2, 2].plot([b * 10 + 5 for b in range(len(mean))], mean, c=c, marker=".", label=label)


def mean_std(values: list[float | None], digits: int = 3) -> str:
    """'mean ± sample std' ('mean' alone for one value, 'n/a' for none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    std = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {std:.{digits}f}"


def resolved(values: list[float], reference: list[float], t: float = 2.78) -> bool:
    """Whether two groups of runs differ by more than t standard errors of the difference
    (Welch: sqrt(s1^2/n1 + s2^2/n2); 2.78 is the 95% point of Student's t at about 4
    degrees of freedom, 3 seeds against 3). Needs two runs on each side."""
    if len(values) < 2 or len(reference) < 2:
        return False
    def mean_var(x: list[float]) -> tuple[float, float]:
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)

    (m1, v1), (m2, v2) = mean_var(values), mean_var(reference)
    se = math.sqrt(v1 / len(values) + v2 / len(reference))
    return abs(m1 - m2) > t * se if se > 0 else m1 != m2


def resolved_cell(columns: list[list], reference: list[list], names: list[str]) -> str:
    """The differences from the reference row that three seeds resolve (resolved): entropy
    as a ratio of means, the others as signed differences; '—' for none."""
    out = []
    for name, vals, ref in zip(names, columns, reference):
        vals, ref = [v for v in vals if v is not None], [v for v in ref if v is not None]
        if resolved(vals, ref):
            m, r = sum(vals) / len(vals), sum(ref) / len(ref)
            out.append(f"{name} {m / r:.2f}×" if name == "entropy" else f"{name} {m - r:+.3f}")
    return ", ".join(out) or "—"


def compare_table(runs: list[dict], wall: dict, reference: str | None = None) -> str:
    """Markdown table, one line per variant (a run's "variant", else its method): mean ±
    sample std over its runs (seeds). A clip fraction is first a run's mean over its steps.
    With a reference variant, a last column names the differences from it that the seeds
    resolve (resolved_cell)."""
    k = next((r["summary"]["eval_k"] for r in runs if r["summary"]), 0)
    header = (f"| variant | runs | final greedy acc | avg@{k} | pass@{k} | final entropy "
              "(last 20 steps) | distinct answers per group (last 20 steps) | final ECE "
              "| clip low (% of tokens, all steps) | clip high (% of tokens, all steps) "
              "| plateau step | wall time (s) |" + (f" resolved against {reference} by the "
                                                     "seeds |" if reference else ""))
    lines = [header, "|" + "---|" * (13 if reference else 12)]
    def name(run: dict) -> str:
        return run.get("variant") or run["args"]["method"]

    finished = {v: [r for r in runs if name(r) == v and r["summary"]]
                for v in dict.fromkeys(map(name, runs))}
    columns = {v: [[r["summary"].get(key) for r in done] for key in
                   ("final_accuracy", "final_avg_at_k", "final_pass_at_k", "final_entropy",
                    "final_distinct_answers", "final_ece")] + [
                   [100 * sum(row[key] for row in r["rows"]) / len(r["rows"]) for r in done]
                   for key in ("clip_frac_low", "clip_frac_high")]
               for v, done in finished.items()}
    names = ["accuracy", f"avg@{k}", f"pass@{k}", "entropy", "distinct answers", "ECE",
             "clip low %", "clip high %"]
    for variant, done in finished.items():
        stages = [r["stage_step"] for r in done if r["stage_step"] is not None]
        stage = "none" if not stages else mean_std(stages, 1) + (
            f" ({len(stages)} of {len(done)} runs)" if len(stages) < len(done) else "")
        secs = mean_std([wall[str(r["dir"])] for r in done], 0)
        cells = " | ".join(map(mean_std, columns[variant])) + f" | {stage} | {secs} |"
        if reference:
            cells += (" (the reference) |" if variant == reference else
                      f" {resolved_cell(columns[variant], columns[reference], names)} |")
        lines.append(f"| {variant} | {len(done)} | {cells}")
    return "\n".join(lines) + "\n"


def compare_run_state(run_dir: Path, args: R.Args) -> str:
    """What `compare` finds in a run folder: 'empty' (no run), 'done' (finished with these
    settings and steps), or a phrase that says why it cannot be reused."""
    if not any((run_dir / n).exists() for n in ("metrics.jsonl", "checkpoint", "checkpoint.old")):
        return "empty"
    record = R.read_args_json(run_dir)
    if record is None:
        return "a run without a readable args.json"
    now = R.run_settings(args)
    if args.lambda_epochs is None:  # derived from --steps and the data: compared through them
        now.pop("lambda_epochs", None)
    differ = R.settings_differences(record, now)
    if record.get("steps") != args.steps and "steps" not in now:
        differ.append(f"--steps {record.get('steps')!r} in the run, {args.steps!r} now")
    if differ:
        return f"a run with other settings ({'; '.join(differ)})"
    if not (run_dir / "summary.json").exists():
        return "an unfinished run"
    return "done"


def compare_variants(methods_arg: str | None, specs: list[str]) -> tuple[list[str], dict]:
    """compare's rows: the --methods list, and {name: its own training flags} for each method
    (["--method", m]) and each --variant NAME=FLAGS, in order."""
    if methods_arg is None:
        methods_arg = "" if specs else "grpo,ppl,position"
    methods = [m.strip() for m in methods_arg.split(",") if m.strip()]
    bad = [m for m in methods if m not in R.METHODS]
    if bad or not (methods or specs):
        raise SystemExit(f"error: --methods: unknown {bad or 'empty'}; choose from "
                         f"{', '.join(R.METHODS)}")
    variants = {m: ["--method", m] for m in methods}
    for spec in specs:
        name, eq, flags = (part.strip() for part in spec.partition("="))
        if not eq or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in variants:
            raise SystemExit(f"error: --variant {spec!r}: want NAME=FLAGS, NAME unique and made of "
                             "letters, digits and _.+-")
        variants[name] = shlex.split(flags)
    return methods, variants


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/rlvr_tools.py compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run several methods on the same seeds and table them. Any other flag "
                    "(e.g. --preset, --steps) is passed to every training run.")
    p.add_argument("--methods", help="comma-separated methods (default: grpo,ppl,position, "
                   "or none when --variant is given)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="a named row with its own training flags, after the shared ones, e.g. "
                        "'nsr=--method posneg --pos-weight 0' or 'clip-cov=--clip-cov-ratio "
                        "0.01'; repeat for more; without --method a variant is grpo")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method")
    p.add_argument("--reference", metavar="NAME", help="a method or variant: a last column "
                   "names the differences from it that the seeds resolve (Welch, 2.78 SE)")
    p.add_argument("--out-dir", default="runs/compare", help="one sub-folder per run, plus "
                   "compare.md and compare.png")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at the same time; with more than 1 and no --threads of the "
                        "preset or the flags (gsm8k), each run uses cpu_count/jobs threads")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every run; by default a finished run with the same settings is "
                        "reused, so --seeds 5 after --seeds 3 trains only seeds 3 and 4")
    return p


def compare_plan(opts: argparse.Namespace, train_flags: list[str],
                 variants: dict) -> tuple[R.Args, list, dict]:
    """Check every run's flags, then sort the runs into those to train and the finished
    ones to reuse: (the shared settings, [(variant, seed)] to run, {run_dir: wall time})."""
    if opts.seeds < 1 or opts.jobs < 1:
        raise SystemExit("error: --seeds and --jobs must be at least 1")
    own = {"--seed", "--out-dir", "--resume", "--overwrite"}
    blocked = ((own | {"--method"}) & {f.split("=")[0] for f in train_flags}
               | own & {f.split("=")[0] for flags in variants.values() for f in flags})
    if blocked:
        raise SystemExit(f"error: compare sets {', '.join(sorted(blocked))} itself")
    args = R.parse_args(train_flags)  # validate every run's flags before any run starts
    R.check_args(args)
    for flags in variants.values():
        R.check_args(R.parse_args([*train_flags, *flags]))
    out_root = Path(opts.out_dir)
    R.check_out_dir(out_root, resume=False, overwrite=True)  # a file, or not writable
    todo, wall = [], {}
    for vname, seed in [(v, s) for v in variants for s in range(opts.seeds)]:
        run_dir = out_root / f"{vname}-seed{seed}"
        state = compare_run_state(run_dir, R.parse_args(
            ["--preset", args.preset, "--seed", str(seed), "--out-dir", str(run_dir),
             *train_flags, *variants[vname]]))
        if state == "done" and not opts.overwrite:
            wall[str(run_dir)] = json.loads((run_dir / "summary.json").read_text()).get(
                "wall_time", float("nan"))
        elif state in ("empty", "done") or opts.overwrite:
            todo.append((vname, seed))
        else:  # refuse before any run starts, so nothing is lost and no time is spent
            raise SystemExit(f"error: {run_dir} holds {state}; pass --overwrite to redo it, "
                             "or choose another --out-dir")
    return args, todo, wall


def run_jobs(todo: list, out_root: Path, train_flags: list[str], variants: dict, jobs: int,
             threads: int | None, wall: dict) -> list[Path]:
    """Train each (variant, seed) of `todo` as its own process of rlvr_entropy.py, `jobs`
    at a time, each logging to its run folder's log.txt; record each one's wall time in
    `wall` and in its summary.json. Returns the folders of the runs that failed."""
    from tqdm import tqdm

    running, failed = [], []
    bar = tqdm(total=len(todo), desc="compare", dynamic_ncols=True)
    while todo or running:
        while todo and len(running) < jobs:
            vname, seed = todo.pop(0)
            run_dir = out_root / f"{vname}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, R.__file__, "--seed", str(seed), "--out-dir",
                   str(run_dir), "--overwrite", *train_flags, *variants[vname]]
            cmd += ["--threads", str(threads)] if threads and "--threads" not in cmd else []
            log = (run_dir / "log.txt").open("w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                            run_dir, time.time(), log))
        time.sleep(0.5)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, run_dir, t0, log = job
            log.close()
            running.remove(job)
            wall[str(run_dir)] = time.time() - t0
            if proc.returncode != 0:
                failed.append(run_dir)
                tqdm.write(f"{run_dir} failed (exit {proc.returncode}); see {run_dir / 'log.txt'}")
            else:  # kept in the summary, so a later compare that reuses the run can table it
                summary = json.loads((run_dir / "summary.json").read_text())
                summary["wall_time"] = wall[str(run_dir)]
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            bar.update(1)
    bar.close()
    return failed


def compare(argv: list[str]) -> str:
    """`compare`: train each method on each seed (same preset and flags), then write
    compare.md and compare.png in --out-dir and print the table."""
    opts, train_flags = compare_parser().parse_known_args(argv)
    start = time.time()  # the whole command, warm-up included
    methods, variants = compare_variants(opts.methods, opts.variant)
    if opts.reference is not None and opts.reference not in variants:
        raise SystemExit(f"error: --reference {opts.reference!r} is not one of the rows: "
                         f"{', '.join(variants)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args, todo, wall = compare_plan(opts, train_flags, variants)
    out_root = Path(opts.out_dir)
    if wall:
        print(f"reusing {len(wall)} finished run(s) with the same settings "
              f"(--overwrite redoes them)")
    if args.model == "tiny" and todo:  # warm up once here, so parallel runs do not all do it
        R.set_seed(args.seed)
        R.tiny_warm_model(args)
    # Parallel runs share the cores, unless the preset or the flags pin the threads already.
    threads = (max(1, (os.cpu_count() or 1) // opts.jobs)
               if opts.jobs > 1 and not args.threads else None)
    failed = run_jobs(todo, out_root, train_flags, variants, opts.jobs, threads, wall)
    runs = [{**read_run(Path(d)), "variant": Path(d).name.rsplit("-seed", 1)[0]}
            for d in wall if Path(d) not in failed]
    runs.sort(key=lambda r: (list(variants).index(r["variant"]), r["args"]["seed"]))
    command = shlex.join(["python", "tools/rlvr_tools.py", "compare"]
                         + (["--methods", ",".join(methods)] if methods else [])
                         + [f for spec in opts.variant for f in ("--variant", spec)]
                         + (["--reference", opts.reference] if opts.reference else [])
                         + ["--seeds", str(opts.seeds), "--jobs", str(opts.jobs), *train_flags])
    table = compare_table(runs, wall, opts.reference) if runs else "no run finished\n"
    text = f"Command: `{command}`; total wall time {time.time() - start:.0f} s.\n\n{table}"
    (out_root / "compare.md").write_text(text)
    if runs:
        plot_runs([r["dir"] for r in runs], out_root / "compare.png",
                  labels={str(r["dir"]): r["variant"] for r in runs})
    print(text + f"\nsaved {out_root / 'compare.md'} and {out_root / 'compare.png'}")
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(map(str, failed))}")
    return text


def plot_overview(run_dirs: list[Path], out_path: Path, smooth: int = 5) -> Path:
    """Two panels for a front page: held-out greedy accuracy and token entropy over steps,
    one line per run, the shaping window of [A] shaded."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(Path(d)) for d in run_dirs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, run in enumerate(runs):
        rows, a = run["rows"], run["args"]
        label = f"{a.get('method', '?')}, seed {a.get('seed', '?')}"
        acc = [(r["step"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
        if run["summary"] is not None:
            acc.append((rows[-1]["step"] + 1, run["summary"]["final_accuracy"]))
        left.plot(*zip(*acc), c=f"C{i}", marker="o", ms=3, lw=1.5, label=label)
        right.plot([r["step"] for r in rows], moving_average([r["entropy"] for r in rows], smooth),
                   c=f"C{i}", lw=1.5, label=label)
    shaded = {(r["args"].get("shape_from"), r["args"].get("shape_until")) for r in runs
              if r["args"].get("method") in ("ppl", "position")}
    for lo, hi in shaded:
        if isinstance(lo, int) and isinstance(hi, int) and lo < hi:
            for a in (left, right):
                a.axvspan(lo, hi, color="grey", alpha=0.15, lw=0)
    left.set(title="held-out greedy accuracy (shaded: shaping window)", xlabel="RL step",
             ylim=(0, 1))
    right.set(title=f"token entropy of the sampled responses ({smooth}-step mean)",
              xlabel="RL step")
    for a in (left, right):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return save_figure(fig, out_path)


def variant_runs(folder: Path) -> dict:
    """The runs of a `compare` folder ({variant}-seed{n}, read_run) as {variant: [runs]},
    variants in compare.md's order, else by name."""
    folder, runs = Path(folder), {}
    for d in sorted(folder.glob("*-seed*")):
        if (d / "metrics.jsonl").is_file():
            runs.setdefault(d.name.rsplit("-seed", 1)[0], []).append(read_run(d))
    if not runs:
        raise SystemExit(f"error: {folder} holds no run folders (NAME-seedN) of compare")
    table = (folder / "compare.md").read_text() if (folder / "compare.md").exists() else ""
    return {n: runs[n] for n in sorted(runs, key=lambda n: (f"| {n} |" not in table,
                                                            table.find(f"| {n} |"), n))}


def variant_curves(folder: Path, smooth: int = 5) -> dict:
    """{variant: (mean, low, high)} of a `compare` folder (variant_runs): each seed's
    moving-average token entropy, then per step their mean, min and max (over the steps
    every seed reached)."""
    out = {}
    for name, runs in variant_runs(folder).items():
        curves = [moving_average([r["entropy"] for r in run["rows"]], smooth) for run in runs]
        at = list(zip(*curves))  # per step, one value per seed (zip stops at the shortest)
        out[name] = ([sum(v) / len(v) for v in at], [min(v) for v in at], [max(v) for v in at])
    return out


def factor_tables(folder: Path, reference: str, windows: int = 5) -> str:
    """Two tables of a `compare` folder (variant_runs), mean ± std over seeds: token entropy
    in `windows` 10-step windows spread over the run; and [B]'s sign rule, each run's mean
    over its logged steps of dh_sum per quadrant and of their sum (x 1000: the change of the
    re-scored batch's entropy per valid token), * where it differs from `reference` by more
    than the seeds' noise (resolved)."""
    runs = variant_runs(folder)
    if reference not in runs:
        raise SystemExit(f"error: --reference {reference!r} is not one of {', '.join(runs)}")
    steps = min(len(run["rows"]) for rs in runs.values() for run in rs)
    starts = sorted({round(i * max(0, steps - 10) / max(1, windows - 1)) for i in range(windows)})
    ends = [min(a + 10, steps) for a in starts]
    heads = [f"entropy, steps {a}–{b - 1}" for a, b in zip(starts, ends)]
    lines = ["| variant | " + " | ".join(heads) + " |", "|---|" + "---|" * len(starts)]
    for name, rs in runs.items():
        lines.append(f"| {name} | " + " | ".join(mean_std(
            [sum(r["entropy"] for r in run["rows"][a:b]) / (b - a) for run in rs], 4)
            for a, b in zip(starts, ends)) + " |")
    sums = {}
    for name, rs in runs.items():
        per_run = [[1000 * sum(x) / max(1, len(x)) for x in
                    ([r[f"dh_sum_{q}"] for r in run["rows"] if r.get(f"dh_sum_{q}") is not None]
                     for q in R.QUADRANTS)] for run in rs]
        sums[name] = [list(col) for col in zip(*per_run)] + [[sum(v) for v in per_run]]
    lines += ["", "| variant | " + " | ".join(f"dH {q} (x1000)" for q in R.QUADRANTS)
              + " | dH, all four (x1000) |", "|---|" + "---|" * 5]
    for name, cols in sums.items():
        lines.append(f"| {name} | " + " | ".join(
            mean_std(c) + ("*" if name != reference and resolved(c, sums[reference][i]) else "")
            for i, c in enumerate(cols)) + " |")
    return "\n".join(lines) + "\n"


def plot_factors(compare_dirs: list[Path], out_path: Path, smooth: int = 5) -> Path:
    """One panel per `compare` folder (one factor): each variant's token entropy over steps,
    the mean over its seeds, their range shaded (variant_curves)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(compare_dirs), figsize=(5.2 * len(compare_dirs), 3.8),
                             squeeze=False)
    for ax, folder in zip(axes[0], compare_dirs):
        for i, (name, (mean, low, high)) in enumerate(variant_curves(folder, smooth).items()):
            ax.plot(range(len(mean)), mean, c=f"C{i}", lw=1.5, label=name)
            ax.fill_between(range(len(mean)), low, high, color=f"C{i}", alpha=0.15, lw=0)
        ax.set(title=f"{Path(folder).name}: token entropy ({smooth}-step mean, seeds' range)",
               xlabel="RL step", yscale="log")  # a run-away and a collapse on one axis
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def plot_command(argv: list[str]) -> Path:
    """`plot RUN_DIR [RUN_DIR ...] -o fig.png`."""
    p = argparse.ArgumentParser(prog="tools/rlvr_tools.py plot",
                                description="Plot one or more run folders on shared axes.")
    p.add_argument("run_dirs", nargs="+", help="folders written by a training run")
    p.add_argument("-o", "--output", default="runs/plot.png", help="PNG file to write")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window (steps)")
    p.add_argument("--overview", action="store_true", help="two panels only: accuracy and "
                   "entropy over steps, the shaping window shaded (the README's figure)")
    p.add_argument("--factors", action="store_true", help="each folder is a compare --out-dir:"
                   " one panel per folder, each variant's entropy over steps (mean of seeds)")
    opts = p.parse_args(argv)
    if opts.smooth < 1:
        raise SystemExit(f"error: --smooth must be at least 1 (got {opts.smooth})")
    if Path(opts.output).is_dir():
        raise SystemExit(f"error: -o {opts.output} is a folder; name a .png file")
    draw = plot_factors if opts.factors else plot_overview if opts.overview else plot_runs
    out = draw([Path(d) for d in opts.run_dirs], Path(opts.output), opts.smooth)
    print(f"saved {out}")
    return out




def factors_command(argv: list[str]) -> str:
    """`factors COMPARE_DIR --reference NAME`: factor_tables, printed."""
    p = argparse.ArgumentParser(prog="tools/rlvr_tools.py factors",
                                description="Entropy over steps and [B]'s sign-rule quadrants "
                                            "of a compare folder, per variant, over seeds.")
    p.add_argument("folder", help="a compare --out-dir")
    p.add_argument("--reference", required=True, help="the variant the * marks compare with")
    opts = p.parse_args(argv)
    text = factor_tables(Path(opts.folder), opts.reference)
    print(text)
    return text


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        return plot_command(argv[1:])
    if argv and argv[0] == "factors":
        return factors_command(argv[1:])
    if argv and argv[0] == "compare":
        return compare(argv[1:])
    raise SystemExit("usage: tools/rlvr_tools.py plot RUN_DIR ... -o fig.png | "
                     "tools/rlvr_tools.py factors COMPARE_DIR --reference NAME | "
                     "tools/rlvr_tools.py compare [--methods ...] [--variant NAME=FLAGS] "
                     "[--seeds N] [--jobs N] [training flags]  (each has --help)")


if __name__ == "__main__":
    main()
