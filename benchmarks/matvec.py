"""Where a batch-1 decode step's weight reads go: every linear layer of a model, one row each.

    python benchmarks/matvec.py --model smollm2-135m --threads 2

Runs every linear layer's weight of the model once, in model order (each read from memory, not
from a cache, as in a decode step), with a one-row input, four ways: eager `F.linear` (the CPU
BLAS's matrix-vector product on the weight as stored, [out, in]), eager with the weight stored
transposed, and compiled as inductor lowers it by default and as a multiply-and-sum reduction
(what paretoray's compiled decode step does on a CPU, `static_decode._matvec_mm`). Prints the
median of 7 passes and the bytes per second, against a plain sum over as many bytes. The last
stdout line is one JSON record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from paretoray.actors.models import load_model
from paretoray.actors.static_decode import _backend


def passes(fn, repeat: int = 7) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device="cpu")[0]
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def linear(ws):
        return [F.linear(inputs[w.shape[1]], w) for w in ws]

    def reduction(ws):
        return [(w * inputs[w.shape[1]]).sum(-1) for w in ws]

    transposed = [w.t().contiguous().t() for w in weights]  # same values, stored [in, out]
    device = torch.device("cpu")
    compiled_linear = torch.compile(linear)
    compiled_reduction = torch.compile(reduction, backend=_backend(device))
    results = {
        "eager F.linear": passes(lambda: linear(weights)),
        "eager F.linear, weights stored transposed": passes(lambda: linear(transposed)),
        "compiled (inductor's default: the BLAS)": passes(lambda: compiled_linear(weights)),
        "compiled multiply-and-sum (paretoray)": passes(lambda: compiled_reduction(weights)),
    }
    flat = torch.ones(nbytes // 4)
    results["sum over as many bytes"] = min(passes(lambda: flat.sum()) for _ in range(3))
    for name, seconds in results.items():
        print(f"{name:<45} {1000 * seconds:7.1f} ms  {nbytes / seconds / 1e9:5.1f} GB/s")
    print(json.dumps({"benchmark": "matvec", "model": args.model, "threads": torch.get_num_threads(), "weight_mib": nbytes / 2**20,
                      "ms": {name: 1000 * seconds for name, seconds in results.items()}}))


if __name__ == "__main__":
    main()
