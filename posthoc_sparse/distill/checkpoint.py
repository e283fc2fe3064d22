"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_dir, write_safetensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(folder: Path, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, meta: dict) -> None:
    """Write ``folder`` atomically: parameters and optimizer tensors, plus ``meta`` (JSON-serialisable)."""
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors = {f"params.{k}": v for k, v in params.items()} | opt_tensors
    with atomic_dir(folder) as tmp:
        write_safetensors(tmp / STATE_TENSORS, tensors)
        (tmp / STATE_JSON).write_text(json.dumps({"meta": meta, "optimizer": opt_meta}, indent=2, sort_keys=True))


def load_checkpoint(folder: Path, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Validate and read a checkpoint; restores ``opt`` in place and returns (parameters, meta)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except FileNotFoundError:
        raise UserError(f"no checkpoint in {folder} to resume from; run without --resume") from None
    except Exception as e:  # a truncated or corrupt checkpoint
        raise UserError(f"checkpoint {folder} is corrupt ({type(e).__name__}: {str(e)[:120]}); rerun without --resume") from None
    params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
    opt_meta = doc["optimizer"]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in opt_meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})  # moves state to param devices
    return params, doc["meta"]
