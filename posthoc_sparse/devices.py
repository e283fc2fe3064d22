"""Devices: which device a run uses, and where a model (maybe spread by Accelerate's device map) computes."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import comma_items
from .errors import UserError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; also ``cpu``, ``cuda``, ``cuda:N`` (checked)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    index = device.removeprefix("cuda:") if device.startswith("cuda:") else ("0" if device == "cuda" else None)
    if index is None or not index.isdigit():
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for, but no CUDA device is available; use --device cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                        "device(s); use cuda:0 .. cuda:N-1")
    return device


def parse_max_memory(spec: dict | str) -> dict:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}`` (a dict passes through)."""
    if isinstance(spec, dict):
        return spec
    out: dict = {}
    for item in comma_items(spec, "--max-memory"):
        key, sep, size = item.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not size:
            raise UserError(f"--max-memory takes DEVICE=SIZE pairs like 0=20GiB,1=20GiB,cpu=64GiB, got {spec!r}")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise UserError(f"--max-memory takes DEVICE=SIZE pairs like 0=20GiB,1=20GiB,cpu=64GiB, got {spec!r}")
    return out


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return None


def execution_devices(model: nn.Module, modules: list[nn.Module]) -> list[torch.device]:
    """The device each of ``modules`` (submodules of ``model``) computes on.

    Without a device map, the device of the module's parameters. With one (``device_map=...``), the
    execution device of Accelerate's hook on the module or its nearest ancestor: the GPU holding the block,
    or the main device for blocks offloaded to the CPU or disk (whose parameters sit on the meta device).
    """
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    out = []
    for mod in modules:
        dev = None
        if getattr(model, "hf_device_map", None):
            parts = names[id(mod)].split(".") if names[id(mod)] else []
            for i in range(len(parts), -1, -1):
                dev = _hook_device(named[".".join(parts[:i])])
                if dev is not None:
                    break
        if dev is None:
            param = next((p for p in mod.parameters() if p.device.type != "meta"), None)
            dev = param.device if param is not None else next(model.parameters()).device
        out.append(dev)
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the execution device of the input embeddings (``model.device`` without a map)."""
    return execution_devices(model, [model.get_input_embeddings()])[0]


def device_summary(model: nn.Module) -> str:
    """One line saying where the model lives: ``cuda:0`` or ``device map: cuda:0 x 15, cuda:1 x 14``."""
    dmap = getattr(model, "hf_device_map", None)
    if not dmap:
        return str(input_device(model))
    counts: dict[str, int] = {}
    for dev in dmap.values():
        name = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[name] = counts.get(name, 0) + 1
    return "device map: " + ", ".join(f"{k} x {v}" for k, v in counts.items())


@contextlib.contextmanager
def onloaded(modules: list[nn.Module]):
    """Within the block, the weights of ``modules`` (and their submodules) that Accelerate offloaded to the
    CPU or disk are real tensors on the CPU (on the meta device otherwise); a no-op for ordinary models."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for mod in modules:
            for sub in mod.modules():
                if has_offloaded_params(sub):
                    stack.enter_context(align_module_device(sub, torch.device("cpu")))
        yield
