"""lm-evaluation-harness, offline: a tiny multiple-choice task (a task YAML over a local JSON Lines file) scored on the
tiny trained model, by `sparsify lm-eval` (every mode side by side), by the registered model type `sparsify`, and by
lm_eval's own command line through `python -m sparsify_cli.lm_eval`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from posthoc_sparse.evaluate.harness import TasksConfig, evaluate_tasks  # noqa: E402

from .tiny import WORDS, tiny_tokenizer  # noqa: E402

TASK = "tiny_repeat"
N_DOCS = 12


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with tiny_repeat.yaml and its documents: a 6-word phrase, repeated, cut after 2 to 5 words of the
    repeat; the answer is the phrase's next word among 4 choices (the trained tiny model copies phrases)."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    docs = []
    for _ in range(N_DOCS):
        phrase = rng.sample(WORDS, 6)
        cut = rng.randint(2, 5)
        answer = phrase[cut % 6]
        wrong = rng.sample([w for w in WORDS if w not in phrase], 3)
        choices = [answer, *wrong]
        rng.shuffle(choices)
        docs.append({"context": " ".join(phrase * 2 + phrase[:cut]), "choices": choices,
                     "label": choices.index(answer)})
    data = root / "tiny_repeat.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_repeat.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return root, docs


def _manual_accuracy(model_dir, docs) -> float:
    """The accuracy by hand: the choice with the largest log-likelihood after the context, dense attention."""
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), tiny_tokenizer()
    right = 0
    for d in docs:
        ctx = tok(d["context"])["input_ids"]
        scores = []
        for choice in d["choices"]:
            cont = tok(" " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += max(range(len(scores)), key=scores.__getitem__) == d["label"]
    return right / len(docs)


@pytest.fixture(scope="module")
def report(tiny_gates, task_dir, tmp_path_factory):
    model, _, gates = tiny_gates
    out = tmp_path_factory.mktemp("lm-eval") / "r"
    return evaluate_tasks(TasksConfig(tasks=TASK, include_path=str(task_dir[0]), gates=str(gates), k="2",
                                      output=str(out)))


def test_every_mode_side_by_side_and_dense_is_the_models_own_choice(tiny_gates, task_dir, report):
    (row,) = [r for r in report.summary if r["task"] == TASK]
    assert (row["metric"], row["k"]) == ("acc", 2)
    dense = _manual_accuracy(tiny_gates[0], task_dir[1])
    assert dense > 0.5  # the model copies the phrase: the task measures attention
    assert row["dense"] == pytest.approx(dense)
    assert row["oracle"] > row["random"]  # 2 keys of the true top-2 still find the phrase; 2 random ones do not
    for mode in ("dense", "oracle", "gate", "random"):
        assert 0 <= row[mode] <= 1 and row[f"{mode}_stderr"] >= 0
    assert report.setup["n_samples"][TASK]["effective"] == N_DOCS
    doc = json.loads(open(report.files[0]).read())
    assert doc["summary"] == report.summary and set(doc["results"]) == {"dense", "oracle@2", "gate@2", "random@2"}


def test_the_registered_model_type_gives_the_same_numbers(tiny_gates, task_dir, report):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import posthoc_sparse.evaluate.lm_eval_model  # noqa: F401  (registers "sparsify")

    model, _, gates = tiny_gates
    res = lm_eval.simple_evaluate(model="sparsify", model_args=f"pretrained={model},gates={gates},k=2,mode=gate",
                                  tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir[0])),
                                  log_samples=False, bootstrap_iters=0)
    row = next(r for r in report.summary if r["k"] == 2)
    assert res["results"][TASK]["acc,none"] == pytest.approx(row["gate"])


def test_cli_lm_eval_prints_the_reports_numbers(tiny_gates, task_dir, report, tmp_path, capsys):
    from sparsify_cli.main import main

    model, _, gates = tiny_gates
    main(["lm-eval", "--tasks", TASK, "--include-path", str(task_dir[0]), "--gates", str(gates), "--k", "2",
          "--modes", "dense,gate", "--output", str(tmp_path / "r")])
    shown = capsys.readouterr().out
    row = next(r for r in report.summary if r["k"] == 2)
    assert f"{row['dense']:.4f} ± {row['dense_stderr']:.4f}" in shown and f"{row['gate']:.4f}" in shown
    assert (tmp_path / "r" / "tasks.md").exists()


def test_lm_evals_own_command_line_with_the_model_type_registered(tiny_gates, task_dir, tmp_path):
    model, _, gates = tiny_gates
    cmd = [sys.executable, "-m", "sparsify_cli.lm_eval", "--model", "sparsify", "--model_args",
           f"pretrained={model},gates={gates},k=64,mode=random", "--tasks", TASK, "--include_path",
           str(task_dir[0]), "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    written = next((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(written.read_text())["results"][TASK]["acc,none"]
    assert acc == pytest.approx(_manual_accuracy(model, task_dir[1]))  # k >= every prompt: dense


def test_unknown_task_and_missing_tasks_are_user_errors(tiny_gates):
    from posthoc_sparse.errors import UserError

    with pytest.raises(UserError, match="--tasks is required"):
        evaluate_tasks(TasksConfig(model=str(tiny_gates[0]), modes="dense"))
    with pytest.raises(UserError, match="unknown lm-evaluation-harness task no_such_task"):
        evaluate_tasks(TasksConfig(tasks="no_such_task", model=str(tiny_gates[0]), modes="dense"))
