"""Every command answers bad input with exit status 2 and a message naming the file and the fix.

The console script's own `main` runs in this process (the subprocess tests in test_cli.py cover
the installed script); each case checks the status, the message, and that no work was done.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from moe_runtime import load_trace
from moe_runtime.bench import BenchSettings, run_bench
from moe_runtime.cli.bench_cmd import hit_rate_figure, replay_table
from moe_runtime.cli.main import build_parser, main
from moe_runtime.embedded import embedded_model_dir
from moe_runtime.predictor import make_predictor, save_predictor


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, trace_paths) -> dict[str, Path]:
    """A truncated trace, a corrupt (flipped-byte) trace, a non-zip file, a truncated predictor, bad JSON."""
    folder = tmp_path_factory.mktemp("damaged")
    shipped = trace_paths["law"].read_bytes()
    flipped = bytearray(shipped)
    flipped[len(flipped) // 2] ^= 0xFF
    predictor = save_predictor(make_predictor("popularity").fit(load_trace(trace_paths["law"])), folder / "p.npz").read_bytes()
    files = {
        "truncated.npz": shipped[: len(shipped) // 3],
        "corrupt.npz": bytes(flipped),
        "text.npz": b"hello, not a zip",
        "predictor.npz": predictor[: len(predictor) // 2],
        "plan.json": b'{"kind": "tiering", "tier_of": [[',
        "profile.json": b"not json at all",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.mark.parametrize("trace", ["truncated.npz", "corrupt.npz", "text.npz"])
def test_damaged_traces_are_named_in_every_command(capsys, damaged, tmp_path, trace):
    path = str(damaged[trace])
    commands = [
        ["trace-info", path],
        ["bench", path, "--budget", "0.25"],
        ["predictor", "fit", path, "--kind", "popularity", "--out", str(tmp_path / "p.npz")],
        ["predictor", "eval", "popularity", path],
        ["place", path, "--disk-layout", "--out", str(tmp_path / "plan.json")],
        ["profile", path, "--task", "t", "--keep", "0.5", "--out", str(tmp_path / "p.json")],
        ["trace", "split", path, "--out-fit", str(tmp_path / "f.npz"), "--out-held", str(tmp_path / "h.npz")],
    ]
    for argv in commands:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert path in err and "truncated" in err and "moe-runtime trace" in err, (argv, err)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_generate_policy_fit_with_a_damaged_trace(capsys, damaged):
    code, _, err = run(capsys, "generate", str(embedded_model_dir()), "--budget", "0.25", "--prompt", "x", "--policy-fit", str(damaged["truncated.npz"]))
    assert code == 2 and "truncated" in err


def test_damaged_predictor_plan_and_profile_files(capsys, damaged, trace_paths):
    code, _, err = run(capsys, "predictor", "eval", str(damaged["predictor.npz"]), str(trace_paths["law"]))
    assert code == 2 and str(damaged["predictor.npz"]) in err and "predictor fit" in err
    code, _, err = run(capsys, "info", str(embedded_model_dir()), "--profile", str(damaged["profile.json"]))
    assert code == 2 and "not valid JSON" in err
    from moe_runtime.placement import load_plan

    with pytest.raises(ValueError, match="not valid JSON"):
        load_plan(damaged["plan.json"])


def test_unwritable_outputs_are_refused_before_any_work(capsys, trace_paths, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (
        ["predictor", "fit", str(trace_paths["law"]), "--kind", "learned", "--out", str(blocker / "p.npz")],
        ["bench", str(trace_paths["law"]), "--policy", "all", "--predictor", "all", "--plot", str(blocker / "p.png")],
        ["place", str(trace_paths["law"]), "--gpus", "2", "--out", str(blocker / "plan.json")],
    ):
        start = time.perf_counter()
        code, _, err = run(capsys, *argv)
        assert code == 2 and "is not writable" in err and "a-file is a file" in err, err
        assert time.perf_counter() - start < 2.0, "the work ran before the output was checked"


def test_missing_model_folder_and_tokens_outside_the_vocabulary(capsys, tmp_path):
    for command in (["generate", str(tmp_path / "nope"), "--budget", "0.5", "--prompt", "x"], ["info", str(tmp_path / "nope")]):
        code, _, err = run(capsys, *command)
        assert code == 2 and "no such folder" in err and "tokenizer" not in err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [1, 2, 99999]}\n')
    code, _, err = run(capsys, "trace", str(embedded_model_dir()), "--prompts", str(prompts), "--out", str(tmp_path / "t.npz"))
    assert code == 2 and "outside the model's vocabulary" in err


def test_bench_per_layer_slots_below_top_k_or_with_prefetching(capsys, trace_paths):
    code, _, err = run(capsys, "bench", str(trace_paths["law"]), "--per-layer-slots", "1")
    assert code == 2 and "--per-layer-slots 1 is below law's top-k = 6" in err
    code, _, err = run(capsys, "bench", str(trace_paths["law"]), "--per-layer-slots", "8", "--predictor", "learned")
    assert code == 2 and "without prefetching" in err


def test_trace_split_by_sequence(capsys, trace_paths, tmp_path):
    code, out, _ = run(capsys, "trace", "split", str(trace_paths["law"]), "--fit", "0.5", "--out-fit", str(tmp_path / "f.npz"), "--out-held", str(tmp_path / "h.npz"), "--json")
    assert code == 0
    fit, held = load_trace(tmp_path / "f.npz"), load_trace(tmp_path / "h.npz")
    expected_fit, expected_held = load_trace(trace_paths["law"]).split(0.5)
    assert np.array_equal(fit.expert_ids, expected_fit.expert_ids) and np.array_equal(held.expert_ids, expected_held.expert_ids)
    assert json.loads(out)["held"]["sequences"] == held.num_sequences


@pytest.fixture(scope="module")
def bench_report(trace_paths) -> dict:
    traces = {name: load_trace(trace_paths[name]).select_sequences(range(6)) for name in ("translation", "intent")}
    settings = BenchSettings(budgets=(0.1, 0.25), policies=("next-use", "lru"), predictors=("none", "previous-token"))
    return run_bench(traces, settings)


def test_bench_table_fits_80_columns_without_cutting_a_cell(bench_report):
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(replay_table(bench_report, wide=False))
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "previous-token" in text and "translation" in text


def test_the_plot_legend_names_every_line_even_when_interrupted(bench_report):
    interrupted = {**bench_report, "results": bench_report["results"][:3]}  # the second trace has only Belady
    figure = hit_rate_figure(interrupted)
    labels = {text.get_text() for legend in figure.legends for text in legend.get_texts()}
    drawn = {line.get_label() for axis in figure.axes for line in axis.get_lines()}
    assert labels == drawn and "Belady (MIN)" in labels and len(labels) >= 2


def test_plot_prints_where_it_wrote(capsys, trace_paths, tmp_path):
    code, _, err = run(capsys, "bench", str(trace_paths["translation"]), "--budget", "0.25", "--plot", str(tmp_path / "hit.png"))
    assert code == 0 and f"plot written to {tmp_path / 'hit.png'}" in err and (tmp_path / "hit.png").stat().st_size > 0


def test_every_flag_has_help_and_shows_its_default():
    def parsers(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {verb}")

    for name, parser in parsers(build_parser(), "moe-runtime"):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):  # a list of verbs, each with its own help
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if name == "moe-runtime bench":
            assert "(default: 0.1,0.25,0.5)" in parser.format_help()


def test_generate_offers_only_the_policies_it_accepts(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--budget", "1", "--prompt", "p", "--policy", "pinned"])
    assert "invalid choice: 'pinned'" in capsys.readouterr().err


def test_trace_info_shows_moe_layers_and_model_type(capsys, tmp_path, trace_paths):
    from dataclasses import replace

    trace = replace(load_trace(trace_paths["law"]), model_type="deepseek_v2", moe_layers=tuple(range(1, 27)))
    trace.save(tmp_path / "t.npz")
    code, out, _ = run(capsys, "trace-info", str(tmp_path / "t.npz"))
    assert code == 0 and "deepseek_v2" in out and "decoder layer" in out
    code, out, _ = run(capsys, "trace-info", str(trace_paths["law"]))
    assert "model_type" not in out and "decoder layer" not in out
    assert repr(load_trace(trace_paths["law"])) == "Trace(tokens=5039, sequences=17, layers=26, experts=64, top_k=6)"


def test_a_benchmark_refuses_an_unwritable_output_in_one_line_before_its_runs(tmp_path):
    """The benchmark scripts end on a user's mistake as the commands do (errors.run_script): a JSON
    path below a regular file is refused before any replay, status 2, no traceback."""
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "short_sessions.py"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "--json", str(blocker / "out.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("short_sessions.py: error: output file") and "is a file, not a folder" in done.stderr
    assert time.perf_counter() - started < 60 and not done.stdout  # refused up front: no replay ran, no table printed


@pytest.mark.parametrize(("raised", "status", "said"), [
    (KeyboardInterrupt(), 130, "script: interrupted"),
    (FileNotFoundError("no trace at x.npz"), 2, "script: error: no trace at x.npz"),
])
def test_run_script_ends_on_interrupts_and_missing_files_in_one_line(capsys, monkeypatch, raised, status, said):
    from moe_runtime.errors import run_script

    monkeypatch.setattr("sys.argv", ["/somewhere/script"])

    def main() -> None:
        raise raised

    with pytest.raises(SystemExit) as exited:
        run_script(main)
    assert exited.value.code == status and capsys.readouterr().err.strip() == said


def test_run_script_keeps_the_traceback_of_a_fault_of_ours():
    from moe_runtime.errors import run_script

    def main() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_script(main)
