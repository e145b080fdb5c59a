"""Stage 4, factorize: joint low-rank latent of the no-RoPE keys and the values.

``Z = [K_nope; V] = W_z x~`` (D values). We find an orthonormal basis ``P`` (D x r) and set the latent
``ckv = P^T Dα Z`` (down-projection ``A = P^T Dα W_z``) and ``Z ≈ Dα^-1 P ckv`` (up-projection ``B``), where
``Dα`` scales the key rows by ``α`` so that K and V carry equal energy (balancing).

- ``pca``: ``P`` = top eigenvectors of the calibrated covariance ``Dα W_z E[x~ x~^T] W_z^T Dα``.
- ``svd``: ``P`` = top left singular vectors of ``Dα W_z`` (weights only; ignores the data, for comparison).
With ``r = D`` the factorization is exact.
"""

import torch

from .errors import MLAError

FACTOR_METHODS = ("pca", "svd")


def joint_latent(z_aug, moments, n_key: int, rank: int, method: str = "pca", balance: bool = True):
    """Return ``(A, B)``: ``A`` (r, d+1) down-projection incl. bias column, ``B`` (D, r) up-projection."""
    if method not in FACTOR_METHODS:
        raise MLAError(f"unknown factorization {method!r}; choose from {', '.join(FACTOR_METHODS)}")
    total = z_aug.shape[0]
    if not 1 <= rank <= total:
        raise MLAError(f"kv_lora_rank {rank} is impossible: it must be between 1 and {total} for this layer")
    cov = z_aug @ moments @ z_aug.T  # (D, D)
    alpha = 1.0
    if rank == total:  # exact: no basis change at all (avoids rounding in lossless conversions)
        eye = torch.eye(total, dtype=torch.float64)
        return z_aug.clone(), eye
    if balance and 0 < n_key < total:
        e_key, e_val = torch.trace(cov[:n_key, :n_key]), torch.trace(cov[n_key:, n_key:])
        if e_key > 0 and e_val > 0:
            alpha = float((e_val / e_key).sqrt())
    scale = torch.ones(total, dtype=torch.float64)
    scale[:n_key] = alpha
    if method == "pca":
        evals, evecs = torch.linalg.eigh(scale[:, None] * cov * scale[None, :])
        basis = evecs[:, torch.argsort(evals, descending=True)[:rank]]  # (D, r)
    else:
        u, _, _ = torch.linalg.svd(scale[:, None] * z_aug, full_matrices=True)
        basis = u[:, :rank]
    down = basis.T @ (scale[:, None] * z_aug)  # (r, d+1)
    up = basis / scale[:, None]  # (D, r)
    return down, up
