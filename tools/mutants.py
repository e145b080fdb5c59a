"""Break one line of the maths at a time and check that the tests notice.

    .venv/bin/python tools/mutants.py [--list] [--no-baseline] [--keep] [NAME ...]

Each break (``MUTANTS``) names a file, one exact snippet of it (it must occur exactly once: the script refuses to
run when code has moved) and its replacement, and the tests that should fail (pytest files with an optional ``-k``
expression, run one after the other until one fails). The repository's files (tracked, and untracked ones git
does not ignore) are copied into a temporary folder once; each break is applied there, its tests run there (``cwd``
= the copy, the copy first on the import path, a module cache of its own for the exports' remote code) and the file
is restored: the working tree is never touched. By default the tests are first run on the unbroken copy (each
selection once): a test that fails without a break would count every break as caught.

Prints a table (break, tests run, caught, seconds) and exits 1 when a break survives (or a baseline test fails,
or a selection runs no test), 2 when a snippet is missing or ambiguous. ``make mutants`` runs all of them
(10 to 20 minutes on 2 cores).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # exact snippet, found exactly once in the file
    new: str
    tests: tuple  # ((test file, -k expression or ""), ...), run in order until one fails
    what: str  # the break in words


def _t(file: str, k: str = "") -> tuple:
    return (f"tests/{file}", k)


FACT, ROPE, CAL, ALLOC, ASM, MODEL = ("convert/factorize.py", "convert/ropesplit.py", "convert/calibrate.py",
                                      "convert/allocate.py", "convert/assemble.py", "mla_modeling/modeling_mla.py")
REF = "test_maths_reference.py"
FACTOR_K = "independent_optimum or reference_factorization"
MUTANTS = [
    # --- factorize
    Mutant("fisher-metric-identity", FACT, "blocks.append(_sqrt_psd(g))",
           "blocks.append(torch.eye(g.shape[0], dtype=g.dtype))",
           (_t("test_methods.py", FACTOR_K),), "the Fisher metric replaced by the identity"),
    Mutant("fisher-no-trace-balance", FACT,
           "g = (g + ridge * torch.eye(g.shape[0], dtype=g.dtype)) * (trace_own / trace_s)",
           "g = g + ridge * torch.eye(g.shape[0], dtype=g.dtype)",
           (_t("test_methods.py", FACTOR_K),), "the K and V gradient blocks not weighted by their own loss share"),
    Mutant("fisher-plain-moments", FACT, "return (zs.cov_k + zs.cov_v) / 2, torch.block_diag(*blocks)",
           "return zs.cov, torch.block_diag(*blocks)",
           (_t("test_methods.py", FACTOR_K),), "the Fisher problem on plain (not gradient-weighted) moments"),
    Mutant("fisher-refit-swapped", FACT, "((slice(0, n_key), zs.cov_k), (slice(n_key, total), zs.cov_v))",
           "((slice(0, n_key), zs.cov_v), (slice(n_key, total), zs.cov_k))",
           (_t("test_methods.py", FACTOR_K),),
           "the key and value up-projections refitted under each other's weighting"),
    Mutant("pca-balance-inverted", FACT, "alpha = float((e_val / e_key).sqrt())",
           "alpha = float((e_key / e_val).sqrt())",
           (_t("test_methods.py", FACTOR_K),), "the K/V energy balance of pca inverted"),
    Mutant("latent-smallest-eigenvectors", FACT, "order = torch.argsort(evals, descending=True)",
           "order = torch.argsort(evals, descending=False)",
           (_t("test_methods.py", FACTOR_K),), "the latent keeps the smallest eigen-directions"),
    Mutant("up-projection-ignores-metric", FACT, "up = torch.linalg.solve(metric, basis)  # (D, r)", "up = basis",
           (_t("test_methods.py", FACTOR_K),), "the up-projection not mapped back out of the metric (pca, svd)"),
    # --- RoPE split
    Mutant("rope-pca-real-parts-only", ROPE, "c_i = cov_k[re][:, re] + cov_k[im][:, im]  # (g, g)",
           "c_i = cov_k[re][:, re]  # (g, g)",
           (_t(REF, "rope"), _t("test_methods.py", "rope")), "the cross-head PCA of a frequency reads half its pairs"),
    Mutant("rope-no-spin-factor", ROPE, "spin = 1 - math.sin(x) / x if x > 0 else 0.0", "spin = 1.0",
           (_t(REF, "rope"),), "RoPE scores ignore how far a frequency turns over the span"),
    Mutant("rope-keeps-worst", ROPE, "ranked = sorted(range(len(flat)), key=lambda t: flat[t], reverse=True)",
           "ranked = sorted(range(len(flat)), key=lambda t: flat[t], reverse=False)",
           (_t(REF, "rope"),), "the rotated components with the lowest scores keep RoPE"),
    Mutant("rope-norm-score-ignores-queries", ROPE, "score = (k_e * ((u**2) @ q_energy[i])).sqrt()",
           "score = k_e.sqrt()", (_t(REF, "rope"),), "norm / rotate-norm score keys without the queries' energy"),
    # --- calibration
    Mutant("calib-gradient-not-unit", CAL, "unit = g / norm2.clamp_min(1e-30).sqrt()[:, None]", "unit = g",
           (_t(REF, "calibration"),), "gradient directions not normalised per token"),
    Mutant("calib-cov-unweighted", CAL, "self._add(f\"cov_{name}\", (self.y * norm2[:, None]).T @ self.y)",
           "self._add(f\"cov_{name}\", self.y.T @ self.y)",
           (_t(REF, "calibration"),), "output moments not weighted by the gradient energy"),
    Mutant("calib-query-energy-not-squared", CAL,
           'self._add("q_energy", (q.detach().reshape(xa.shape[0], -1).to(torch.float64) ** 2).sum(0))',
           'self._add("q_energy", q.detach().reshape(xa.shape[0], -1).to(torch.float64).abs().sum(0))',
           (_t(REF, "calibration"),), "the query energy per dimension not squared"),
    # --- allocation
    Mutant("alloc-ranks-smallest", ALLOC,
           "sorted(((float(v), i) for i, sp in enumerate(spectra) for v in sp[floor:]), key=lambda t: t[0],",
           "sorted(((-float(v), i) for i, sp in enumerate(spectra) for v in sp[floor:]), key=lambda t: t[0],",
           (_t(REF, "allocat"),), "latent ranks go to the smallest eigenvalues"),
    Mutant("alloc-ropes-off-by-one", ALLOC, "for _, i in scored[: n * d_rope // 2]:",
           "for _, i in scored[1 : n * d_rope // 2 + 1]:",
           (_t(REF, "allocat"),), "the best RoPE component over all layers is skipped"),
    # --- assembly
    Mutant("assemble-rope-query-unscaled", ASM, "q_rows += [q_h * scale * nope_scale, (r_pe[:, cols] @ q_h) * scale]",
           "q_rows += [q_h * scale * nope_scale, (r_pe[:, cols] @ q_h)]",
           (_t("test_convert.py", "lossless"),), "the RoPE query rows miss the softmax-scale correction"),
    Mutant("assemble-key-up-rows-reversed", ASM, "kv_b_rows += [r_nope[:, cols].T @ up_k, up_v[cols]]",
           "kv_b_rows += [r_nope[:, cols].T @ up_k.flip(0), up_v[cols]]",
           (_t("test_convert.py", "lossless"),), "the key up-projection rows reversed"),
    Mutant("assemble-rope-scaling-once", ASM, "nope_scale[:rotary_dim] = rope_scaling**2",
           "nope_scale[:rotary_dim] = rope_scaling", (_t(REF, "distance_zero"),),
           "the no-RoPE query rows carry YaRN's / LongRoPE's attention scaling once, not squared"),
    # --- the model: attention, RoPE, caches
    Mutant("absorbed-bmm-no-scale", MODEL,
           "query = torch.cat((q_lat, q_pe), dim=-1).mul_(self.scaling).view(B, T * H, -1)",
           "query = torch.cat((q_lat, q_pe), dim=-1).view(B, T * H, -1)",
           (_t("test_runtime.py", "absorbed or latent_norm"),), "the softmax scale dropped in the absorbed bmm branch"),
    Mutant("absorbed-split-no-scale", MODEL,
           "scores = torch.baddbmm(scores, (q_lat * self.scaling).reshape(B, T * H, r), ckv.transpose(1, 2))",
           "scores = torch.baddbmm(scores, q_lat.reshape(B, T * H, r), ckv.transpose(1, 2))",
           (_t("test_runtime.py", "absorbed"),),
           "the absorbed branch of a cache that keeps keys and values apart misses the scale on the latent scores"),
    Mutant("absorbed-sdpa-default-scale", MODEL, "scale=self.scaling)[..., :r]", "scale=None)[..., :r]",
           (_t("test_runtime.py", "absorbed"),), "the fused absorbed SDPA call uses its default scale"),
    Mutant("absorbed-up-weights-swapped", MODEL,
           "return w_kv[:, : self.qk_nope_head_dim], w_kv[:, self.qk_nope_head_dim :]",
           "return w_kv[:, self.qk_nope_head_dim :], w_kv[:, : self.qk_nope_head_dim]",
           (_t("test_runtime.py", "absorbed"),), "the absorbed path swaps the key and value up-projections"),
    Mutant("absorbed-mask-one-ahead", MODEL,
           "allowed = torch.ones(T, S, dtype=torch.bool, device=ckv.device).tril()",
           "allowed = torch.ones(T, S, dtype=torch.bool, device=ckv.device).tril(1)",
           (_t("test_runtime.py", "static"),), "a short prompt into an empty static cache sees the next token"),
    Mutant("decompressed-scale-nope-only", MODEL,
           "dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,",
           "dropout=self.attention_dropout if self.training else 0.0, scaling=self.qk_nope_head_dim**-0.5,",
           (_t("test_runtime.py", "generate"),), "the decompressed path's softmax scale of the no-RoPE width"),
    Mutant("rope-frequencies-reversed", MODEL,
           "idx = [i for freqs in freq_lists for i in list(freqs) + list(freqs)]",
           "idx = [i for freqs in freq_lists for i in list(freqs) + list(reversed(freqs))]",
           (_t("test_convert.py", "lossless"),), "the imaginary halves of RoPE read their frequencies reversed"),
    Mutant("softmax-scale-nope-only", MODEL, "self.scaling = self.qk_head_dim**-0.5",
           "self.scaling = self.qk_nope_head_dim**-0.5", (_t("test_convert.py", "lossless"),),
           "the softmax scale of the no-RoPE head width"),
    Mutant("rope-sign-swapped", MODEL,
           "sign = [s for freqs in freq_lists for s in [-1.0] * len(freqs) + [1.0] * len(freqs)]",
           "sign = [s for freqs in freq_lists for s in [1.0] * len(freqs) + [-1.0] * len(freqs)]",
           (_t("test_convert.py", "lossless"),), "RoPE rotates the other way"),
    Mutant("decode-positions-from-zero", MODEL,
           "position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen",
           "position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)",
           (_t("test_runtime.py", "reorder or latent_norm"),), "a decode step without position ids restarts RoPE at 0"),
    Mutant("static-layer-slot-late", MODEL, "self.keys, self.values = self._buf[..., :r], self._buf[..., r:]",
           "self.keys, self.values = self._buf[..., 1:, :r], self._buf[..., 1:, r:]",
           (_t("test_runtime.py", "static and not compiled"),),
           "MLAStaticLayer writes every token one slot late in the latent the absorbed decode reads"),
    Mutant("latent-layer-stale-after-reorder", MODEL, "buf = self._buf if self.keys is self._keys_view else None",
           "buf = self._buf", (_t("test_runtime.py", "reorder"),),
           "the dynamic latent layer keeps its buffer after the cache is reordered (beam search)"),
    Mutant("latent-norm-skipped-in-decode", MODEL,
           "ckv = self.kv_a_layernorm(ckv)  # the cache holds the normalized latent",
           "ckv = self.kv_a_layernorm(ckv) if T > 1 else ckv", (_t("test_runtime.py", "latent_norm"),),
           "a one-token step caches the latent without its norm"),
]


def _check_snippets(mutants) -> list[str]:
    problems = []
    for m in mutants:
        text = (ROOT / m.path).read_text()
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.name}: the snippet occurs {count} times in {m.path} (expected once): {m.old!r}")
    return problems


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _pytest(copy: Path, env: dict, test: tuple, timeout: int) -> tuple[int, float, str]:
    """``(exit code, seconds, last lines)`` of one selection run in ``copy``."""
    file, k = test
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", file] + (["-k", k] if k else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        code, tail = -1, ["timed out"]
    return code, time.perf_counter() - t0, " | ".join(tail)


def _label(test: tuple) -> str:
    return Path(test[0]).name + (f" -k '{test[1]}'" if test[1] else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="breaks to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the breaks and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selected tests without a break")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"error: unknown break {unknown[0]!r} (see --list)", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:30} {m.what}; tests: {', '.join(_label(t) for t in m.tests)}")
        return 0
    problems = _check_snippets(chosen)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="mla-mutants-"))
    copy = tmp / "repo"
    copy.mkdir()
    _copy_tree(copy)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "TQDM_DISABLE": "1",
           "HF_MODULES_CACHE": str(tmp / "hf-modules"), "TRANSFORMERS_VERBOSITY": "error"}
    failed = False
    try:
        if not args.no_baseline:
            for test in dict.fromkeys(t for m in chosen for t in m.tests):
                code, secs, tail = _pytest(copy, env, test, args.timeout)
                print(f"baseline {_label(test)}: {'ok' if code == 0 else 'FAILED'} ({secs:.0f} s)", flush=True)
                if code != 0:
                    print(f"  {tail}", flush=True)
                    failed = True
            if failed:
                print("error: the selected tests fail without any break; fix them first", file=sys.stderr)
                return 1
        rows = []
        for m in chosen:
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new, 1))
            caught, ran, total, note = False, [], 0.0, ""
            try:
                for test in m.tests:
                    code, secs, tail = _pytest(copy, env, test, args.timeout)
                    ran.append(_label(test))
                    total += secs
                    if code == 1:  # a test failed
                        caught = True
                        break
                    if code not in (0, 1):  # no test ran, a collection error, a timeout: not a catch
                        note = f"exit {code}: {tail}"
            finally:
                target.write_text(original)
            rows.append((m.name, "; ".join(ran), "yes" if caught else "NO", total))
            print(f"{m.name:34} {'caught' if caught else 'SURVIVED'} ({total:.0f} s) {note}", flush=True)
        print()
        width = max(len(r[1]) for r in rows)
        print(f"{'break':34} {'tests run':{width}} caught  seconds")
        for name, ran, caught, secs in rows:
            print(f"{name:34} {ran:{width}} {caught:6} {secs:8.0f}")
        survived = [r[0] for r in rows if r[2] != "yes"]
        if survived:
            print(f"\n{len(survived)} of {len(rows)} breaks survived: {', '.join(survived)}", file=sys.stderr)
            return 1
        print(f"\nall {len(rows)} breaks caught")
        return 0
    finally:
        if args.keep:
            print(f"copy kept in {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
