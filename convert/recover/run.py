"""The entry points of the stage: ``finetune`` (``mla finetune CONVERTED OUT``) and ``convert_and_recover`` (``mla
convert SRC OUT --recipe FILE`` with a ``recover:`` section). They check the settings, the inputs and OUT, lock OUT and
run the recipe (``recipe.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path

from ..data import source_paths
from ..device import resolve_device
from ..errors import MLAError, quote
from ..files import check_out, out_lock
from ..pipeline import convert
from ..save import write_json
from ..config import read_recipe
from ..sources import input_paths, load_config, resolve_source
from .checkpoint import work_dir
from .config import RecoverConfig
from .models import output_format, read_record, source_shape
from .recipe import Recovery
from .windows import data_inputs


def _is_main_launch_process() -> bool:
    """False in the non-zero ranks of torchrun / accelerate launch (only rank 0 locks and writes OUT)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


@contextlib.contextmanager
def _default_signals():
    """SIGTERM and SIGHUP at their default action (end the process) for the body (main thread only; elsewhere a
    no-op)."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):
            previous[signum] = signal.signal(signum, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _join_launch(device: str) -> None:
    """Join the process group of a multi-process launch (accelerate's ``PartialState``, which ``Accelerator`` then
    reuses). The join waits for every rank inside torch's C++ code, where Python's signal handlers cannot run: when a
    sibling has failed (rank 0 refused a locked OUT), the launcher's SIGTERM must end this process at once, not after
    its SIGKILL. Nothing is written yet that a handler would have to clean up (the lock file, at most)."""
    world = os.environ.get("WORLD_SIZE", "").strip()  # what torch's process group is joined by
    if not (world.isdigit() and int(world) > 1):
        return
    from accelerate import PartialState  # accelerate: heavy, only under a launcher

    cuda = resolve_device(device, "device=").type == "cuda"
    with _default_signals():
        PartialState(cpu=not cuda)


def check_recipe_model(recipe: str | Path, model: str | None, record: dict) -> None:
    """MLAError when the recipe names a ``source`` of another shape than the model the export was converted from
    (its settings, e.g. the learning rate and the tokens, were chosen for that model); a recipe without ``source``
    fits any model."""
    want = read_recipe(recipe).get("source")
    spec = record.get("source", {}).get("spec")
    if not want or want in (spec, model, record.get("source", {}).get("resolved")):
        return
    shape, have = source_shape(load_config(resolve_source(str(want)))), record.get("source", {})
    differ = [f"{k} {shape[k]} against {quote(have[k])}" for k in shape if k in have and have[k] != shape[k]]
    if differ:
        raise MLAError(f"recipe {recipe} is for {want}, not for {model or spec} ({differ[0]}); use a recipe written "
                       "for that model (recipes/gpu-1b-8b.yaml names none: it fits any)")


def check_recipe_source(recipe: str | Path, src: str) -> None:
    """``check_recipe_model`` for ``mla convert SRC --recipe FILE``, against SRC's own config: before converting."""
    if read_recipe(recipe).get("source") not in (None, "", src):
        check_recipe_model(recipe, src, {"source": {"spec": src, **source_shape(load_config(resolve_source(src)))}})


def finetune(converted: str | Path, out: str | Path, cfg: RecoverConfig, overwrite: bool = False, restart: bool = False,
             ckpt_dir: Path | None = None, teacher: str | None = None, log=print, inputs=(),
             recipe: str | Path | None = None) -> dict:
    """Recover CONVERTED by distillation into OUT (atomic); resumable from ``ckpt_dir`` (default OUT.ckpt).

    ``inputs``: more local paths the command reads (a recipe) that OUT must not replace; ``recipe``: the recipe the
    settings came from, checked to be for this model.
    """
    cfg.validate()
    converted = Path(converted).expanduser().resolve()
    record = read_record(converted)
    if recipe is not None:
        check_recipe_model(recipe, None, record)
    recorded = record.get("source", {})
    teacher = cfg.teacher or teacher or recorded.get("resolved") or recorded.get("spec")
    if teacher and not isinstance(teacher, str):
        raise MLAError(f"{converted}/mla_conversion.json is malformed: its source names {quote(teacher)}, not a "
                       "model; set teacher=...")
    if not teacher:
        raise MLAError(f"no teacher: {converted}/mla_conversion.json names no source; set teacher=...")
    output_format(converted, cfg)
    readers = [converted, *input_paths(teacher), *data_inputs(cfg), *inputs]
    out = check_out(out, overwrite, readers)
    if ckpt_dir is None:
        check_out(work_dir(out), True, readers, what="the checkpoint folder")
    lock = out_lock(out) if _is_main_launch_process() else contextlib.nullcontext()
    with lock:  # rank 0 locks OUT before joining the group: a second launch into OUT fails before any wait
        _join_launch(cfg.device)
        try:
            return Recovery(converted, out, record, teacher, cfg, overwrite, restart, ckpt_dir, log).run()
        except BaseException:  # checkpoints stay for the next run to resume from; an empty folder does not
            with contextlib.suppress(OSError):
                (ckpt_dir or work_dir(out)).rmdir()
            raise


def convert_and_recover(src: str, out: str | Path, ccfg, rcfg: RecoverConfig, restart: bool = False, log=print,
                        inputs=(), recipe: str | Path | None = None) -> dict:
    """``mla convert SRC OUT --recipe FILE`` with a ``recover:`` section: convert, recover, export in one go
    (``recipe``: the file, checked to be for SRC before anything runs).

    The training-free conversion is kept in ``OUT.ckpt/converted`` (with the training checkpoints) until OUT is
    written, so re-running the same command after a kill resumes instead of converting again.
    """
    rcfg.validate()
    ccfg.validate()
    if recipe is not None:
        check_recipe_source(recipe, src)
    readers = [*input_paths(src), *source_paths(ccfg.calib), *data_inputs(rcfg), *inputs]
    out = check_out(out, ccfg.overwrite, readers)
    check_out(work_dir(out), True, readers, what="the checkpoint folder")
    with out_lock(out):
        return _convert_and_recover(src, out, ccfg, rcfg, restart, log)


def _convert_and_recover(src: str, out: Path, ccfg, rcfg: RecoverConfig, restart: bool, log) -> dict:
    work = work_dir(out)
    converted = work / "converted"
    settings_path = work / "convert_settings.json"
    settings = {"src": src, **asdict(replace(ccfg, overwrite=False))}
    if restart and work.exists():
        shutil.rmtree(work)
    if (converted / "mla_conversion.json").exists():
        old = json.loads(settings_path.read_text()) if settings_path.exists() else {}
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise MLAError(f"{work} holds a conversion with other settings (changed: {', '.join(changed)}); "
                           "re-run with --restart to discard it")
        log(f"reusing the conversion in {converted}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        convert(src, converted, replace(ccfg, overwrite=True), log=log)
        write_json(settings_path, settings)
    record = finetune(converted, out, rcfg, overwrite=ccfg.overwrite, ckpt_dir=work, teacher=src, log=log)
    shutil.rmtree(work, ignore_errors=True)
    return record
