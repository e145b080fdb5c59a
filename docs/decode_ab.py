"""Decode speed of models taken in turn in one process: the original and export folders that differ only in their
model code (copies of one export with `modeling_mla.py` of two versions), so the comparison is not at the mercy of
one process's memory layout against another's.

    python docs/decode_ab.py ORIGINAL EXPORT_A EXPORT_B [...] --batch 1 --context 512 --steps 16 --rounds 10

Each model is loaded as users load it (`trust_remote_code` for the exports), float32, SDPA; the random prompt is
prefilled in chunks of 512; then in each round every model decodes `--steps` greedy steps from its cache, which is
cropped back after. The first round is not counted; the median ms per step is printed, and each model's speed
against the first folder's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.bench import cache_name, chunked_prefill  # noqa: E402


def prefilled(path: str, ids: torch.Tensor, trust: bool):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    return (model, *chunked_prefill(model, ids))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="the original first, then exports")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()
    ids = torch.randint(0, 49152, (a.batch, a.context), generator=torch.Generator().manual_seed(0))
    times = {f: [] for f in a.folders}
    with torch.no_grad():
        runs = {f: prefilled(f, ids, trust=i > 0) for i, f in enumerate(a.folders)}
        for r in range(a.rounds + 1):
            for f, (model, cache, token) in runs.items():
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    token = model(input_ids=token, **{cache_name(): cache}).logits[:, -1].argmax(-1, keepdim=True)
                elapsed = time.perf_counter() - t0
                cache.crop(-a.steps)
                if r:
                    times[f].append(elapsed / a.steps * 1000)
    med = {f: statistics.median(v) for f, v in times.items()}
    base = med[a.folders[0]]
    print(f"batch {a.batch} x context {a.context}, {a.rounds} rounds of {a.steps} steps, {torch.get_num_threads()} "
          f"threads: " + "; ".join(f"{f} {m:.2f} ms/step ({base / m:.3f}x)" for f, m in med.items()))


if __name__ == "__main__":
    main()
