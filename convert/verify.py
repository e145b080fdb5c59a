"""Stage 6, verify: the export against the source, layer by layer, on held-out verification windows."""

from pathlib import Path

import torch

from .export import export_io
from .layerwise import LayerwiseModel, run_layers
from .readers import SafetensorsReader


def compare(ref: LayerwiseModel, new: LayerwiseModel, ref_h: torch.Tensor, new_h: torch.Tensor,
             block: int = 64) -> dict:
    """Logit agreement of two models' final hidden states (B, T, d), ``block`` positions at a time (the logits of
    a 256K vocabulary are 1 MiB per position in float32)."""
    max_diff, kl, agree, tokens = 0.0, 0.0, 0, 0
    spans = [(b, t) for b in range(ref_h.shape[0]) for t in range(0, ref_h.shape[1], block)]
    for b, t in spans:
        p = ref.logits(ref_h[b : b + 1, t : t + block])  # (1, block, V)
        q = new.logits(new_h[b : b + 1, t : t + block])
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
        max_diff = max(max_diff, float((p - q).abs().max()))
        kl += float((logp.exp() * (logp - logq)).sum(-1).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += p.shape[1]
    return {"max_abs_logit_diff": max_diff, "mean_kl": kl / tokens, "top1_agreement": agree / tokens,
            "tokens": tokens}


def verify_export(source: LayerwiseModel, folder: Path, config, ref_h: torch.Tensor, windows: torch.Tensor) -> dict:
    """The export in ``folder`` (its ``config``) run layer by layer on ``windows`` beside the source's final hidden
    states ``ref_h`` of the same windows: logit agreement (``compare``)."""
    exported = LayerwiseModel(config, SafetensorsReader(folder), source.device, source.dtype, config.layer_types,
                              export_io(config))
    return compare(source, exported, ref_h, run_layers(exported, windows, "verify"))
