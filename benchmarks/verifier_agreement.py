"""How often math_accuracy agrees with raw math-verify on math-verify's own tested examples.

Reads the ``(gold, pred, expected)`` cases of math-verify's test suite from a checkout of its
repository (the tests are not shipped with the package), keeps the cases that raw
``verify(parse(gold), parse(pred))`` gets right, and scores each prediction *as written* with rlvr's
``math_accuracy`` (gold passed as ``answer``). Prints the agreement rate and every disagreement.

    git clone https://github.com/huggingface/Math-Verify
    python benchmarks/verifier_agreement.py --suite Math-Verify/tests
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from math_verify import parse, verify

from rlvr.rewards.math import MathAccuracy


def collect_cases(suite: Path) -> list[tuple[str, str, str, int]]:
    """(test name, gold, pred, expected) for every parametrized case with ``gold`` and ``pred`` arguments."""
    sys.path.insert(0, str(suite.parent))  # the suite imports itself as ``tests.*``
    cases = []
    for path in sorted(suite.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(f"tests.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, function in sorted(vars(module).items()):
            for mark in getattr(function, "pytestmark", []):
                if mark.name != "parametrize":
                    continue
                argnames = mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0]
                argnames = [a.strip() for a in argnames]
                if not {"gold", "pred", "expected"} <= set(argnames):
                    continue
                for values in mark.args[1]:
                    row = dict(zip(argnames, getattr(values, "values", values), strict=True))
                    cases.append((f"{path.stem}::{name}", row["gold"], row["pred"], int(row["expected"])))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, required=True, help="math-verify's tests/ directory")
    parser.add_argument("--workers", type=int, default=0, help="math_accuracy worker processes (0: in-process)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every timeout-less call
    cases = collect_cases(args.suite)
    reward = MathAccuracy(workers=args.workers)
    kept, agree, disagreements = 0, 0, []
    for test, gold, pred, expected in cases:
        raw = int(bool(verify(parse(gold), parse(pred))))
        if raw != expected:
            continue  # raw math-verify gets this case wrong: not a reference
        kept += 1
        ours = int(reward([pred], answer=[gold])[0])
        if ours == raw:
            agree += 1
        else:
            disagreements.append((test, gold, pred, raw, ours))
    reward.close()
    print(f"cases in the suite: {len(cases)}; raw math-verify right on: {kept}")
    print(f"math_accuracy agrees with raw math-verify on {agree}/{kept} = {agree / max(kept, 1):.1%}")
    for test, gold, pred, raw, ours in disagreements:
        print(f"  {test}: gold={gold[:60]!r} pred={pred[:60]!r} raw={raw} rlvr={ours}")


if __name__ == "__main__":
    main()
