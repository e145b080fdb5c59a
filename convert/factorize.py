"""Stage 4, factorize: joint low-rank latent of the no-RoPE keys and the values.

``Z = [K_nope; V] = W_z x~`` (D values). In a metric ``L`` (D x D, invertible) we take the orthonormal ``P`` (D x r)
spanning the top eigenvectors of ``L W_z S W_z^T L^T`` and set the latent ``ckv = P^T L Z`` (down-projection
``A = P^T L W_z``) and ``Z ~= L^-1 P ckv`` (up-projection ``B``); this minimises ``E||L (Z - B A x~)||^2`` and the
dropped eigenvalues are that error.

- ``fisher`` (default): ``L = blockdiag(G_k^1/2, G_v^1/2)`` and ``S`` the gradient-weighted input moments
  (``calibrate.LayerStats``): the error is the Fisher estimate of the loss increase, so eigenvalues of different
  layers are comparable (``allocate`` uses them to share ranks between layers). ``B`` is then refitted by least
  squares separately for keys (under their own weighting ``S_k``) and values (``S_v``).
- ``pca``: ``S`` the plain input moments, ``L`` scales the key rows so that K and V carry equal energy.
- ``svd``: ``P`` = top left singular vectors of the balanced weights (ignores the data; a baseline).
Every statistic is a covariance of ``Z`` (D x D, D <= 2 g d_h): the maths never touches the (d+1)-dim input space.
With ``r = D`` the factorization is exact.
"""

from dataclasses import dataclass

import torch

from .errors import MLAError

FACTOR_METHODS = ("fisher", "pca", "svd")
DAMPING = 1e-2  # relative ridge on the gradient-direction blocks (keeps L invertible and well conditioned)


@dataclass
class LatentStats:
    """Statistics of ``Z`` (D wide) from ``calibrate.LayerStats`` through ``Z = T y``: all D x D, float64."""

    cov: torch.Tensor | None  # E[Z Z^T]
    cov_k: torch.Tensor | None = None  # E[|g_k|^2 Z Z^T]
    cov_v: torch.Tensor | None = None  # E[|g_v|^2 Z Z^T]
    grad_k: torch.Tensor | None = None  # (n_key, n_key) gradient directions of the key rows (already rotated)
    grad_v: torch.Tensor | None = None  # (D - n_key, D - n_key)
    trace_k: float = 0.0
    trace_v: float = 0.0

    @classmethod
    def of(cls, stats, transform: torch.Tensor, key_rotation: torch.Tensor | None = None) -> "LatentStats":
        """``transform`` (D, 2g*d_h) maps ``y = [k; v]`` to ``Z``; ``key_rotation`` rotates the key gradients."""
        if stats is None:
            return cls(cov=None)

        def sandwich(c):
            return transform @ c @ transform.T

        if not stats.has_gradients:
            return cls(cov=sandwich(stats.cov))
        rot = key_rotation if key_rotation is not None else torch.eye(stats.grad_k.shape[0], dtype=torch.float64)
        return cls(cov=sandwich(stats.cov), cov_k=sandwich(stats.cov_k), cov_v=sandwich(stats.cov_v),
                   grad_k=rot @ stats.grad_k @ rot.T, grad_v=stats.grad_v, trace_k=stats.trace_k,
                   trace_v=stats.trace_v)


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``gram^-1 rhs`` for a PSD ``gram`` (r, r), with a 1e-9 relative ridge: the least-squares refit of an
    up-projection."""
    n = gram.shape[0]
    return torch.linalg.solve(gram + 1e-9 * torch.trace(gram) / n * torch.eye(n, dtype=gram.dtype), rhs)


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _problem(n_key: int, total: int, method: str, zs: LatentStats):
    """``(C, L)``: the covariance of ``Z`` the latent must keep and the output metric of the latent problem."""
    if method == "fisher":
        if zs.grad_k is None:
            raise MLAError("factorization 'fisher' needs gradient statistics")
        trace_s = (zs.trace_k + zs.trace_v) / 2
        blocks = []
        for g, trace_own in ((zs.grad_k, zs.trace_k), (zs.grad_v, zs.trace_v)):
            ridge = DAMPING * torch.trace(g) / max(g.shape[0], 1)
            g = (g + ridge * torch.eye(g.shape[0], dtype=g.dtype)) * (trace_own / trace_s)
            blocks.append(_sqrt_psd(g))
        return (zs.cov_k + zs.cov_v) / 2, torch.block_diag(*blocks)
    cov = zs.cov
    alpha = 1.0
    if 0 < n_key < total:
        e_key, e_val = torch.trace(cov[:n_key, :n_key]), torch.trace(cov[n_key:, n_key:])
        if e_key > 0 and e_val > 0:
            alpha = float((e_val / e_key).sqrt())
    scale = torch.ones(total, dtype=torch.float64)
    scale[:n_key] = alpha
    return cov, torch.diag(scale)


def output_metric(n_key: int, total: int, method: str, zs: LatentStats) -> torch.Tensor:
    """The metric ``L`` (D x D) in which ``method`` measures errors of ``Z`` (identity for svd without data)."""
    if method == "svd":
        if zs.cov is not None and 0 < n_key < total:
            return _problem(n_key, total, "pca", zs)[1]
        return torch.eye(total, dtype=torch.float64)
    return _problem(n_key, total, method, zs)[1]


def latent_spectrum(z_aug, n_key: int, method: str, zs: LatentStats):
    """``(evals, basis, L)``: the eigen-decomposition (descending) of one layer's latent problem."""
    if method not in FACTOR_METHODS:
        raise MLAError(f"unknown factorization {method!r}; choose from {', '.join(FACTOR_METHODS)}")
    total = z_aug.shape[0]
    if method == "svd":
        metric = output_metric(n_key, total, method, zs)
        u, sv, _ = torch.linalg.svd(metric @ z_aug, full_matrices=True)
        evals = torch.zeros(u.shape[0], dtype=torch.float64)
        evals[: sv.shape[0]] = sv**2
        return evals, u, metric
    cov, metric = _problem(n_key, total, method, zs)
    evals, evecs = torch.linalg.eigh(metric @ cov @ metric.T)
    order = torch.argsort(evals, descending=True)
    return evals[order].clamp_min(0), evecs[:, order], metric


def joint_latent(z_aug, n_key: int, rank: int, method: str, zs: LatentStats, spectrum=None):
    """Return ``(A, B)``: ``A`` (r, d+1) down-projection incl. bias column, ``B`` (D, r) up-projection.

    ``spectrum``: the ``latent_spectrum`` of this problem when already computed (reused, not recomputed)."""
    if method not in FACTOR_METHODS:
        raise MLAError(f"unknown factorization {method!r}; choose from {', '.join(FACTOR_METHODS)}")
    total = z_aug.shape[0]
    if not 1 <= rank <= total:
        raise MLAError(f"kv_lora_rank {rank} is impossible: it must be between 1 and {total} for this layer")
    if rank == total:  # exact: no basis change at all (avoids rounding in lossless conversions)
        return z_aug.clone(), torch.eye(total, dtype=torch.float64)
    _, basis, metric = spectrum if spectrum is not None else latent_spectrum(z_aug, n_key, method, zs)
    basis = basis[:, :rank]  # (D, r)
    down = basis.T @ metric @ z_aug  # (r, d+1)
    up = torch.linalg.solve(metric, basis)  # (D, r)
    if method == "fisher":  # least-squares up-projections, keys and values each under their own weighting
        proj = basis.T @ metric  # (r, D): down = proj @ z_aug
        for rows, c in ((slice(0, n_key), zs.cov_k), (slice(n_key, total), zs.cov_v)):
            up[rows] = _ridge_solve(proj @ c @ proj.T, proj @ c[:, rows]).T  # (A S A^T)^-1 A S Z_rows^T
    return down, up


NORM_EPS = 1e-6  # transformers' DeepseekV3 latent RMSNorm
NORM_STEPS = 300  # Adam steps of the pre-norm transform
NORM_MAX_COND = 10.0  # its largest / smallest singular value, at most (recovery trains the latent rows stably)


def _steady_transform(c: torch.Tensor) -> torch.Tensor:
    """``T`` (r, r) that makes ``|T c_t|^2`` as nearly the same for every token as it can: minimises
    ``Var_t |T c_t|^2 / (E_t |T c_t|^2)^2`` (Adam from the identity; singular values clamped to a condition number of
    ``NORM_MAX_COND``), scaled so that the mean square of ``T c`` is 1."""
    cs = c / c.pow(2).mean().clamp_min(1e-30).sqrt()
    t = torch.eye(c.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([t], lr=1e-2)
    for _ in range(NORM_STEPS):
        q = (cs @ t.T).pow(2).sum(1)  # (M,)
        loss = q.var() / q.mean() ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    u, s, vh = torch.linalg.svd(t.detach())
    t = (u * s.clamp_min(float(s[0]) / NORM_MAX_COND)) @ vh
    return t / float((c @ t.T).pow(2).mean().clamp_min(1e-30).sqrt())


def normalised_latent(down: torch.Tensor, up: torch.Tensor, z_aug: torch.Tensor, metric: torch.Tensor, n_key: int,
                      x: torch.Tensor, w_k: torch.Tensor | None = None, w_v: torch.Tensor | None = None):
    """Fit a normalised latent (DeepSeek's ``kv_a_layernorm``, always applied) to the plain one:
    ``(transform, up_norm, fit)``.

    The cached latent becomes ``c' = T c`` (``c = down x~``) and the keys / values ``Z ~= B' u`` with
    ``u = c' / rms(c')`` (the norm's gain left at 1). A per-token RMS that varies rescales each token's keys and values,
    so ``T`` makes ``|T c|`` as nearly constant over tokens as it can (``_steady_transform``), then ``B'`` is the
    least-squares fit of the exact ``Z = z_aug x~`` on ``u`` over the calibration tokens ``x`` (M, d+1), keys and
    values each weighted per token by ``w_k`` / ``w_v`` (the squared loss gradients with ``fisher``, else 1).
    ``fit``: the relative error ``sum_t w_t |L (Z_t - Zhat_t)|^2 / sum_t w_t |L Z_t|^2`` (``L`` the factorization's
    metric) of the normalised latent and of the plain one (``up c``), and the tokens used."""
    x = x.to(torch.float64)
    c, z = x @ down.T, x @ z_aug.T  # (M, r), (M, D)
    t = _steady_transform(c)
    tc = c @ t.T
    u = tc / (tc.pow(2).mean(1, keepdim=True) + NORM_EPS).sqrt()  # (M, r)
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    blocks = ((slice(0, n_key), ones if w_k is None else w_k.to(torch.float64)),
              (slice(n_key, z.shape[1]), ones if w_v is None else w_v.to(torch.float64)))
    up_norm = torch.zeros_like(up)
    for rows, w in blocks:
        up_norm[rows] = _ridge_solve((u * w[:, None]).T @ u, (u * w[:, None]).T @ z[:, rows]).T

    def error(pred):
        lz, ld = z @ metric.T, (pred - z) @ metric.T
        num = sum(float((w[:, None] * ld[:, rows] ** 2).sum()) for rows, w in blocks)
        return num / max(sum(float((w[:, None] * lz[:, rows] ** 2).sum()) for rows, w in blocks), 1e-30)

    fit = {"error": error(u @ up_norm.T), "error_plain": error(c @ up.T), "samples": int(x.shape[0]),
           "condition": float(torch.linalg.cond(t))}
    return t, up_norm, fit
