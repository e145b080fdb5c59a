"""Kernels per decode step, counted with ``torch.profiler`` over one call of a step function.

On CUDA: the kernels the device ran (memory copies and sets left out). On a CPU: the aten ops that compute, counted
at the deepest level where they compute (``aten::linear`` counts once, as the ``aten::addmm`` it calls) and without the
view and metadata ops; kernels of ``torch.compile`` (``cpp_fused_*``) are counted when inductor's kernel profiling is
on (``torch._inductor.config.cpp.enable_kernel_profile``; ``mla bench --compile`` turns it on for a CPU).
"""

# ops that only make views or read metadata: they launch nothing
METADATA_OPS = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::transpose", "aten::permute",
    "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::expand_as",
    "aten::as_strided", "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::t", "aten::alias",
    "aten::detach", "aten::detach_", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::item", "aten::_local_scalar_dense", "aten::to",
    "aten::contiguous", "aten::result_type", "aten::view_as", "aten::unbind", "aten::chunk", "aten::flatten",
    "aten::unflatten", "aten::movedim", "aten::diagonal", "aten::unfold", "aten::size", "aten::stride", "aten::dim",
})


def _is_compute(name: str) -> bool:
    return (name.startswith("aten::") and name not in METADATA_OPS) or "cpp_fused" in name


def _compute_ops(event) -> int:
    """Compute ops at the deepest level of ``event``'s tree: its own 1 only when nothing below it computes."""
    below = sum(_compute_ops(child) for child in event.cpu_children)
    return below or int(_is_compute(event.name))


def count_kernels(model, step_fn) -> int:
    """Kernels (CUDA) or compute ops (CPU) of one call of ``step_fn()``, the device being ``model``'s."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        step_fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        return sum(e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")) for e in events)
    return sum(_compute_ops(e) for e in events if e.cpu_parent is None)
