r"""How different are the renders of a latent set? For each finished run (a workdir of
`--param=latents`), the spread of one code's renders across the decoders against the spread of
one class's codes through the same decoder.

    python tools/render_spread.py runs/study/ds4_d4 runs/study/ds4_d8

Spreads are root-mean-square deviations from the mean, in the units of `synthetic.npz` (the
renders as the network sees them) and averaged over codes (decoders) and classes. The ratio
decoders / codes is 0 when every decoder renders the same image of a code, and near 1 when the
decoders make one code's renders as different as two codes of the class are.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np


def spread(workdir: str) -> dict:
    """{decoders, codes_per_class, decoder_spread, code_spread, ratio} of a finished latent run."""
    paths = {name: os.path.join(workdir, name) for name in ("budget.json", "synthetic.npz")}
    missing = [name for name, p in paths.items() if not os.path.exists(p)]
    if missing:
        raise ValueError(f"{workdir}: not a finished run ({', '.join(missing)} missing)")
    with open(paths["budget.json"]) as f:
        budget = json.load(f)
    if "num_decoders" not in budget:
        raise ValueError(f"{workdir}: not a latent set (budget.json names no decoders)")
    d, n = int(budget["num_decoders"]), int(budget["codes_per_class"])
    with np.load(paths["synthetic.npz"]) as z:
        images, labels = z["images"].astype(np.float64), z["labels"]
    classes = len(np.unique(labels))
    if len(labels) != classes * n * d:
        raise ValueError(f"{workdir}: {len(labels)} renders, not {classes} classes x {n} codes x {d} decoders")
    # the render order (synthetic.LatentSynthetic.render): class-major, then code, decoder fastest
    x = images.reshape(classes, n, d, -1)
    rms = lambda v, axis: float(np.sqrt(((v - v.mean(axis, keepdims=True)) ** 2).mean()))   # noqa: E731
    out = {"decoders": d, "codes_per_class": n, "decoder_spread": rms(x, 2),
           "code_spread": rms(x, 1) if n > 1 else float("nan")}
    out["ratio"] = out["decoder_spread"] / out["code_spread"] if n > 1 else float("nan")
    return out


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[0], "\nusage: python tools/render_spread.py <workdir>...",
              file=sys.stderr)
        return 2
    print("| run | decoders | codes / class | across decoders | across codes | ratio |")
    print("|---|---|---|---|---|---|")
    for workdir in argv[1:]:
        try:
            s = spread(workdir)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"| {workdir.rstrip('/')} | {s['decoders']} | {s['codes_per_class']} | {s['decoder_spread']:.3f} "
              f"| {s['code_spread']:.3f} | {s['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
