"""The worst difference from torch seen per op over tests/test_verify_ops.py's cases:
`python -m tests.verify_ops_report` prints it (float64, and float32 for the float32 subset)."""

import numpy as np

from tests.test_verify_ops import CASES, run_case


def worst_differences(dtype=np.float64):
    """{op: (worst relative, worst absolute) difference} over all its cases, outputs and gradients.

    Relative difference of arrays a, b: max |a - b| / max(|b|, 1e-2), i.e. relative where
    |b| >= 1e-2 and absolute-scaled below that (where atol 1e-12 takes over from rtol 1e-10).
    """
    worst = {}
    for op, cs in sorted(CASES.items()):
        rel = ab = 0.0
        for c in cs:
            if dtype != np.float64 and not c.f32:
                continue
            for _, a, b in run_case(c, dtype):
                with np.errstate(invalid="ignore"):      # inf - inf where both are -inf
                    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                d = np.where(np.isinf(a) & (a == b), 0.0, d)
                if d.size:
                    rel = max(rel, float(np.max(d / np.maximum(np.abs(b), 1e-2))))
                    ab = max(ab, float(np.max(d)))
        if dtype == np.float64 or any(c.f32 for c in cs):
            worst[op] = (rel, ab)
    return worst


if __name__ == "__main__":
    w64, w32 = worst_differences(np.float64), worst_differences(np.float32)
    print(f"{'op':<14} {'f64 rel':>9} {'f64 abs':>9} {'f32 rel':>9} ({sum(len(c) for c in CASES.values())} cases)")
    for op, (rel, ab) in w64.items():
        r32 = f"{w32[op][0]:9.1e}" if op in w32 else "        -"
        print(f"{op:<14} {rel:9.1e} {ab:9.1e} {r32}")
