"""What the commands that score one model under every mode share (``sparsify passkey``, ``sparsify lm-eval``): the
model, the gate, the modes and their k, how top-k selects, and where the model runs."""

from __future__ import annotations

from dataclasses import dataclass

from ..attention.policies import DEFAULT_BLOCK, MODES, check_selection
from ..config import int_list, name_list, option
from ..errors import UserError


@dataclass(frozen=True)
class ModesConfig:
    """The fields every mode-comparing command has; each command's config adds its own after these."""

    gates: str | None = option(None, "Gate folder from `sparsify distill` (or a hub repository user/name[@rev]).")
    model: str | None = option(None, "Model; if not given, the gate's base model (else the embedded model).")
    k: str = option("64", "Keys kept per query; several as a comma list: 32,64.")
    modes: str = option(",".join(MODES), f"Comma list of {', '.join(MODES)}.")
    random_seed: int | None = option(None, "Seed of the random gate; if not given, the gate config's random_seed, "
                                           "else 1.")
    selection: str = option("head", "head (top-k per query head), group (per KV group) or block (key blocks), as "
                                    "for `sparsify eval`.")
    block_size: int = option(DEFAULT_BLOCK, "With --selection block: 16, 32, 64 or 128.")
    dtype: str = option("auto", "auto, float32, bfloat16, float16.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    trust_remote_code: bool = option(False, "Allow the model's own code.")
    revision: str | None = option(None, "Hub revision of --model.")

    def k_list(self) -> list[int]:
        return int_list(self.k, "--k")

    def mode_list(self) -> list[str]:
        """The modes asked for, in the order of MODES."""
        modes = mode_names(self.modes, self.gates)
        return [m for m in MODES if m in modes]

    def runs(self) -> list[tuple[str, int | None]]:
        """(mode, k) in order: dense once (k None), then each sparse mode at each k."""
        ks = self.k_list()
        return [(m, None) if m == "dense" else (m, k) for m in self.mode_list()
                for k in ([None] if m == "dense" else ks)]

    def check_modes(self) -> None:
        self.runs()
        check_selection(self.selection, self.block_size, "bound", ("--selection", "--block-size", "--block-score"))

    def gates_for(self, mode: str) -> str | None:
        """What ``apply_gates`` takes as ``gates`` in ``mode``: the gate folder for the gate and its random control."""
        return self.gates if mode in ("gate", "random") else None


def mode_names(text: str, gates: str | None) -> list[str]:
    """The modes of a ``--modes`` comma list, in the user's order; mode gate needs ``gates``."""
    modes = name_list(text, MODES, "--modes")
    if "gate" in modes and not gates:
        raise UserError("mode 'gate' needs --gates FOLDER (a folder written by `sparsify distill`)")
    return modes


def label(mode: str, k: int | None) -> str:
    """``gate@64``; ``dense`` for the dense mode."""
    return mode if k is None else f"{mode}@{k}"
