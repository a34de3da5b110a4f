"""Completions verified per second: rlvr's math_accuracy (in-process, 1 and 2 worker processes) vs math-verify directly.

The same completions (a mix of right, wrong and unparsable boxed answers) are scored by:

* ``math-verify direct``: ``parse`` + ``verify`` in a loop, in this process, no time bounds (the baseline);
* ``rlvr in-process``: ``MathAccuracy(workers=0)``, math-verify's signal timeouts, main thread only;
* ``rlvr N worker(s)``: ``MathAccuracy(workers=N)``, hard per-completion deadlines (the safe mode).

    python benchmarks/reward_throughput.py
    python benchmarks/reward_throughput.py --sizes 64,512 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rlvr.rewards.math import MathAccuracy


def make_batch(size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, golds = [], []
    for _ in range(size):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        kind = rng.random()
        if kind < 0.5:
            answer = f"\\frac{{{a * b}}}{{{b}}}"  # right, needs simplification
        elif kind < 0.8:
            answer = str(a + 1)  # wrong
        else:
            answer = "x^{" + "{" * 3  # unparsable
        # The prose names no number: math-verify alone would read one from it when the box is cut off.
        completions.append(f"Step 1: multiply, then divide.\nSo the answer is \\boxed{{{answer}}}.")
        golds.append(str(a))
    return completions, golds


def direct(completions: list[str], golds: list[str]) -> list[float]:
    scores = []
    for completion, gold in zip(completions, golds, strict=True):
        gold_parsed = parse(f"${gold}$", extraction_config=(LatexExtractionConfig(), ExprExtractionConfig()))
        predicted = parse(
            completion, extraction_config=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
        )
        scores.append(float(bool(gold_parsed and predicted and verify(gold_parsed, predicted))))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256,512", help="completions per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and size (interleaved)")
    args = parser.parse_args()
    methods = {
        "math-verify direct": direct,
        "rlvr in-process": MathAccuracy(workers=0),
        "rlvr 1 worker": MathAccuracy(workers=1),
        "rlvr 2 workers": MathAccuracy(workers=2),
    }
    warm_completions, warm_golds = make_batch(16, seed=99)
    for method in methods.values():  # start workers, import everything
        method(warm_completions, answer=warm_golds) if method is not direct else method(warm_completions, warm_golds)
    print(f"{'completions/s':22}" + "".join(f"{size:>10}" for size in map(int, args.sizes.split(","))))
    rows = {name: [] for name in methods}
    for size in map(int, args.sizes.split(",")):
        completions, golds = make_batch(size)
        expected = direct(completions, golds)
        seconds = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                start = time.perf_counter()
                scores = method(completions, golds) if method is direct else method(completions, answer=golds)
                seconds[name].append(time.perf_counter() - start)
                assert scores == expected, f"{name} disagrees with math-verify: " + str(
                    [(c, g, a, b) for c, g, a, b in zip(completions, golds, expected, scores, strict=True) if a != b][
                        :3
                    ]
                )
        for name in methods:
            rows[name].append(size / statistics.median(seconds[name]))
    for name, rates in rows.items():
        print(f"{name:22}" + "".join(f"{rate:10.0f}" for rate in rates))
    baseline = rows["math-verify direct"]
    for name, rates in rows.items():
        if name != "math-verify direct":
            print(
                f"{name + ' / direct':30}"
                + "".join(f"{rate / base:8.2f}x" for rate, base in zip(rates, baseline, strict=True))
            )
    for method in methods.values():
        if hasattr(method, "close"):
            method.close()


if __name__ == "__main__":
    main()
