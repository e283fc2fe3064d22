"""The model type ``sparsify`` of lm-evaluation-harness: importing this module registers it (it needs ``lm_eval``:
``pip install posthoc-sparse[lm-eval]``).

It is the harness's own Hugging Face model (``HFLM``: batching, loglikelihood, rolling loglikelihood, generation)
over a model that ``loading.load_model`` loaded (hub id, local folder, ``.gguf`` file or ``embedded:smollm2-135m``),
with its attention routed through ``apply_gates`` in one mode at one k. From Python::

    import lm_eval
    import posthoc_sparse.evaluate.lm_eval_model  # registers "sparsify"

    lm_eval.simple_evaluate(model="sparsify", model_args="pretrained=Qwen/Qwen3-1.7B,gates=gates/q,k=64,mode=gate",
                            tasks=["hellaswag"])

and from the shell ``python -m sparsify_cli.lm_eval --model sparsify --model_args ... --tasks ...`` (lm_eval's own
command line, with this model type registered first).
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..attention.policies import DEFAULT_BLOCK
from ..config import EMBEDDED_MODEL

MODEL_NAME = "sparsify"


@register_model(MODEL_NAME)
class SparsifyLM(HFLM):
    """``HFLM`` over a frozen model whose attention keeps the top-``k`` keys per query chosen by ``mode``: "gate"
    (the gate folder or hub repository ``gates``), "oracle" (true top-k), "random" (the random control with the
    gate's shapes) or "dense". Other keyword arguments (``batch_size``, ``max_length``, ...) are ``HFLM``'s.

    ``pretrained`` may also be a model already loaded (with ``tokenizer``); then ``dtype``, ``device`` and
    ``revision`` are not used and the gate is applied to that model (``remove()`` restores it)."""

    def __init__(self, pretrained=None, gates: str | None = None, k: int = 64, mode: str = "gate",
                 selection: str = "head", block_size: int = DEFAULT_BLOCK, random_seed: int | None = None,
                 dtype: str = "auto", device: str = "auto", revision: str | None = None,
                 trust_remote_code: bool = False, tokenizer=None, **kwargs):
        from ..deploy import apply_gates
        from ..gates.io import read_gate_config
        from ..loading import load_model

        gate_cfg = read_gate_config(gates) if gates else {}
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "auto"  # lm_eval's command line asks for cuda:0 by default; its own HFLM falls back likewise
        if pretrained is None or isinstance(pretrained, str):
            loaded = load_model(str(pretrained or gate_cfg.get("base_model") or EMBEDDED_MODEL), dtype=str(dtype),
                                device=str(device), trust_remote_code=bool(trust_remote_code),
                                revision=None if revision in (None, "main") else str(revision))
            pretrained, tokenizer = loaded.model, loaded.tokenizer
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.mode, self.k = str(mode), int(k)
        self.handle = apply_gates(self.model, gates if mode in ("gate", "random") else None, k=self.k, mode=self.mode,
                                  random_seed=None if random_seed is None else int(random_seed),
                                  selection=str(selection), block_size=int(block_size))

    def remove(self) -> None:
        """Give the model its own attention back."""
        self.handle.remove()
