"""The models of a run: the student (the converted MLA export, read with its record; LoRA and trainable copies via
peft) and the teacher it was converted from (checked against that record; it shares the student's frozen tensors),
and the format the result is written in."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mla_modeling.configuration_mla import MLAConfig

from ..adapters import HEAD, read_layout, text_config
from ..config import split_list
from ..deepseek import check_deepseek_v3, is_deepseek_v3, load_mla
from ..errors import MLAError, quote
from ..readers import open_reader, skeleton
from ..weights import check_weights
from .config import FULL_DEFAULT_TARGETS, RecoverConfig


def read_record(converted: Path) -> dict:
    path = converted / "mla_conversion.json"
    if not converted.is_dir():
        raise MLAError(f"converted model not found: {converted}")
    if not path.exists():
        raise MLAError(f"{converted} is not an MLA export (no mla_conversion.json); convert it with mla convert first")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MLAError(f"could not read {path}: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("source", {}), dict):
        raise MLAError(f"{path} is malformed: expected a JSON object whose 'source' is an object (as mla convert "
                       "writes it)")
    return record


def source_shape(config) -> dict:
    """The shape of the model of ``config`` under the names an export's record gives its source."""
    layout = read_layout(config)
    return {"model_type": layout.model_type, "num_layers": layout.num_layers, "num_attention_heads": layout.num_heads,
            "num_key_value_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "hidden_size": layout.hidden_size, "vocab_size": config.get_text_config().vocab_size}


def shape_differences(config, record: dict, **expected) -> list[str]:
    """How the model of ``config`` differs in shape (family, layers, heads, head width, hidden size, vocabulary) from
    the source recorded in an export's ``record`` (and from ``expected`` values): one phrase per difference."""
    found = source_shape(config)
    want = {k: v for k, v in record.get("source", {}).items() if k in found} | expected
    return [f"{k} {found[k]} (the export's source: {quote(v)})" for k, v in want.items() if found[k] != v]


def check_teacher(teacher: str, config, student_config, record: dict) -> None:
    """MLAError unless the teacher has the architecture the export was converted from: the shape recorded in
    ``mla_conversion.json`` (family, layers, heads, head width) and the student's vocabulary and hidden size. An edited
    ``source`` (or ``teacher=``) naming another model would otherwise teach the student a model it never was."""
    differ = shape_differences(config, record, hidden_size=student_config.hidden_size,
                               vocab_size=student_config.vocab_size)
    if differ:
        raise MLAError(f"teacher {teacher} is not the model {record.get('source', {}).get('spec', 'CONVERTED')!s:.80} "
                       f"was converted from: {'; '.join(differ)}")


def load_student(converted: Path):
    try:
        return load_mla(converted)
    except MLAError:
        raise
    except Exception as err:  # corrupt weights surface as many types
        first = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
        raise MLAError(f"could not load the converted model {converted}: {first}") from None


def output_format(converted: Path, cfg: RecoverConfig) -> str:
    """The format ``mla finetune`` writes (``cfg.format``, else the converted model's own); MLAError, before any
    training, when the converted model cannot be written as deepseek_v3."""
    own = "deepseek_v3" if is_deepseek_v3(converted) else "mla"
    fmt = cfg.format or own
    if fmt == "deepseek_v3" and own == "mla":
        try:
            check_deepseek_v3(MLAConfig.from_pretrained(converted))
        except MLAError as err:
            raise MLAError(f"format deepseek_v3: {converted} cannot be written as deepseek_v3: {err}") from None
    return fmt


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cast_frozen(model, cfg: RecoverConfig, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` the weights of ``model`` (the student, before peft) that training leaves frozen: those of
    every module but the ``full_targets`` (matched as suffixes of module paths, as peft does) and the attention
    blocks (the layer-local stage runs them in float32; ``cast_untrained`` casts their frozen part after it); LoRA's
    base weights are frozen too."""
    if dtype == torch.float32:
        return
    trained = {id(p) for _, module in matching_modules(model, [*split_list(cfg.full_targets), "self_attn"])
               for p in module.parameters()}
    for p in model.parameters():
        if id(p) not in trained and p.is_floating_point():
            p.data = p.data.to(dtype)


def cast_untrained(model, dtype: torch.dtype) -> None:
    """After peft: every parameter that does not train in ``dtype`` (peft's frozen originals of trained modules)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def load_teacher(source, config, student, device, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, int]:
    """The teacher in ``dtype``, sharing every frozen student tensor that holds exactly its own values (embeddings,
    MLP base weights, output head; norms too unless they are trained): only the original attention projections (and
    trained norms) are extra memory; ``student`` None: nothing shared (a sharded run shards the teacher on its own).
    Returns (teacher in eval mode, frozen on ``device``; bytes shared)."""
    check_weights(source, config)
    config = text_config(config)  # a multimodal checkpoint teaches with its text model
    frozen = {}
    for name, p in (student.named_parameters() if student is not None else ()):
        if p.requires_grad or "lora_" in name or ".modules_to_save." in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        frozen[key] = p
    model = skeleton(config)
    names = [n for n in model.state_dict() if n != HEAD or not config.tie_word_embeddings]
    reader = open_reader(source, config)  # a GGUF, .bin or Hub id is loaded whole: its shared copies are then freed
    state, shared = {}, 0
    for name in names:
        t = reader.get([name])[name].to(device, dtype)
        own = frozen.get(name)
        if own is not None and own.shape == t.shape and own.dtype == t.dtype and torch.equal(own.detach(), t):
            t = own.detach()  # the same storage as the student's
            shared += t.numel() * t.element_size()
        state[name] = t
    del reader
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or [k for k in result.missing_keys if k != HEAD]:
        raise MLAError(f"internal error: the teacher's weights do not fit its architecture ({result})")
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for mod_name, module in model.named_modules():  # other non-persistent buffers: Gemma's embedding scale
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and hasattr(module, f"scalar_{buf_name}"):
                setattr(module, buf_name, torch.tensor(getattr(module, f"scalar_{buf_name}"), device=device))
            elif buf.is_meta:
                raise MLAError(f"internal error: the teacher's buffer {mod_name}.{buf_name} was never set")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.requires_grad_(False)
    return model.eval(), shared


def _train_in_place(model, full: list[str]):
    """The student itself with the parameters of the ``full`` modules (matched as suffixes of module paths) trained,
    everything else frozen (``lora_targets`` empty: no peft; the trained tensors keep the model's own names)."""
    model.requires_grad_(False)
    for _, module in matching_modules(model, full):
        module.requires_grad_(True)
    return model


def matching_modules(model, targets: list[str], prefix: str = "") -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of the modules of ``model`` whose paths (``prefix``: the path of ``model`` itself) end with
    one of ``targets``, as peft matches ``modules_to_save``."""
    paths = ((".".join(p for p in (prefix, name) if p), module) for name, module in model.named_modules())
    return [(path, module) for path, module in paths if path and any(path.endswith(t) for t in targets)]


def _module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def wrap_peft(model, cfg: RecoverConfig):
    """The student with LoRA on ``lora_targets`` and trainable copies of ``full_targets``; the rest frozen."""
    from peft import LoraConfig, get_peft_model  # peft: heavy, only for training

    lora, full = split_list(cfg.lora_targets), split_list(cfg.full_targets)
    names = _module_names(model)
    if cfg.full_targets == FULL_DEFAULT_TARGETS:  # the default names what any family may have: keep what exists
        full = [n for n in full if n in names]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in lora:
        if name not in linear:
            raise MLAError(f"lora_targets: no linear module named {name!r} (have: {', '.join(sorted(linear))})")
    for name in full:
        if name not in names:
            raise MLAError(f"full_targets: no module named {name!r}")
    if not cfg.adapters:  # all-parameter training: no adapter, the full targets train in place
        return _train_in_place(model, full)
    untie_trained_embeddings(model, [*lora, *full])
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=lora,
                        modules_to_save=full or None, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, config)


def untie_trained_embeddings(model, targets: list[str]) -> bool:
    """Give the output head its own copy of the weight it shares with the input embeddings (``tie_word_embeddings``
    becomes False) when an adapter trains either of them (``targets``: the LoRA and full targets): peft trains one
    module of the pair, and merging into the one shared matrix would change the other too, so the export would not be
    the trained model. Returns whether the embeddings were untied (an export then holds ``lm_head.weight``)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not model.config.tie_word_embeddings or head is None or head.weight is not embed.weight:
        return False
    trained = {id(module) for _, module in matching_modules(model, targets)}
    if id(head) not in trained and id(embed) not in trained:
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return True
