"""The model card of an export: ``README.md`` in OUT, written inside the temporary folder before the rename.

Its YAML metadata (``huggingface_hub``'s ``ModelCardData``) and its body come from the export's record
(``mla_conversion.json``): what was converted, the KV cache per token before and after, the measured verification (and
the perplexity curve when recovery ran), how to load it in its format and the ``mla`` commands that made it. Nothing in
it varies between two runs with the same settings (no times, no absolute paths of OUT); the source's own card is
linked, never copied.
"""

import shlex
from dataclasses import MISSING, fields
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from .config import flag_name
from .files import write_error
from .sources import BUILTIN

CARD = "README.md"
TAGS = ["mla", "kv-cache", "mla-retrofit"]
MAX_SOURCE_CARD = 2**20  # bytes of a source's README.md read for its license


def _card_license(path) -> str | None:
    """The ``license`` in the metadata of the model card at ``path`` (None without one, or when it cannot be read)."""
    if not path:
        return None
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > MAX_SOURCE_CARD:
            return None
        value = ModelCard.load(path).data.license
    except Exception:  # noqa: BLE001 - a source card without readable metadata: no license to report
        return None
    return value if isinstance(value, str) and value else None


def source_license(source, config) -> str | None:
    """The source's license as its own model card (a local folder's README.md, or a Hub id's README.md already in
    the Hugging Face cache) or its ``config.json`` says it; None when neither does."""
    stated = getattr(config, "license", None)
    if isinstance(stated, str) and stated:
        return stated
    local = source.local
    if local is not None:
        return _card_license((local if local.is_dir() else local.parent) / CARD) if not source.gguf_file else None
    try:
        cached = try_to_load_from_cache(source.spec, CARD)
    except Exception:  # noqa: BLE001 - not a valid repo id for the cache: nothing cached to read
        return None
    return _card_license(cached) if isinstance(cached, str) else None


def source_hub_id(source) -> str | None:
    """The Hub id of the source: the id given, the built-in model's own, or None for a local folder or file."""
    if source.spec in BUILTIN:
        return BUILTIN[source.spec].get("hub_id")
    return source.spec if source.local is None else None


def command_line(words: list[str], cfg, style: str = "flags") -> str:
    """``mla ...`` with every setting of the dataclass ``cfg`` that differs from its default, as ``--flag value``
    (``style="flags"``, mla convert) or ``key=value`` (mla finetune); ``overwrite`` is left out."""
    parts = list(words)
    for f in fields(cfg):
        default = f.default if f.default is not MISSING else None
        value = getattr(cfg, f.name)
        if f.name == "overwrite" or value == default:
            continue
        if style == "flags":
            flag = flag_name(f.name)
            if isinstance(value, bool):
                parts += [flag] if value else []
            else:
                parts += [flag, str(value)]
        else:
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"{f.name}={text}")
    return shlex.join(parts)


def card_data(record: dict) -> ModelCardData:
    """The card's YAML metadata, from the record."""
    source = record["source"]
    return ModelCardData(base_model=source["spec"], library_name="transformers", pipeline_tag="text-generation",
                         tags=list(TAGS), license=source.get("license"))


def _source_line(source: dict) -> str:
    hub = source.get("hub_id")
    spec = source["spec"]
    if hub:
        where = f"[{hub}](https://huggingface.co/{hub})"
        return f"`{spec}`, {where}" if hub != spec else where
    kind = "a local GGUF file" if spec.endswith(".gguf") else "a local folder"
    return f"`{spec}`, {kind} (its own model card, if it has one, is there)"


def _widths(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low} to {high} (per layer)"


def _load_snippet(fmt: str) -> str:
    remote = ", trust_remote_code=True" if fmt == "mla" else ""
    return ("```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "path = \"path/to/this/folder\"  # or its Hub id once uploaded\n"
            f"model = AutoModelForCausalLM.from_pretrained(path{remote})\n"
            f"tok = AutoTokenizer.from_pretrained(path)\n"
            "inputs = tok(\"The capital of France is\", return_tensors=\"pt\")\n"
            "print(tok.decode(model.generate(**inputs, max_new_tokens=16)[0]))\n"
            "```")


def card_body(record: dict) -> str:
    source, kv, ranks, method = record["source"], record["kv_cache"], record["ranks"], record["method"]
    fmt = record.get("format", "mla")
    recovery = record.get("recovery")
    made = "converted and recovered" if recovery else "converted"
    lines = [
        f"# {source['spec']} with multi-head latent attention",
        "",
        f"{source['spec']} {made} to multi-head latent attention (MLA, the attention of DeepSeek-V2/V3) by "
        f"{record.get('tool', 'mla-retrofit')}: it caches one latent vector and one shared RoPE key per token and "
        "layer instead of per-head keys and values.",
        "",
        "## What was converted",
        "",
        f"- Source: {_source_line(source)}.",
        f"- Architecture: `{source['model_type']}`, {source['attention']}, {source['num_layers']} layers, "
        f"{source['num_attention_heads']} query / {source['num_key_value_heads']} KV heads, head_dim "
        f"{source['head_dim']}.",
        f"- Format: `{fmt}`" + (" (this package's remote code: per-layer ranks)." if fmt == "mla" else
                                " (a stock `DeepseekV3ForCausalLM` checkpoint, no remote code)."),
        f"- Latent width `kv_lora_rank`: {_widths(ranks['kv_lora_rank'])}; RoPE key width `qk_rope_head_dim`: "
        f"{_widths(ranks['qk_rope_head_dim'])}.",
        f"- Method: RoPE split `{method['rope']}`, factorization `{method['factorization']}`, rank allocation "
        f"`{method['rank_alloc']}`, weights in {method['dtype']}.",
    ]
    calib = record.get("calibration")
    if calib:
        lines.append(f"- Calibration: `{calib['data']}`, {calib['sequences']} x {calib['seq_len']} tokens, seed "
                     f"{calib['seed']}.")
    lines += [
        "",
        "## KV cache per token",
        "",
        "| | values | bytes |",
        "|---|---|---|",
        f"| original | {kv['original_values_per_token']} | {kv['original_bytes_per_token']} |",
        f"| this export | {kv['mla_values_per_token']} | {kv['mla_bytes_per_token']} |",
        "",
        f"{kv['ratio']:.2%} of the original's cache ({1 - kv['ratio']:.1%} saved), summed over layers, at "
        f"{kv['dtype_bytes']} bytes per value.",
        "",
        "## Verification",
        "",
    ]
    verify = record.get("verify")
    if verify:
        lines.append(f"Measured against the source on {verify['tokens']} tokens of the calibration source's text "
                     f"after the conversion: top-1 agreement {verify['top1_agreement']:.1%}, max |logit difference| "
                     f"{verify['max_abs_logit_diff']:.3g}, mean KL {verify['mean_kl']:.3g}.")
    if recovery:
        val = recovery.get("val") or []
        lines += ["", "## Recovery", "",
                  f"Distilled from the source on `{recovery['data']}`: {recovery['steps']} steps, "
                  f"{recovery['tokens_seen']} tokens."]
        if val:
            lines.append(f"Validation perplexity (`{recovery['settings'].get('val_data')}`, held out), as a ratio "
                         f"to the source's: {val[0]['ratio']:.3f}x before, {val[-1]['ratio']:.3f}x after "
                         f"({val[-1]['val_ppl']:.2f} against {val[-1]['teacher_val_ppl']:.2f}).")
        check = recovery.get("verify") or {}
        if "val_nll_mean_abs_diff" in check:
            lines.append(f"The written weights, loaded as below, give the trained model's per-token loss within "
                         f"{check['val_nll_mean_abs_diff']:.2g} on average.")
    lines += ["", "## How to load", "",
              "Needs only torch and transformers (5.23 to 5.25)" + (", and runs this folder's model code:"
                                                                     if fmt == "mla" else ", no remote code:"),
              "", _load_snippet(fmt), "", "## How it was made", "", "```bash"]
    if record.get("command"):
        lines.append(record["command"])
    if recovery and recovery.get("command"):
        lines.append(recovery["command"])
    lines += ["```", "",
              "OUT is this folder" + (", CONVERTED the conversion before recovery" if recovery else "") +
              ". `mla_conversion.json` holds the full record (per-layer ranks, RoPE frequencies, settings, versions).",
              ""]
    return "\n".join(lines)


def write_card(folder: Path, record: dict) -> ModelCard:
    """``folder/README.md``: the model card of the export whose record is ``record`` (replacing any copied one)."""
    card = ModelCard(f"---\n{card_data(record).to_yaml()}\n---\n\n{card_body(record)}")
    try:
        card.save(Path(folder) / CARD)
    except OSError as err:
        raise write_error(err, Path(folder)) from None
    return card
