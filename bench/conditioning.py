"""token_gray: DCT mode (cached-basis matrix products) against SVD mode.

float32 on (64, 196, 768): a ViT-B batch of 64 images, 196 patches of 768 values
((8, 49, 192) in the short run). Both modes with eps = 0.9. ``speedup_vs_svd`` is the SVD
time over the DCT time; ``rel_err_vs_fp64`` compares each mode with its float64 result.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from lucidops.conditioning import token_gray

from .timing import measure_interleaved_ms, report_failure

EPS = 0.9


def run(device: str, quick: bool = False) -> List[Dict]:
    shape = (8, 49, 192) if quick else (64, 196, 768)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device)
    case = f"token_gray {tuple(shape)} fp32 eps={EPS}"
    steps: Dict[str, Callable[[], object]] = {}
    errors: Dict[str, float] = {}
    for mode in ("svd", "dct"):
        def step(mode=mode):
            with torch.no_grad():
                return token_gray(x, EPS, mode)
        try:  # a failing mode is reported and left out, the other still runs
            expected = token_gray(x.double(), EPS, mode)
            errors[mode] = ((step().double() - expected).norm() / expected.norm()).item()
        except Exception as exc:
            report_failure(f"conditioning {mode}", exc)
            continue
        steps[mode] = step
    # Interleaved, so that the ratio holds on a busy host; 5 rounds at the full size, where
    # one SVD step takes about a second.
    times = measure_interleaved_ms(steps, device, warmup=3 if quick else 1, rounds=10 if quick else 5,
                                   label="conditioning ")
    rows = []
    for mode, ms in times.items():
        row = dict(family="conditioning", case=case, mode="forward", impl=f"lucidops token_gray[{mode}]", ms=ms,
                   rel_err_vs_fp64=errors[mode])
        if "svd" in times:
            row["speedup_vs_svd"] = times["svd"] / ms
        rows.append(row)
    return rows


if __name__ == "__main__":  # python -m bench.conditioning [--quick]
    import sys

    for r in run("cuda" if torch.cuda.is_available() else "cpu", "--quick" in sys.argv):
        print(r)
