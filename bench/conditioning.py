"""token_gray: DCT mode (cached-basis matrix products) against SVD mode.

float32 on (64, 196, 768): a ViT-B batch of 64 images, 196 patches of 768 values
((8, 49, 192) in the short run). Both modes with eps = 0.9. ``speedup_vs_svd`` is the SVD
time over the DCT time; ``rel_err_vs_fp64`` compares each mode with its float64 result.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from lucidops.conditioning import token_gray

from .timing import measure_ms

EPS = 0.9


def run(device: str, quick: bool = False) -> List[Dict]:
    shape = (8, 49, 192) if quick else (64, 196, 768)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device)
    case = f"token_gray {tuple(shape)} fp32 eps={EPS}"
    rows, times = [], {}
    for mode in ("svd", "dct"):
        def step(mode=mode):
            with torch.no_grad():
                return token_gray(x, EPS, mode)
        expected = token_gray(x.double(), EPS, mode)
        err = ((step().double() - expected).norm() / expected.norm()).item()
        times[mode] = measure_ms(step, device, warmup=1 if not quick else 3, repeat=5 if not quick else 10)
        rows.append(dict(family="conditioning", case=case, mode="forward", impl=f"lucidops token_gray[{mode}]",
                         ms=times[mode], rel_err_vs_fp64=err))
    for row in rows:
        row["speedup_vs_svd"] = times["svd"] / row["ms"]
    return rows


if __name__ == "__main__":  # python -m bench.conditioning [--quick]
    import sys

    for r in run("cuda" if torch.cuda.is_available() else "cpu", "--quick" in sys.argv):
        print(r)
