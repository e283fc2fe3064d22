"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder (``state.safetensors``, then ``state.json``) swapped in whole by ``io.atomic_dir``; a
crash in the middle of the swap is finished by ``io.recover_dir`` when the output folder is next opened, so a
resume finds the newest complete checkpoint wherever the crash left it. Only finite parameters are saved: a
checkpoint named after a blow-up is a good one. Loading validates everything before it restores anything: the
JSON's fields and types, the step range, each parameter's name, shape, dtype and finiteness, and the optimizer
state against the optimizer's own parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Rule, check_value
from ..errors import UserError
from ..io import atomic_dir, atomic_write_json, write_safetensors
from ..training import START_OVER, STATE_JSON, STATE_TENSORS, check_resume, stop_advice

_ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")  # what AdamW keeps per parameter (both loops use AdamW)


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
    """Write ``folder`` atomically: parameters and optimizer tensors, plus ``meta`` (JSON-serialisable, with the
    ``step``). Refuses non-finite parameters, naming the last good checkpoint instead."""
    bad = next((k for k, v in params.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"the weights became non-finite by step {meta.get('step')} ({bad}); {stop_advice(folder)}")
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors = {f"params.{k}": v for k, v in params.items()} | opt_tensors
    with atomic_dir(folder) as tmp:
        write_safetensors(tmp / STATE_TENSORS, tensors)
        atomic_write_json(tmp / STATE_JSON, {"meta": meta, "optimizer": opt_meta})


def describe_checkpoint(folder: Path) -> str | None:
    """"the checkpoint of step N (FOLDER)" when ``folder`` holds a complete checkpoint, else None."""
    try:
        step = json.loads((Path(folder) / STATE_JSON).read_text())["meta"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"the checkpoint of step {step} ({folder})" if (Path(folder) / STATE_TENSORS).is_file() else None


def load_checkpoint(folder: Path, opt: torch.optim.Optimizer, expected: dict[str, torch.Tensor], total_steps: int,
                    settings: dict, overridable: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Validate and read the checkpoint in ``folder`` for parameters like ``expected`` (name -> tensor), a run of
    ``total_steps`` and this run's ``settings`` (``training.check_resume``: only those in ``overridable`` may
    differ); restores ``opt`` in place and returns (parameters, meta, the overridden settings). Every defect is a
    UserError."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except FileNotFoundError:
        raise UserError(f"no checkpoint in {folder} to resume from; {START_OVER}") from None
    except Exception as e:  # a truncated or corrupt checkpoint
        raise UserError(f"checkpoint {folder} is corrupt ({type(e).__name__}: {str(e)[:120]}); {START_OVER}") from None
    meta, opt_meta = _check_document(doc, folder, total_steps)
    changed = check_resume(meta["config"], None, (), folder, resolved=settings, overridable=overridable)
    params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
    _check_tensors(params, expected, folder)
    state: dict[int, dict] = {}
    for key, value in [(k, v) for k, v in tensors.items() if k.startswith("optim.")] + list(opt_meta["scalars"].items()):
        idx, _, name = key.removeprefix("optim.").partition(".")
        if not idx.isdigit() or not name:
            raise UserError(f"checkpoint {folder} is corrupt (optimizer entry {key!r}); {START_OVER}")
        state.setdefault(int(idx), {})[name] = value
    _check_optimizer(state, opt_meta["param_groups"], opt, folder, meta["step"])
    opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})  # moves state to param devices
    return params, meta, changed


def _check_document(doc, folder: Path, total_steps: int) -> tuple[dict, dict]:
    """The meta and optimizer parts of ``state.json``, their fields checked with the config's rules."""
    where = folder / STATE_JSON
    meta = doc.get("meta") if isinstance(doc, dict) else None
    opt_meta = doc.get("optimizer") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or not isinstance(opt_meta, dict):
        raise UserError(f"{where} lacks its meta or optimizer part; the checkpoint is corrupt ({START_OVER})")
    step = check_value(meta.get("step"), Rule("int", ge=0), f"step in {where}")
    if step > total_steps:
        raise UserError(f"checkpoint {folder} is at step {step}, beyond --steps {total_steps}; pass --steps {step} or "
                        "more to resume it")
    for key, kind in (("sampler", dict), ("history", list), ("config", dict), ("evals", list)):
        if (key in meta or key != "evals") and not isinstance(meta.get(key), kind):
            raise UserError(f"{key} in {where} must be a JSON {'object' if kind is dict else 'list'}, got "
                            f"{type(meta.get(key)).__name__}; the checkpoint is corrupt ({START_OVER})")
    for key in ("epoch", "position"):
        check_value(meta["sampler"].get(key), Rule("int", ge=0), f"sampler {key} in {where}")
    if not all(isinstance(h, dict) for h in meta["history"] + meta.get("evals", [])):
        raise UserError(f"history in {where} must hold JSON objects; the checkpoint is corrupt ({START_OVER})")
    groups, scalars = opt_meta.get("param_groups"), opt_meta.get("scalars")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                for g in groups) or not isinstance(scalars, dict):
        raise UserError(f"the optimizer part of {where} is malformed; the checkpoint is corrupt ({START_OVER})")
    return meta, opt_meta


def _check_tensors(params: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], folder: Path) -> None:
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not fit this run (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); {START_OVER}")
    for name, tensor in params.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise UserError(f"checkpoint {folder}: {name} has shape {tuple(tensor.shape)} {tensor.dtype}, expected "
                            f"{tuple(want.shape)} {want.dtype}; {START_OVER}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"checkpoint {folder}: {name} holds NaN or inf; rerun with a lower --lr and --overwrite")


def _check_optimizer(state: dict[int, dict], groups: list[dict], opt: torch.optim.Optimizer, folder: Path,
                     step: int) -> None:
    ours = [p for g in opt.param_groups for p in g["params"]]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        raise UserError(f"checkpoint {folder}: its optimizer has other parameter groups than this run; {START_OVER}")
    if step > 0 and not state:
        raise UserError(f"checkpoint {folder} holds no optimizer state at step {step}; it is incomplete ({START_OVER})")
    for idx, st in state.items():
        lacking = ", ".join(name for name in _ADAM_STATE if name not in st) or "no such parameter"
        if not 0 <= idx < len(ours) or lacking != "no such parameter":
            raise UserError(f"checkpoint {folder}: optimizer state {idx} is incomplete ({lacking}); {START_OVER}")
        for name in ("exp_avg", "exp_avg_sq"):
            if not torch.is_tensor(st[name]) or st[name].shape != ours[idx].shape:
                raise UserError(f"checkpoint {folder}: optimizer state {idx}.{name} does not fit its parameter "
                                f"{tuple(ours[idx].shape)}; {START_OVER}")
