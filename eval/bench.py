"""``mla bench``: prefill and decode speed, KV cache size, peak memory and kernels per step, converted models beside
the original.

    mla bench OUT --baseline smollm2-135m --batch 8 --context 4096 --new-tokens 32
    mla bench OUT --baseline SRC --batch 1,16,64 --context 8192 --compile
    mla bench OUT --baseline SRC --context 8192 --capacity

Every (batch, context) pair is measured for each model in its own child process, so that its peak memory is its own.
After a short warm-up forward, a random prompt of ``batch × context`` tokens is prefilled in one forward and timed:
once, or the median of ``runs`` when it has at most 4096 tokens. Then ``new_tokens`` greedy decode steps are timed
``runs`` times from the same prefilled cache, cropped back after each run; the median run is reported. The peak memory
of the prefill and of the decode runs are reported apart. One more decode step is profiled: its kernels (CUDA) or
compute ops (CPU, see ``eval/kernels.py``). ``--compile`` decodes with a ``StaticCache`` through ``torch.compile``
(CUDA graphs on cuda) after untimed warm-up steps. ``--capacity`` searches the largest batch whose decode fits at
each context (1, 2, 4, ... then bisection; on CUDA in one child per model, on a CPU in one child per probe): each
probe fills a cache of random keys and values (no prefill activations) and runs the decode. A probe that runs out of
memory (CUDA's allocator or the CPU's) does not fit. No child process may grow past 90% of the memory available
(MemAvailable) when it starts: it is stopped there, a probe then does not fit and any other run is an error; on a
CPU, ``--memory-limit-mib`` bounds probes lower still. ``--json`` is rewritten after every run and every probe. A
benchmark, not a test: the numbers depend on the machine, so compare models only within one run.
"""

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from convert.config import add_config_args, config_from_args, opt
from convert.device import auto_dtype, device_name, peak_rss_bytes
from convert.errors import MLAError, quote, run_command
from convert.files import check_out_file, write_text
from convert.recover.memory import available_bytes
from convert.sources import TRUST_HELP, input_paths
from eval.kernels import count_kernels
from eval.perplexity import load_model

RATIO_KEYS = ("decode_tok_s", "prefill_tok_s", "kv_cache_mib", "prefill_peak_mib", "peak_memory_mib",
              "kernels_per_step", "kernels_per_layer")
CAPACITY_KEYS = ("max_batch", "decode_tok_s", "kv_cache_mib", "peak_memory_mib")
OOM_MARKERS = ("out of memory", "ALLOC_FAILED", "can't allocate memory")  # CUDA, cuBLAS, the CPU allocator
AVAILABLE_SHARE = 0.9  # a child process may grow to this share of the memory available (MemAvailable) at its start
MAX_INT = 2**31 - 1  # the largest batch, context, step or run count taken


def int_list(value, flag: str) -> list[int]:
    """``"1,16,64"`` (or an int) as ``[1, 16, 64]``; MLAError unless every item is an integer from 1 to MAX_INT,
    each given once."""
    try:
        items = [int(v) for v in str(value).split(",")]
    except ValueError:
        items = []
    if not items or min(items) < 1 or max(items) > MAX_INT:
        raise MLAError(f"{flag} takes integers from 1 to {MAX_INT}, comma-separated, got {quote(value)}")
    twice = next((v for i, v in enumerate(items) if v in items[:i]), None)
    if twice is not None:
        raise MLAError(f"{flag} lists {twice} twice: give each value once")
    return items


@dataclass
class BenchConfig:
    """Settings of ``mla bench`` (each field is a ``--flag``)."""

    batch: str = opt("1", "sequences decoded together; a comma list (1,16,64) measures each, with each --context "
                     "(each value once: a repeat is refused)")
    context: str = opt("512", "prompt tokens per sequence, prefilled in one forward before decoding; a comma list "
                       "measures each (each value once: a repeat is refused)")
    new_tokens: int = opt(32, "timed decode steps per run")
    runs: int = opt(3, "decode runs; the median is reported")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... ('auto': cuda when available)")
    dtype: str = opt("auto", "float32, bfloat16 or float16 ('auto': bfloat16 on cuda, float32 on cpu)")
    threads: int = opt(0, "CPU threads (0: torch's default)")
    attn: str = opt("sdpa", "attention implementation of both models: sdpa or eager")
    seed: int = opt(0, "seed of the random prompt")
    compile: bool = opt(False, "decode both models with a StaticCache through torch.compile (mode reduce-overhead, "
                        "i.e. CUDA graphs, on cuda); the prefill stays eager, warm-up steps are not timed")
    capacity: bool = opt(False, "instead of the --batch list: the largest batch whose decode fits at each --context, "
                         "per model: 1, 2, 4, ... then bisection, each probe a cache of batch x context random tokens "
                         "(no prefill: a server prefills in chunks) and the decode runs; on cuda in one process per "
                         "model, where a probe that runs out of memory does not fit; on a cpu one process per probe, "
                         "stopped (does not fit) when it passes 90%% of the memory available at its start")
    memory_limit_mib: float | None = opt(None, "with --capacity: a probe whose peak memory (cuda max allocated, "
                                         "process max RSS on a cpu) exceeds this does not fit either (a finite "
                                         "number of MiB; on a cpu the memory available bounds probes anyway)")
    max_batch: int = opt(1024, "with --capacity: the largest batch tried")
    absorbed: str = opt("", "MLA exports: how the absorbed decode attends over the latent, bmm or sdpa (default: "
                        "the export's config.absorbed_attention, auto: sdpa on a cpu, bmm on a gpu)")
    trust_remote_code: bool = opt(False, TRUST_HELP)

    def __post_init__(self):
        self.batch = ",".join(map(str, int_list(self.batch, "--batch")))
        self.context = ",".join(map(str, int_list(self.context, "--context")))
        if min(self.new_tokens, self.runs, self.max_batch) < 1 or self.threads < 0:
            raise MLAError("--new-tokens, --runs and --max-batch must be >= 1 (and --threads >= 0)")
        for flag, value in (("--new-tokens", self.new_tokens), ("--runs", self.runs), ("--max-batch", self.max_batch),
                            ("--threads", self.threads), ("--seed", self.seed)):
            if not 0 <= value <= MAX_INT:
                raise MLAError(f"{flag} must be {'at most ' + str(MAX_INT) if value > 0 else '>= 0'}, got {value}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise MLAError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.absorbed not in ("", "bmm", "sdpa"):
            raise MLAError(f"--absorbed must be bmm or sdpa, got {self.absorbed!r}")
        if self.attn not in ("sdpa", "eager"):
            raise MLAError(f"--attn must be sdpa or eager, got {self.attn!r}")
        if self.capacity and self.compile:
            raise MLAError("--capacity measures the eager decode: give --compile without --capacity")
        limit = self.memory_limit_mib
        if limit is not None and not (self.capacity and 0 < limit < math.inf):
            raise MLAError(f"--memory-limit-mib must be a finite number > 0 and goes with --capacity, got {limit}"
                           f"{'' if self.capacity else ' without --capacity'}")

    @property
    def batches(self) -> list[int]:
        return int_list(self.batch, "--batch")

    @property
    def contexts(self) -> list[int]:
        return int_list(self.context, "--context")


def cache_name() -> str:
    """The name of a model's cache argument and output field: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (5.23)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (its layers' keys and values)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def rewind(cache, tokens: int) -> None:
    """Drop the last ``tokens`` tokens of ``cache``. The static layers of transformers 5.23 have no ``crop``: their
    write position (a tensor at a fixed address, for CUDA graphs) goes back in place."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-tokens)
        else:
            layer.cumulative_length.sub_(tokens)


def _reset_peak(cuda: bool) -> bool:
    """Start a new peak-memory window; False where the process's peak RSS cannot be reset (no /proc)."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # glibc: hand freed heap memory back first, so the new window starts from the memory in use
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # "5" resets the peak RSS (VmHWM; getrusage's ru_maxrss keeps the peak a child inherits, see _peak_mib)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib(cuda: bool) -> float:
    """The peak since _reset_peak: CUDA's allocation, or this process's own resident peak (VmHWM; ``ru_maxrss``
    would start from the peak of the process that started this one)."""
    import torch

    return (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) / 2**20


def _device(cfg: BenchConfig) -> str:
    """``--device``, with ``auto`` resolved: cuda when available, else cpu."""
    return device_name(cfg.device)


def _load(path: str, cfg: BenchConfig):
    """(model on its device, device, dtype name) with ``cfg.attn`` attention."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    dtype = auto_dtype(cfg.dtype, device)
    model, _ = load_model(path, getattr(torch, dtype), trust_remote_code=cfg.trust_remote_code)
    model.config._attn_implementation = cfg.attn
    if cfg.absorbed and hasattr(model.config, "absorbed_attention"):  # our exports only
        model.config.absorbed_attention = cfg.absorbed
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = cfg.attn
    return model.to(device), device, dtype


def chunked_prefill(model, ids, chunk: int = 512):
    """(cache, greedy next tokens (B, 1)) after feeding ``ids`` (B, T) ``chunk`` tokens at a time, as servers prefill
    long prompts."""
    name = cache_name()
    cache = out = None
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start:start + chunk], **{name: cache}, use_cache=True, logits_to_keep=1)
        cache = getattr(out, name)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _prefill(model, prompt, static, runs: int, sync):
    """(median seconds, cache, first decoded tokens) of prefilling ``prompt`` ``runs`` times into a fresh cache (or
    into ``static``, reset before each run)."""
    name = cache_name()
    times, out = [], None
    for _ in range(runs):
        out = None  # free the previous cache first
        if static is not None:
            static.reset()
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, **{name: static}, use_cache=True, logits_to_keep=1)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)


def _step_fn(model, cache, context: int, cfg: BenchConfig, cuda: bool):
    """``step(token, i)``: decode step ``i`` after the prompt (eager on the cache, or compiled with explicit
    positions on a static cache)."""
    import torch

    name = cache_name()
    if not cfg.compile:
        return lambda token, i: model(input_ids=token, **{name: cache}, use_cache=True)
    if not cuda:
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True  # its kernels show in the profile (count_kernels)
    forward = torch.compile(model.forward, mode="reduce-overhead" if cuda else None, fullgraph=False, dynamic=False)
    positions = torch.arange(context, context + cfg.new_tokens, device=model.device).view(-1, 1, 1)
    return lambda token, i: forward(input_ids=token, position_ids=positions[i], **{name: cache}, use_cache=True)


def _decode_runs(step, first, cache, cfg: BenchConfig, sync) -> tuple[list[float], int]:
    """(seconds of each run of ``new_tokens`` greedy steps from the prompt, cache bytes at the end of a run)."""
    times = []
    for _ in range(cfg.runs):
        token = first
        sync()
        t0 = time.perf_counter()
        for i in range(cfg.new_tokens):
            token = step(token, i).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        times.append(time.perf_counter() - t0)
        cached = cache_bytes(cache)
        rewind(cache, cfg.new_tokens)  # back to the prompt
    return times, cached


def _count_step(model, step, first, new_tokens: int, cache) -> int:
    """Kernels of a decode step in the steady state: the second step after the prompt (the first one after a crop
    may rebuild a cache buffer), or the first when there is room for one only."""
    token, done = first, min(1, new_tokens - 1)
    for i in range(done):
        token = step(token, i).logits[:, -1].argmax(-1, keepdim=True)
    count = count_kernels(model, lambda: step(token, done))
    rewind(cache, done + 1)
    return count


def measure(path: str, cfg: BenchConfig, batch: int, context: int, kernels: bool = True) -> dict:
    """Prefill + decode timings, memory and (``kernels``) kernels per step of one model (in this process)."""
    import torch

    model, device, dtype = _load(path, cfg)
    cuda = device.startswith("cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.get_text_config().vocab_size, (batch, context), generator=gen).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    static = None
    if cfg.compile:
        from transformers.cache_utils import StaticCache

        static = StaticCache(config=model.config, max_cache_len=context + cfg.new_tokens)
    with torch.no_grad():  # warm-up: first-call costs (kernels, allocator, the static cache) are not timed
        model(input_ids=prompt[:, : min(16, context)], **{cache_name(): static}, use_cache=True, logits_to_keep=1)
        resets = _reset_peak(cuda)
        prefill_s, cache, first = _prefill(model, prompt, static, cfg.runs if batch * context <= 4096 else 1, sync)
        prefill_peak = _peak_mib(cuda)
        step = _step_fn(model, cache, context, cfg, cuda)
        compile_s = None
        if cfg.compile:  # one run apart: compiling, CUDA-graph recording and first replays of every step
            compile_s = sum(_decode_runs(step, first, cache, replace(cfg, runs=1), sync)[0])
        resets = _reset_peak(cuda) and resets
        times, cached = _decode_runs(step, first, cache, cfg, sync)
        peak = _peak_mib(cuda)
        per_step = _count_step(model, step, first, cfg.new_tokens, cache) if kernels else None
    layers = model.config.get_text_config().num_hidden_layers
    decode_s = statistics.median(times)
    return {
        "path": path, "model_type": model.config.model_type, "device": device, "dtype": dtype,
        "threads": torch.get_num_threads(), "batch": batch, "context": context,
        "cache": "static" if cfg.compile else "dynamic", "compiled": cfg.compile, "compile_s": compile_s,
        "prefill_s": prefill_s,
        "prefill_tok_s": batch * context / prefill_s,
        "decode_s": decode_s, "decode_runs_s": times, "decode_tok_s": batch * cfg.new_tokens / decode_s,
        "kv_cache_mib": cached / 2**20, "kv_bytes_per_token": cached / (batch * (context + cfg.new_tokens)),
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "prefill_peak_mib": prefill_peak, "peak_memory_mib": peak,
        "peak_memory_kind": ("cuda max allocated" if cuda else "process max RSS") + ("" if resets else " since start"),
        "num_layers": layers, "kernels_per_step": per_step,
        "kernels_per_layer": per_step / layers if per_step is not None else None,
        "kernel_kind": "cuda kernels" if cuda else "cpu compute ops",
    }


def _filled_cache(model, batch: int, context: int, gen):
    """(cache holding ``context`` random tokens per sequence, next tokens): the model's own forward over one token
    makes each layer (its kind and widths), then every layer is appended ``context - 1`` random keys and values
    directly, so no prefill compute or activations count (a server prefills in chunks, a few sequences at a time)."""
    import torch

    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, 1), generator=gen).to(model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, cache_name())
    for layer in cache.layers:
        k, v = layer.keys, layer.values  # (B, heads, 1, width)
        layer.update(torch.randn(*k.shape[:2], context - 1, k.shape[-1], dtype=k.dtype, device=k.device),
                     torch.randn(*v.shape[:2], context - 1, v.shape[-1], dtype=v.dtype, device=v.device))
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _fill_probe(model, cfg: BenchConfig, batch: int, context: int) -> dict:
    """Decode ``new_tokens`` greedy steps (``runs`` times) on a filled cache of ``batch`` x ``context`` tokens:
    decode tok/s, cache MiB and the peak memory; ``{"oom": True}`` when it runs out of memory."""
    import gc

    import torch

    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        with torch.no_grad():
            resets = _reset_peak(cuda)
            cache, first = _filled_cache(model, batch, context, torch.Generator().manual_seed(cfg.seed))
            step = _step_fn(model, cache, context, cfg, cuda)
            times, cached = _decode_runs(step, first, cache, cfg, sync)
            peak = _peak_mib(cuda)
    except (torch.OutOfMemoryError, MemoryError) as e:
        return {"batch": batch, "context": context, "oom": True, "error": _first_line(e)}
    except RuntimeError as e:  # raised through torch.compile, by cuBLAS failing to allocate its workspace, or by
        if not any(m in str(e) for m in OOM_MARKERS):  # the CPU allocator (DefaultCPUAllocator)
            raise
        return {"batch": batch, "context": context, "oom": True, "error": _first_line(e)}
    decode_s = statistics.median(times)
    return {"batch": batch, "context": context, "decode_s": decode_s, "decode_runs_s": times,
            "decode_tok_s": batch * cfg.new_tokens / decode_s, "kv_cache_mib": cached / 2**20,
            "kv_bytes_per_token": cached / (batch * (context + cfg.new_tokens)), "prefill_peak_mib": None,
            "peak_memory_mib": peak,
            "peak_memory_kind": ("cuda max allocated" if cuda else "process max RSS") + ("" if resets else
                                                                                       " since start")}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or ["out of memory"])[0][:200]


def search(probe, cfg: BenchConfig, progress=None) -> dict:
    """The largest batch for which ``probe(batch)`` (a row) fits: its row, ``max_batch`` and every probe (each
    also handed to ``progress`` as it is made)."""
    rows, probes = {}, []

    def fits(batch: int) -> bool:
        row = rows[batch] = probe(batch)
        ok, why = _fits(row, cfg.memory_limit_mib)
        probes.append({"batch": batch, "fits": ok, "why": why, "peak_memory_mib": row.get("peak_memory_mib")})
        print(f"batch {batch}: {'fits' if ok else 'does not fit'} ({why})", file=sys.stderr, flush=True)
        if progress is not None:
            progress(probes[-1])
        return ok

    best = largest_batch(fits, cfg.max_batch)
    return {**rows.get(best, {}), "max_batch": best, "probes": probes}


def capacity(path: str, cfg: BenchConfig, context: int, progress=None) -> dict:
    """``search`` in this process, the model loaded once: each probe a filled cache and its decode runs."""
    model, device, dtype = _load(path, cfg)
    row = search(lambda batch: _fill_probe(model, cfg, batch, context), cfg, progress)
    return {"path": path, "model_type": model.config.model_type, "device": device, "dtype": dtype,
            "cache": "static" if cfg.compile else "dynamic", "compiled": cfg.compile,
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, **row}


def _mem_available_mib() -> float | None:
    """The host memory the kernel can give without swapping (``available_bytes``), in MiB; None where unknown."""
    got = available_bytes(torch.device("cpu"))
    return None if got is None else got / 2**20


def _host_bound() -> float | None:
    """The resident memory (MiB) a child process may reach: AVAILABLE_SHARE of what is available now."""
    available = _mem_available_mib()
    return None if available is None else AVAILABLE_SHARE * available


BOUND_KIND = f"{AVAILABLE_SHARE:.0%} of the memory available"


@dataclass
class Finished:
    """A child process's exit status and output; ``over``: the resident MiB at which it was stopped for passing its
    bound (None: it was not)."""

    returncode: int
    stdout: str
    stderr: str
    over: float | None = None


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run(cmd: list[str], env, rss_limit_mib: float | None = None, on_line=None) -> Finished:
    """Run ``cmd``, reading its resident memory every 50 ms: past ``rss_limit_mib`` it is killed (``over``), before
    the machine runs out. ``on_line`` gets each line of its stdout as it comes. Killed too on any error here (or
    Ctrl-C, SIGTERM)."""
    import queue
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err, lines = [], [], queue.Queue()

    def read(stream, into, forward):
        for line in stream:
            into.append(line)
            if forward:
                lines.put(line)

    readers = [threading.Thread(target=read, args=(proc.stdout, out, on_line is not None), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err, False), daemon=True)]
    for t in readers:
        t.start()

    def drain():
        while not lines.empty():
            on_line(lines.get())

    over = None
    try:
        while proc.poll() is None:
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            drain()
            rss = _rss_mib(proc.pid) if rss_limit_mib is not None and over is None else None
            if rss is not None and rss > rss_limit_mib and proc.poll() is None:
                over = rss
                proc.kill()
        for t in readers:
            t.join()
        drain()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Finished(proc.returncode, "".join(out), "".join(err), over)


def _child(path: str, cfg: BenchConfig, batch: int, context: int, mode: str = "measure", on_line=None) -> dict:
    """``measure`` (``mode="probe"``: one capacity probe; ``"capacity"``: the whole ``capacity`` search at
    ``context``) in a fresh Python process, so each run's peak memory is its own. The process may not grow past
    ``_host_bound()`` (a CPU probe: ``cfg.memory_limit_mib``, which ``_capacity`` sets no higher): a probe stopped
    there does not fit, any other run is an error."""
    cmd = [sys.executable, "-m", "eval.bench", "--worker", path, json.dumps(asdict(cfg)), str(batch), str(context),
           mode]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    cpu_probe = mode == "probe" and not _device(cfg).startswith("cuda")
    bound = cfg.memory_limit_mib if cpu_probe else _host_bound()
    run = _run(cmd, env, bound, on_line)
    what = f"batch {batch} x context {context}" if mode != "capacity" else f"the search at context {context}"
    killed = run.over is not None or run.returncode == -9
    why = (f"stopped at {run.over:.0f} MiB, over its bound of {bound:g} MiB" if run.over is not None
           else "killed by SIGKILL (the kernel's out-of-memory killer?)")
    if killed and mode == "probe":
        return {"batch": batch, "context": context, "oom": True, "why": why, "peak_memory_mib": run.over}
    if killed:
        raise MLAError(f"benchmark of {path} at {what} {why}" + (f" ({BOUND_KIND})" if run.over is not None else "")
                       + ": give a smaller --batch or --context")
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        raise MLAError(f"benchmark of {path} failed: {_failure(run.stderr)}")
    return json.loads(lines[-1])


def _failure(stderr: str) -> str:
    """What a failed child said: its last ``error:`` line, else the first line of the exception that ended its last
    traceback, else its last line."""
    lines = stderr.strip().splitlines()
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1]
    marker = "Traceback (most recent call last):"
    if marker in lines:
        start = len(lines) - lines[::-1].index(marker)
        ends = [ln for ln in lines[start:] if ln.strip() and not ln.startswith(" ")]
        if ends:
            return ends[0][:200]
    return (lines or ["no output"])[-1][:200]


def _add_ratios(rows: list[dict], keys) -> None:
    """``vs_original`` of every row after the first (the original): each key's value ÷ the original's."""
    for r in rows[1:]:
        r["vs_original"] = {k: r[k] / rows[0][k] if r.get(k) is not None and rows[0].get(k) else None for k in keys}


def largest_batch(fits, max_batch: int) -> int:
    """The largest batch in [1, max_batch] for which ``fits(batch)`` holds (0 if none), assuming it holds up to some
    batch and not above: batch 1, 2, 4, ... until one does not fit, then bisection. Each batch is tried once."""
    lo, hi = 0, max_batch + 1  # lo fits (0: nothing yet), hi does not (max_batch + 1: not tried)
    batch = 1
    while lo < max_batch and hi > max_batch:
        if fits(batch):
            lo, batch = batch, min(2 * batch, max_batch)
        else:
            hi = batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _fits(row: dict, limit: float | None) -> tuple[bool, str]:
    """(whether a probe's ``row`` fits, why): not when it ran out of memory or its peak passed ``limit`` (or the
    row's own ``limit_mib``, the bound of a CPU probe, ``limit_kind`` saying what it is)."""
    if row.get("oom"):
        return False, row.get("why", "out of memory")
    limit = row.get("limit_mib", limit)
    peak = max(p for p in (row.get("prefill_peak_mib"), row["peak_memory_mib"]) if p is not None)
    if limit is not None and peak > limit:
        return False, f"peak {peak:.0f} MiB > {limit:g} MiB" + (f" ({row['limit_kind']})" if row.get("limit_kind")
                                                                else "")
    return True, f"peak {peak:.0f} MiB"


def _pairs(entries, cfg: BenchConfig, result: dict, save, log) -> None:
    """Every (batch, context) pair for every model, the original first."""
    result["pairs"] = []
    for context, batch in itertools.product(cfg.contexts, cfg.batches):
        pair = {"batch": batch, "context": context, "models": []}
        result["pairs"].append(pair)
        result.setdefault("models", pair["models"])  # the first pair's rows, where one pair's results always were
        for name, path in entries:
            log(f"[{name}] {path}: prefill {batch} x {context} tokens, then {cfg.runs} x {cfg.new_tokens} "
                f"{'compiled static-cache' if cfg.compile else 'eager'} decode steps")
            pair["models"].append({"name": name, **_child(path, cfg, batch, context)})
            if result["baseline"]:
                _add_ratios(pair["models"], RATIO_KEYS)
            save()


def _cpu_bound(cfg: BenchConfig) -> tuple[float | None, str | None]:
    """(MiB, what it is) a CPU probe's peak may reach: --memory-limit-mib, and never past the memory available."""
    limit, available = cfg.memory_limit_mib, _host_bound()
    if available is not None and (limit is None or available < limit):
        return available, BOUND_KIND
    return limit, None


def _capacity(entries, cfg: BenchConfig, result: dict, save, log) -> None:
    """The largest batch that fits, per context and model: on CUDA one process per search (the model loaded once),
    on a CPU one per probe, bounded by the memory available when it starts. JSON is saved after every probe."""
    result["capacity"] = []
    for context in cfg.contexts:
        block = {"context": context, "memory_limit_mib": cfg.memory_limit_mib, "max_batch_tried": cfg.max_batch,
                 "models": []}
        result["capacity"].append(block)
        result.setdefault("models", block["models"])
        for name, path in entries:
            log(f"[{name}] {path}: largest batch at {context} tokens (1, 2, 4, ... then bisection, up to "
                f"{cfg.max_batch})")
            row = {"name": name, "path": path, "max_batch": None, "probes": []}  # saved as the search goes
            block["models"].append(row)
            save()

            def progress(probe):
                row["probes"].append(probe)
                save()

            if _device(cfg).startswith("cuda"):  # the allocator's own peak per probe: one process, one model load
                def on_line(line):
                    try:
                        message = json.loads(line)
                    except ValueError:
                        return
                    if isinstance(message, dict) and isinstance(message.get("probe"), dict):
                        progress(message["probe"])

                found = {"name": name, **_child(path, cfg, 0, context, mode="capacity", on_line=on_line)}
            else:  # a process's peak RSS keeps what its allocator kept: a fresh process per probe

                def probe(batch):
                    bound, kind = _cpu_bound(cfg)
                    got = _child(path, replace(cfg, memory_limit_mib=bound), batch, context, mode="probe")
                    if got.get("oom") and "why" in got and kind:
                        got["why"] += f" ({kind})"
                    return {**got, "limit_mib": bound, "limit_kind": kind}

                found = {"name": name, "path": path, **search(probe, cfg, progress)}
            row.clear()
            row.update(found)
            log(f"[{name}] max batch {row['max_batch']}: " + ", ".join(
                f"{p['batch']} {'fits' if p['fits'] else 'no'} ({p['why']})" for p in row["probes"]))
            if result["baseline"]:
                _add_ratios(block["models"], CAPACITY_KEYS)
            save()


def bench(models: list[str], baseline: str | None, cfg: BenchConfig, json_path: str | None = None,
          log=print) -> dict:
    """Benchmark ``baseline`` (if any) then ``models`` at every pair (or ``cfg.capacity``: search each one's largest
    batch); print side-by-side tables; optionally write JSON (rewritten after every run, so a cut-short benchmark
    leaves what it measured)."""
    if json_path:  # checked before the benchmark, not after it
        json_path = check_out_file(json_path, input_paths(baseline, *models))
    entries = ([("original", baseline)] if baseline else []) + [(Path(m.rstrip("/")).name or m, m) for m in models]
    result = {"settings": asdict(cfg), "baseline": "original" if baseline else None}

    def save():
        if not json_path:
            return
        write_text(json_path, json.dumps(result, indent=2) + "\n")

    (_capacity if cfg.capacity else _pairs)(entries, cfg, result, save, log)
    log(table(result))
    save()
    return result


def _mode(result: dict) -> str:
    s = result["settings"]
    return "static cache, torch.compile" if s.get("compile") else "dynamic cache, eager"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _block(rows: list[dict], cols) -> list[str]:
    """Rows of one table block under a header, each converted model followed by its ratios to the original."""
    lines = [f"{'model':<28}" + "".join(f"{c[0]:>15}" for c in cols)]
    for r in rows:
        lines.append(f"{r['name'][:28]:<28}" + "".join(f"{_fmt(r.get(c[1]), c[2]):>15}" for c in cols))
        if "vs_original" in r:
            lines.append(f"{'  ÷ original':<28}" + "".join(f"{_fmt(r['vs_original'].get(c[1]), '{:.3f}x'):>15}"
                                                          for c in cols))
    return lines


def table(result: dict) -> str:
    """One block per (batch, context) pair, or per context with ``capacity``."""
    cols = [("decode tok/s", "decode_tok_s", "{:.1f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
            ("KV cache MiB", "kv_cache_mib", "{:.4g}"), ("prefill pk MiB", "prefill_peak_mib", "{:.0f}"),
            ("decode pk MiB", "peak_memory_mib", "{:.0f}"), ("kernels/step", "kernels_per_step", "{:.0f}"),
            ("kernels/layer", "kernels_per_layer", "{:.1f}")]
    lines = []
    for pair in result.get("pairs", []):
        lines += [f"batch {pair['batch']} x context {pair['context']} ({_mode(result)})", *_block(pair["models"], cols)]
        lines += [f"  {r['name'][:28]}: first run of {result['settings']['new_tokens']} steps (compiling) "
                  f"{r['compile_s']:.1f} s" for r in pair["models"] if r.get("compile_s") is not None]
    for block in result.get("capacity", []):
        limit = block["memory_limit_mib"]
        lines.append(f"largest batch at context {block['context']} ({_mode(result)}; tried up to "
                     f"{block['max_batch_tried']}{f', peak memory limit {limit:g} MiB' if limit else ''})")
        lines += _block(block["models"], [("max batch", "max_batch", "{:d}")] + cols[:1] + cols[2:5])
        lines += [f"  probes of {r['name'][:28]}: " + ", ".join(f"{p['batch']} {'fits' if p['fits'] else 'no'}"
                                                                for p in r["probes"]) for r in block["models"]]
    return "\n".join(lines)


def _ratio(r: dict, key: str, spec: str = "{:.2f}x") -> str:
    return _fmt(r["vs_original"].get(key), spec)


def summary(result: dict) -> str:
    """One line: each converted model's decode speed ratio (or largest batch) at each pair, and its KV cache share."""
    s, first = result["settings"], result["models"][0]
    where = f"{s['new_tokens']} new, {first.get('device', s['device'])}" + (", compiled" if s.get("compile") else "")
    if "capacity" in result:
        blocks = result["capacity"]
        parts = [f"{r['name']}: max batch " + ", ".join(
            f"{b['models'][i]['max_batch']} at {b['context']}"
            + (f" ({_ratio(b['models'][i], 'max_batch')}, decode {_ratio(b['models'][i], 'decode_tok_s')})"
               if result["baseline"] else "") for b in blocks)
            for i, r in enumerate(result["models"]) if i or not result["baseline"]]
        return "; ".join(parts) + f" ({where})"
    pairs = result["pairs"]
    if len(pairs) == 1:
        where = f"batch {pairs[0]['batch']} after {pairs[0]['context']} tokens, " + where
    if not result["baseline"]:
        return "; ".join(f"{p['models'][i]['name']}: decode {p['models'][i]['decode_tok_s']:.1f} tok/s"
                         + (f" at {p['batch']} x {p['context']}" if len(pairs) > 1 else "")
                         for i in range(len(result["models"])) for p in pairs) + f" ({where})"
    return "; ".join(
        f"{r['name']}: decode " + ", ".join(_ratio(p["models"][i], "decode_tok_s")
                                            + (f" at {p['batch']} x {p['context']}" if len(pairs) > 1 else "")
                                            for p in pairs)
        + f", KV cache {_ratio(r, 'kv_cache_mib', '{:.1%}')} of the original"
        for i, r in enumerate(result["models"]) if i) + f" ({where})"


def _worker(argv: list[str]) -> int:
    """One measurement in this child process; its result is the last line of stdout."""
    path, settings, batch, context, mode = argv
    cfg = BenchConfig(**json.loads(settings))
    if mode == "capacity":  # each probe a line as it is made (the parent saves it), the result last
        row = capacity(path, cfg, int(context), lambda probe: print(json.dumps({"probe": probe}), flush=True))
        print(json.dumps(row))
    elif mode == "probe":
        model, device, dtype = _load(path, cfg)
        row = _fill_probe(model, cfg, int(batch), int(context))
        print(json.dumps({"path": path, "device": device, "dtype": dtype, **row}))
    else:
        try:
            row = measure(path, cfg, int(batch), int(context))
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not (isinstance(e, MemoryError) or any(m in str(e) for m in OOM_MARKERS)):
                raise
            raise MLAError(f"out of memory at batch {batch} x context {context}: {_first_line(e)}") from None
        print(json.dumps(row))
    return 0


def add_models_arguments(p) -> None:
    """MODEL [MODEL ...] and --baseline, shared by mla eval and mla bench."""
    p.add_argument("models", metavar="MODEL", nargs="+", help="converted model folder(s), Hub id(s) or smollm2-135m")
    p.add_argument("--baseline", help="the original model, measured first and compared against")


def bench_arguments(p) -> None:
    p.description = ("Benchmark MODEL(s) (and --baseline) one at a time, each (batch, context) pair in its own "
                     "process: prefill a random batch x context prompt, then time new-tokens greedy decode steps "
                     "(median of --runs) and count the kernels of one more step. Prints a table per pair with ratios "
                     "to the original and, with --json, saves it. --compile: static cache and torch.compile; "
                     "--capacity: the largest batch that fits. A benchmark: compare models only within one run.")
    add_models_arguments(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    add_config_args(p, BenchConfig)


def bench_command(args) -> int:
    cfg = config_from_args(args, BenchConfig, {})
    result = bench(args.models, args.baseline, cfg, json_path=args.json)
    print(summary(result))
    return 0


if __name__ == "__main__":  # a measurement child of mla bench: python -m eval.bench --worker ...
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("error: eval.bench runs as a child of mla bench; run mla bench --help")
    sys.exit(run_command(_worker, sys.argv[2:]))
