"""Gates on the Hugging Face hub, as PEFT adapters are: ``user/repo[@revision]`` resolves to a local folder through
``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN``), and ``push_gates`` uploads a gate folder's
files with a generated model card, never its training checkpoint."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import UserError, first_line
from .io import GATE_CONFIG_NAME, GATE_WEIGHTS_NAME

EVAL_NAME = "eval.json"  # `sparsify eval --output` writes this; a copy in the gate folder goes on the model card
CARD_NAME = "README.md"
HUB_FILES = (GATE_CONFIG_NAME, GATE_WEIGHTS_NAME, CARD_NAME, EVAL_NAME)
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_ref(ref: str | Path) -> bool:
    """Whether ``ref`` names a hub repository (``user/repo`` or ``user/repo@revision``) rather than a folder."""
    text = str(ref)
    return not Path(text).expanduser().exists() and not text.startswith((".", "/", "~")) and bool(_REPO.match(text))


def resolve_gates(ref: str | Path) -> Path:
    """The local folder of a gate: ``ref`` itself, or the hub repository's files in the local cache (downloaded
    unless offline). Raises UserError when the hub cannot give it."""
    if not is_hub_ref(ref):
        return Path(ref)
    from huggingface_hub import snapshot_download

    repo_id, _, revision = str(ref).partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(HUB_FILES)))
    except Exception as e:  # noqa: BLE001 - offline, not found, gated, no network: one clear line
        raise UserError(f"no gate folder {ref} here, and the Hugging Face hub did not give a repository of that "
                        f"name ({type(e).__name__}: {first_line(e, 160)}); pass a gate folder, or a hub repository "
                        "user/name[@revision] (online, or in the local cache when HF_HUB_OFFLINE=1)") from None


def model_card(config: dict, report: dict | None = None) -> str:
    """The README.md of a pushed gate: what it was distilled from, its shape, and the eval table if any."""
    base = config.get("base_model_hub_id") or config.get("base_model")
    lines = ["---", "library_name: posthoc-sparse", "tags:", "- sparse-attention", "- posthoc-sparse"]
    if config.get("base_model_hub_id"):
        lines.append(f"base_model: {config['base_model_hub_id']}")
    lines += ["---", "", f"# Top-k attention gates for {base}", "",
              "Per-head gates distilled post hoc against the frozen model's own dense attention with "
              "[posthoc-sparse](https://pypi.org/project/posthoc-sparse/). Use them with:", "", "```python",
              "from posthoc_sparse import apply_gates", "",
              f"with apply_gates(model, \"<this repo>\", k={config.get('k', 64)}):", "    out = model.generate(...)",
              "```", "", "| setting | value |", "|---|---|"]
    rows = [("base model", base), ("base model revision", config.get("base_model_revision")),
            ("k (keys kept per query)", config.get("k")), ("gate dimension d_g", config.get("d_g")),
            ("gate input", config.get("gate_input")), ("layers x heads", f"{config.get('num_layers')} x "
                                                                        f"{config.get('num_heads')}"),
            ("distillation steps", config.get("steps")), ("loss", config.get("loss")),
            ("text", config.get("dataset")), ("window", config.get("seq_len")),
            ("library version", config.get("library_version"))]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    if report and report.get("summary"):
        setup = report.get("setup", {})
        lines += ["", f"## Closed-loop perplexity ({setup.get('tokens_scored', '?')} held-out tokens, "
                      f"T = {setup.get('seq_len', '?')})", "",
                  "| k | dense | oracle | gate | random | gate / oracle |", "|---|---|---|---|---|---|"]
        for row in report["summary"]:
            cells = [row.get(key) for key in ("dense", "oracle", "gate", "random", "gate_over_oracle")]
            lines.append(f"| {row['k']} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def push_gates(gates: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
               commit_message: str | None = None, eval_report: str | Path | None = None) -> str:
    """Upload a gate folder's files (config, weights, a generated model card, and ``eval.json`` if given or
    beside them) to ``repo_id``, created if needed; returns the commit's URL. Nothing else of the folder goes
    (no ``checkpoint/``, no snapshots, no logs)."""
    from huggingface_hub import HfApi

    from .io import load_gates

    folder = Path(gates)
    _, config = load_gates(folder)  # the same strict checks a user's load will make
    report_path = Path(eval_report) if eval_report is not None else folder / EVAL_NAME
    report = None
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{report_path} is not valid JSON ({e})") from None
    elif eval_report is not None:
        raise UserError(f"eval report {report_path} does not exist; pass the eval.json that `sparsify eval` wrote")
    with tempfile.TemporaryDirectory(prefix="posthoc-sparse-push-") as tmp:
        stage = Path(tmp)
        for name in (GATE_CONFIG_NAME, GATE_WEIGHTS_NAME):
            shutil.copyfile(folder / name, stage / name)
        if report is not None:
            shutil.copyfile(report_path, stage / EVAL_NAME)
        (stage / CARD_NAME).write_text(model_card(config, report))
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), revision=revision,
                                     commit_message=commit_message or f"Upload top-k gates (k={config.get('k')})")
        except Exception as e:  # noqa: BLE001 - auth, network, permissions: one clear line
            if type(e).__name__ == "OfflineModeIsEnabled":  # no login would help
                raise UserError(f"could not push to {repo_id}: the hub is in offline mode (HF_HUB_OFFLINE or "
                                "TRANSFORMERS_OFFLINE is set) and a push needs the network; unset it, then push "
                                "again") from None
            raise UserError(f"could not push to {repo_id} ({type(e).__name__}: {first_line(e, 200)}); log in with "
                            "`hf auth login` or set HF_TOKEN, and check the repository name") from None
    return str(getattr(info, "commit_url", info))


@dataclass(frozen=True)
class PushConfig:
    """``sparsify push``: upload a gate folder to the hub (the gate files and a model card; never checkpoint/)."""

    gates: str | None = option(None, "Gate folder written by `sparsify distill`.")
    repo: str | None = option(None, "Hub repository to create or update: user/name (or org/name).")
    private: bool = option(False, "Create the repository private.")
    revision: str | None = option(None, "Branch to push to; if not given, main.")
    eval_report: str | None = option(None, "An eval.json from `sparsify eval --output` to put on the model card; if "
                                           "not given, the gate folder's own eval.json, if any.", flags="--eval")
    commit_message: str | None = option(None, "Commit message; if not given, one naming k.")

    def validate(self) -> None:
        if not self.gates:
            raise UserError("--gates is required: the gate folder to push")
        if not self.repo:
            raise UserError("--repo is required: the hub repository to push to, user/name (or org/name)")
        name, at, branch = self.repo.partition("@")
        if at and _REPO.match(name):
            raise UserError(f"--repo takes no @revision, got {self.repo!r}; pass --repo {name} --revision {branch}"
                            if branch else f"--repo takes no @revision, got {self.repo!r}; pass --repo {name}")
        if not _REPO.match(self.repo):
            raise UserError(f"--repo must be a hub repository user/name (or org/name), got {self.repo!r}")
        if not Path(self.gates).is_dir():
            raise UserError(f"--gates {self.gates} is not a folder; pass the folder `sparsify distill` wrote")


def push(cfg: PushConfig) -> str:
    """``push_gates`` with the settings of ``cfg``; returns the commit's URL."""
    cfg.validate()
    return push_gates(cfg.gates, cfg.repo, private=cfg.private, revision=cfg.revision,
                      commit_message=cfg.commit_message, eval_report=cfg.eval_report)
