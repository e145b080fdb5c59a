"""``mla eval``: the original and converted models side by side, in one run.

For every model (the baseline first, then each converted model, one loaded at a time):

1. lm-evaluation-harness tasks through its Python API (``HFLM``), with this folder's ``tasks/`` on the include
   path, so the offline tasks (``mla_bigbench``, ``mla_bbc_tech``) and any task lm-eval knows (hellaswag, arc_easy,
   ... where the Hub is reachable) can be named;
2. token-level perplexity on held-out text (``eval.perplexity``; the same windows for every model);
3. the KV cache per token, measured: the bytes of the cache a forward pass leaves, divided by its tokens;
4. a short decode-speed probe: greedy decoding at batch 1 after a prompt, tokens/s of the decode steps.

Writes ``report.md``, ``results.json`` and ``report.png`` into ``--out`` (atomically); see ``eval.report``.
"""


import functools
import json
import math
import platform
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from convert.config import add_config_args, config_from_args, opt
from convert.data import EVALUATION_DEFAULT, load_texts, read_budget, source_paths
from convert.device import device_name
from convert.errors import MLAError
from convert.files import atomic_dir, check_out, out_lock
from convert.nll import window_nll
from convert.sources import TRUST_HELP, input_paths, load_tokenizer, resolve_source
from eval.bench import add_models_arguments, cache_bytes, cache_name
from eval.perplexity import _vocab_size, check_eval_size, check_lengths, eval_windows, load_model
from eval.report import write_report

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = "mla_bigbench"


@dataclass
class EvalConfig:
    """Settings of ``mla eval`` (each field is a ``--flag``)."""

    tasks: str = opt(DEFAULT_TASKS, "comma-separated lm-eval tasks or tags (local ones in eval/tasks: mla_bigbench, "
                     "mla_bbc_tech, mla_offline; others need the Hub); '' skips lm-eval")
    limit: int = opt(100, "lm-eval documents per task (0 = all); the local tasks are shuffled, so this is a random "
                     "sample")
    num_fewshot: int = opt(0, "lm-eval few-shot examples")
    ppl_text: str = opt(EVALUATION_DEFAULT, "held-out text for token-level perplexity (see convert.data); '' skips it")
    ppl_tokens: int = opt(16384, "perplexity tokens (windows = tokens // seq-len)")
    ppl_seq_len: int = opt(512, "perplexity window length")
    speed_prompt: int = opt(256, "decode probe: prompt tokens (0 skips the probe)")
    speed_new: int = opt(32, "decode probe: generated tokens")
    batch_size: int = opt(8, "batch size for lm-eval and perplexity")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... ('auto': cuda when available)")
    dtype: str = opt("float32", "float32, bfloat16 or float16")
    seed: int = opt(0, "seed of lm-eval and of the perplexity windows")
    trust_remote_code: bool = opt(False, TRUST_HELP)

    def __post_init__(self):
        if self.limit < 0 or self.num_fewshot < 0 or self.batch_size < 1 or self.speed_prompt < 0:
            raise MLAError("--limit, --num-fewshot and --speed-prompt must be >= 0 and --batch-size >= 1")
        if self.speed_prompt and self.speed_new < 2:
            raise MLAError("--speed-new must be >= 2 (the probe times the decode steps after the first token)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise MLAError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.ppl_text:
            check_eval_size(self.ppl_seq_len, self.ppl_tokens)

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def torch_device(self) -> str:
        return device_name(self.device)


@functools.lru_cache(maxsize=1)
def task_manager():
    """An lm-eval TaskManager that also knows the local tasks in ``eval/tasks``: built once per process (it indexes
    every task definition lm-eval ships, seconds each time) and shared by the task check and every model's run."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(names: list[str]) -> None:
    """MLAError naming any task or tag lm-eval does not know."""
    if not names:
        return
    known = set(task_manager().all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MLAError(f"unknown lm-eval task(s): {', '.join(unknown)} (local ones: mla_bigbench, mla_bbc_tech, "
                       f"mla_offline, mla_bb_*; `lm_eval ls tasks` lists the rest)")


def run_lm_eval(model, tokenizer, cfg: EvalConfig) -> dict:
    """{task: {metric: value, metric_stderr: value}} from lm-eval's ``simple_evaluate`` on a loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=cfg.torch_device())
    out = lm_eval.simple_evaluate(model=lm, tasks=cfg.task_list, num_fewshot=cfg.num_fewshot,
                                  limit=cfg.limit or None, task_manager=task_manager(), random_seed=cfg.seed,
                                  numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                  log_samples=False, bootstrap_iters=1000)
    results = {}
    for task, metrics in sorted(out["results"].items()):
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[name] = None if isinstance(value, float) and math.isnan(value) else float(value)
        row["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = row
    return results


def kv_bytes_per_token(model, tokens: int = 32) -> int:
    """Bytes the model's cache holds per token, measured after a forward pass over ``tokens`` tokens."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = getattr(model(input_ids=ids.to(device), use_cache=True), cache_name())
    return round(cache_bytes(cache) / tokens)


def decode_probe(model, prompt: torch.LongTensor, new_tokens: int, repeats: int = 2) -> dict:
    """Greedy decoding at batch 1 after ``prompt`` (1, P): prefill seconds and decode tokens/s (best of ``repeats``)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    first = timed(1)  # prefill + one token
    full = timed(new_tokens)
    decode = max(full - first, 1e-9)
    return {"prompt_tokens": prompt.shape[1], "new_tokens": new_tokens, "prefill_s": first,
            "decode_tok_s": (new_tokens - 1) / decode}


def _ppl(nll: torch.Tensor) -> dict:
    """Perplexity and its standard error (delta method over the windows' mean NLL)."""
    mean = nll.mean().item()
    se = nll.std(unbiased=True).item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": ppl * se, "nll": mean}


def evaluate_model(name: str, path: str, cfg: EvalConfig, windows, log=print) -> dict:
    dtype = getattr(torch, cfg.dtype)
    log(f"[{name}] loading {path}")
    model, tokenizer = load_model(path, dtype, trust_remote_code=cfg.trust_remote_code)
    model.to(cfg.torch_device())
    row = {"name": name, "path": path, "model_type": model.config.model_type,
           "parameters": sum(p.numel() for p in model.parameters())}
    record = Path(path) / "mla_conversion.json"
    if record.is_file():
        row["conversion"] = {k: v for k, v in json.loads(record.read_text()).items() if k in ("kv_cache", "source")}
    row["kv_bytes_per_token"] = kv_bytes_per_token(model)
    if cfg.task_list:
        log(f"[{name}] lm-eval: {', '.join(cfg.task_list)} (limit {cfg.limit or 'none'})")
        row["tasks"] = run_lm_eval(model, tokenizer, cfg)
    if windows is not None:
        log(f"[{name}] perplexity on {windows.numel()} tokens of {cfg.ppl_text}")
        row.update(_ppl(window_nll(model, windows, cfg.batch_size, desc=f"ppl {name}")))
    if cfg.speed_prompt:
        log(f"[{name}] decode probe: {cfg.speed_new} tokens after a {cfg.speed_prompt}-token prompt, batch 1")
        prompt = windows[:1, : cfg.speed_prompt] if windows is not None and windows.shape[1] >= cfg.speed_prompt \
            else torch.randint(0, model.config.get_text_config().vocab_size, (1, cfg.speed_prompt),
                               generator=torch.Generator().manual_seed(cfg.seed))
        row["speed"] = decode_probe(model, prompt, cfg.speed_new)
    del model
    return row


def _label(path: str, taken: set) -> str:
    base = Path(path.rstrip("/")).name or path
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def evaluate(models: list[str], baseline: str | None, out: str | Path, cfg: EvalConfig, overwrite: bool = False,
             command: str | None = None, log=print) -> dict:
    """Evaluate ``baseline`` (if any) and ``models``; write report.md, results.json and report.png into ``out``."""
    readers = input_paths(baseline, *models) + source_paths(cfg.ppl_text)
    out = check_out(out, overwrite, readers)
    with out_lock(out):
        return _evaluate(models, baseline, out, cfg, overwrite, command, log)


def _evaluate(models: list[str], baseline: str | None, out: Path, cfg: EvalConfig, overwrite: bool,
              command: str | None, log) -> dict:
    check_tasks(cfg.task_list)
    entries = ([("original", baseline)] if baseline else [])
    taken = {"original"}
    entries += [(_label(m, taken), m) for m in models]
    vocab = {path: _vocab_size(path, cfg.trust_remote_code) for _, path in entries}  # fails early on a missing or unreadable model
    lengths = {"--ppl-seq-len": cfg.ppl_seq_len if cfg.ppl_text else 0,
               "--speed-prompt + --speed-new": cfg.speed_prompt + cfg.speed_new if cfg.speed_prompt else 0}
    check_lengths([path for _, path in entries], lengths, cfg.trust_remote_code)
    if cfg.ppl_text and len(set(vocab.values())) > 1:
        raise MLAError(f"the models have different vocabulary sizes ({vocab}): perplexities are not comparable")
    windows = None
    if cfg.ppl_text:
        tokenizer = load_tokenizer(resolve_source(entries[0][1]), trust_remote_code=cfg.trust_remote_code)
        texts = load_texts(cfg.ppl_text, read_budget(cfg.ppl_tokens))  # a long file: only what the windows use
        windows = eval_windows(tokenizer, texts, cfg.ppl_seq_len, cfg.ppl_tokens, cfg.seed)
    torch.manual_seed(cfg.seed)
    start = time.time()
    rows = []
    for i, (name, path) in enumerate(entries, 1):
        log(f"model {i}/{len(entries)}: {name}")
        rows.append(evaluate_model(name, path, cfg, windows, log))
    results = {
        "command": command,
        "settings": asdict(cfg),
        "baseline": "original" if baseline else None,
        "models": rows,
        "environment": _environment(cfg),
        "seconds": round(time.time() - start, 1),
    }
    with atomic_dir(out, overwrite) as tmp:
        write_report(results, tmp)
    return results


def _environment(cfg: EvalConfig) -> dict:
    import transformers

    try:
        import lm_eval

        lm_eval_version = getattr(lm_eval, "__version__", None)
    except ImportError:
        lm_eval_version = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "lm_eval": lm_eval_version, "device": cfg.torch_device(), "threads": torch.get_num_threads(),
           "platform": platform.platform()}
    if env["device"].startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(env["device"]))
    return env


def eval_arguments(p) -> None:
    p.description = ("Evaluate MODEL(s) (and --baseline, the original) one after another in one run: lm-eval tasks "
                     "(local offline ones from eval/tasks or any lm-eval task), held-out perplexity, the KV cache per "
                     "token (measured) and a short decode-speed probe. Writes report.md, results.json and report.png "
                     "into --out.")
    add_models_arguments(p)
    p.add_argument("--out", required=True, help="report folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_config_args(p, EvalConfig)


def eval_command(args) -> int:
    cfg = config_from_args(args, EvalConfig, {})
    if not args.models:
        raise MLAError("give at least one MODEL to evaluate")
    command = "mla eval " + " ".join(shlex.quote(a) for a in (args.argv or []))
    results = evaluate(args.models, args.baseline, args.out, cfg, overwrite=args.overwrite, command=command)
    print(eval_summary(results, args.out))
    return 0


def eval_summary(results: dict, out) -> str:
    """One line: where the report is, and each converted model's perplexity ratio and KV share."""
    rows = results["models"]
    base = rows[0] if results["baseline"] else None
    parts = []
    for r in rows[1:] if base else rows:
        bits = [r["name"]]
        if base and r.get("ppl") and base.get("ppl"):
            bits.append(f"ppl {r['ppl'] / base['ppl']:.3f}x")
        if base:
            bits.append(f"KV {r['kv_bytes_per_token'] / base['kv_bytes_per_token']:.1%}")
        parts.append(" ".join(bits))
    return f"evaluated {len(rows)} model(s) in {results['seconds']:.0f} s: {'; '.join(parts)} -> {out}/report.md"
