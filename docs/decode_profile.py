"""Where a decode step's time goes, per part, for an export and its original (CPU, torch profiler).

    python docs/decode_profile.py EXPORT ORIGINAL --batch 1 --context 512 [--steps 16] [--threads 2]

Both models are loaded the way users load them (the original through transformers, the export with
``trust_remote_code``), SDPA attention, float32. A random prompt of ``batch x context`` tokens is prefilled in
chunks of 512 tokens, a few untimed decode steps warm up, then ``--steps`` greedy steps run once unprofiled (the
step time) and once under ``torch.profiler``. Every part is a labelled region (``record_function``), entered from
module hooks or wrappers, never by editing either model's code:

- projections: the ``nn.Linear`` modules of the attention block (q/k/v/o; ``q_proj``, ``kv_a_proj_with_mqa``,
  ``o_proj`` of the export, or its fused down-projection);
- rope: the rotary function the attention block calls (``apply_rotary_pos_emb`` / ``apply_rope``);
- cache update: the cache layer's ``update``;
- attention: the attention function (transformers' SDPA interface; the export's absorbed attention, which holds the
  ``W_UK`` / ``W_UV`` batched matmuls);
- attention glue: what the attention block does outside those (views, splits, concatenations, Python);
- mlp, norms, embedding, lm_head: their modules; layer glue: the residual adds; model glue: the rest of the forward
  (rotary tables, masks, the cache's bookkeeping).

Times are exclusive (a region's own time without the labelled regions inside it), in ms per decode step, measured
under the profiler (which adds a few microseconds per op: the ``step (unprofiled)`` row is the honest total).
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.bench import cache_name, chunked_prefill  # noqa: E402
from eval.perplexity import load_model  # noqa: E402

ROPE_FUNCTIONS = ("apply_rotary_pos_emb", "apply_rope")
PARTS = ("projections", "rope", "cache update", "attention", "attention glue", "mlp", "norms", "embedding", "lm_head",
         "layer glue", "model glue")


class Region:
    """A module's forward as a labelled region (a pre-hook enters it, a hook leaves it)."""

    def __init__(self, label):
        self.label, self.open = label, []

    def enter(self, *_):
        self.open.append(record_function(self.label))
        self.open[-1].__enter__()

    def leave(self, *_):
        self.open.pop().__exit__(None, None, None)


def labelled(fn, label):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument(model) -> list:
    """Label the parts of ``model`` with hooks and wrappers (never undone: the model is dropped after the run)."""
    keep = []

    def hook(module, label):
        region = Region(label)
        module.register_forward_pre_hook(region.enter)
        module.register_forward_hook(region.leave)
        keep.append(region)

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "attn"):
            hook(module, "attention glue")
            for child in module.modules():
                if isinstance(child, nn.Linear):
                    hook(child, "projections")
            if hasattr(module, "_absorbed"):
                module._absorbed = labelled(module._absorbed, "attention")
                module._decompressed = labelled(module._decompressed, "attention")
            code = sys.modules[type(module).__module__]
            for fn in ROPE_FUNCTIONS:
                if hasattr(code, fn) and not hasattr(getattr(code, fn), "_labelled"):
                    wrapped = labelled(getattr(code, fn), "rope")
                    wrapped._labelled = True
                    setattr(code, fn, wrapped)
            interface = getattr(code, "ALL_ATTENTION_FUNCTIONS", None)
            if interface is not None and not hasattr(interface["sdpa"], "_labelled"):
                wrapped = labelled(interface["sdpa"], "attention")
                wrapped._labelled = True
                interface["sdpa"] = wrapped
        elif leaf == "mlp":
            hook(module, "mlp")
        elif "norm" in leaf and not any(isinstance(c, nn.Linear) for c in module.modules()):
            hook(module, "norms")
        elif leaf == "embed_tokens":
            hook(module, "embedding")
        elif leaf == "lm_head":
            hook(module, "lm_head")
        elif leaf.isdigit() and name.endswith(f"layers.{leaf}"):
            hook(module, "layer glue")
    hook(model, "model glue")
    return keep


def label_cache(cache) -> None:
    for layer in cache.layers:
        layer.update = labelled(layer.update, "cache update")


def exclusive_ms(prof, steps: int) -> dict:
    """{label: ms per step} of each labelled region's own time (its span minus the labelled spans inside it)."""
    totals = defaultdict(float)

    def inner_labelled(event):
        for child in event.cpu_children:
            if child.name in PARTS:
                yield child
            else:
                yield from inner_labelled(child)

    for e in prof.events():
        if e.name in PARTS:
            own = e.cpu_time_total - sum(c.cpu_time_total for c in inner_labelled(e))
            totals[e.name] += own / 1000 / steps
    return totals


def compute_ops(prof, steps: int) -> float:
    from eval.kernels import _compute_ops

    return sum(_compute_ops(e) for e in prof.events() if e.cpu_parent is None) / steps


def run(path, batch, context, steps, trust) -> dict:
    model, _ = load_model(path, torch.float32, trust_remote_code=trust)
    model.config._attn_implementation = "sdpa"
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.get_text_config().vocab_size, (batch, context), generator=gen)
    name = cache_name()
    with torch.no_grad():
        cache, token = chunked_prefill(model, prompt)

        def decode(n):
            nonlocal token
            for _ in range(n):
                token = model(input_ids=token, **{name: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

        decode(3)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode(steps)
            times.append((time.perf_counter() - t0) / steps * 1000)
        keep = instrument(model)
        label_cache(cache)
        decode(2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(steps)
    del keep
    parts = exclusive_ms(prof, steps)
    layers = model.config.get_text_config().num_hidden_layers
    return {"step": statistics.median(times), "parts": parts, "ops_per_layer": compute_ops(prof, steps) / layers}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("original")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    orig = run(a.original, a.batch, a.context, a.steps, trust=False)
    mla = run(a.export, a.batch, a.context, a.steps, trust=True)
    print(f"batch {a.batch} after {a.context} tokens, {a.steps} steps, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; ms per decode step")
    print("| part | original | export | export - original |")
    print("|---|---|---|---|")
    for part in PARTS:
        o, m = orig["parts"].get(part, 0.0), mla["parts"].get(part, 0.0)
        print(f"| {part} | {o:.2f} | {m:.2f} | {m - o:+.2f} |")
    so, sm = sum(orig["parts"].values()), sum(mla["parts"].values())
    print(f"| sum (profiled) | {so:.2f} | {sm:.2f} | {sm - so:+.2f} |")
    print(f"| step (unprofiled, median of 3) | {orig['step']:.2f} | {mla['step']:.2f} | "
          f"{orig['step'] / mla['step']:.3f}x speed |")
    print(f"| compute ops per layer | {orig['ops_per_layer']:.1f} | {mla['ops_per_layer']:.1f} | |")


if __name__ == "__main__":
    main()
