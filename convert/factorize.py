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
With ``r = D`` the factorization is exact.
"""

import torch

from .errors import MLAError

FACTOR_METHODS = ("fisher", "pca", "svd")
DAMPING = 1e-2  # relative ridge on the gradient-direction blocks (keeps L invertible and well conditioned)


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _problem(z_aug, n_key: int, method: str, moments, fisher):
    """``(S, L)``: the input moments and the output metric of the latent problem."""
    total = z_aug.shape[0]
    if method == "fisher":
        if fisher is None:
            raise MLAError("factorization 'fisher' needs gradient statistics")
        g_k, g_v, s_k, s_v = fisher
        s = (s_k + s_v) / 2
        blocks = []
        for g, s_own in ((g_k, s_k), (g_v, s_v)):
            ridge = DAMPING * torch.trace(g) / max(g.shape[0], 1)
            g = (g + ridge * torch.eye(g.shape[0], dtype=g.dtype)) * (torch.trace(s_own) / torch.trace(s))
            blocks.append(_sqrt_psd(g))
        return s, torch.block_diag(*blocks)
    cov = z_aug @ moments @ z_aug.T
    alpha = 1.0
    if 0 < n_key < total:
        e_key, e_val = torch.trace(cov[:n_key, :n_key]), torch.trace(cov[n_key:, n_key:])
        if e_key > 0 and e_val > 0:
            alpha = float((e_val / e_key).sqrt())
    scale = torch.ones(total, dtype=torch.float64)
    scale[:n_key] = alpha
    return moments, torch.diag(scale)


def latent_spectrum(z_aug, n_key: int, method: str, moments, fisher=None):
    """``(evals, basis, L)``: the eigen-decomposition (descending) of one layer's latent problem."""
    if method not in FACTOR_METHODS:
        raise MLAError(f"unknown factorization {method!r}; choose from {', '.join(FACTOR_METHODS)}")
    s, metric = _problem(z_aug, n_key, method, moments, fisher)
    if method == "svd":
        u, sv, _ = torch.linalg.svd(metric @ z_aug, full_matrices=True)
        evals = torch.zeros(u.shape[0], dtype=torch.float64)
        evals[: sv.shape[0]] = sv**2
        return evals, u, metric
    evals, evecs = torch.linalg.eigh(metric @ z_aug @ s @ z_aug.T @ metric.T)
    order = torch.argsort(evals, descending=True)
    return evals[order].clamp_min(0), evecs[:, order], metric


def joint_latent(z_aug, n_key: int, rank: int, method: str, moments, fisher=None):
    """Return ``(A, B)``: ``A`` (r, d+1) down-projection incl. bias column, ``B`` (D, r) up-projection."""
    if method not in FACTOR_METHODS:
        raise MLAError(f"unknown factorization {method!r}; choose from {', '.join(FACTOR_METHODS)}")
    total = z_aug.shape[0]
    if not 1 <= rank <= total:
        raise MLAError(f"kv_lora_rank {rank} is impossible: it must be between 1 and {total} for this layer")
    if rank == total:  # exact: no basis change at all (avoids rounding in lossless conversions)
        return z_aug.clone(), torch.eye(total, dtype=torch.float64)
    _, basis, metric = latent_spectrum(z_aug, n_key, method, moments, fisher)
    basis = basis[:, :rank]  # (D, r)
    down = basis.T @ metric @ z_aug  # (r, d+1)
    up = torch.linalg.solve(metric, basis)  # (D, r)
    if method == "fisher":  # least-squares up-projections, keys and values each under their own weighting
        for rows, s in ((slice(0, n_key), fisher[2]), (slice(n_key, total), fisher[3])):
            cc = down @ s @ down.T  # (r, r)
            cc = cc + 1e-9 * torch.trace(cc) / rank * torch.eye(rank, dtype=cc.dtype)
            up[rows] = torch.linalg.solve(cc, down @ s @ z_aug[rows].T).T
    return down, up
