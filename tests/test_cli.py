"""The console script end to end, as a user runs it: through `main`, what the console script
calls, in this process (a Python start-up that imports torch and transformers takes 3-10 s on
the CI machine, and these tests run about fifty commands), and in subprocesses where the entry
point itself or a signal is what is tested."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from moe_runtime.cli.main import main
from moe_runtime.policies import POLICIES
from moe_runtime.trace import load_trace


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`moe-runtime ARGS`: its exit status and what it printed (argparse's usage errors exit 2)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    result = subprocess.CompletedProcess(["moe-runtime", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"moe-runtime {' '.join(args)} failed ({code}):\n{result.stderr}")
    return result


def test_help_lists_the_subcommands():
    """The installed entry point, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-m", "moe_runtime.cli.main", "--help"], capture_output=True, text=True, timeout=600, check=True).stdout
    for command in ("info", "trace", "trace-info", "generate", "demo"):
        assert command in out


def test_info_reports_shape_and_budget(tiny_checkpoints):
    info = json.loads(run_cli("info", str(tiny_checkpoints["qwen2_moe"]), "--budget", "0.25", "--json").stdout)
    assert (info["model_type"], info["num_moe_layers"], info["num_experts"], info["top_k"]) == ("qwen2_moe", 3, 8, 2)
    assert info["bytes_per_expert"] == 3 * 64 * 48 * 4
    assert info["experts_in_budget"] == 6 and info["budget_fraction_of_experts"] == 0.25
    table = run_cli("info", str(tiny_checkpoints["qwen2_moe"])).stdout
    assert "bytes_per_expert" in table and "KiB" in table


def test_trace_from_text_and_jsonl_prompts(tmp_path):
    from moe_runtime.cli.trace_cmds import load_tokenizer
    from moe_runtime.embedded import embedded_model_dir

    model_dir = embedded_model_dir()
    text = tmp_path / "prompts.txt"
    text.write_text("the law of the sea\n\nsummarise this paragraph please\n")
    out = tmp_path / "trace.npz"
    summary = json.loads(run_cli("trace", str(model_dir), "--prompts", str(text), "--out", str(out), "--task", "t", "--json").stdout)
    trace = load_trace(out)
    assert trace.num_sequences == 2 and trace.task == "t" and summary["tokens"] == trace.num_tokens
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"input_ids": [5, 6, 7, 8]}\n{"text": "hello"}\n')
    run_cli("trace", str(model_dir), "--prompts", str(jsonl), "--out", str(tmp_path / "t2.npz"))
    hello = len(load_tokenizer(str(model_dir))("hello", add_special_tokens=False)["input_ids"])
    assert np.diff(load_trace(tmp_path / "t2.npz").seq_offsets).tolist() == [4, hello]


def test_generate_with_the_policy_fitted_on_a_recorded_trace(tmp_path, trace_paths):
    from moe_runtime.embedded import embedded_model_dir

    model_dir = embedded_model_dir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the law of the sea\n\nsummarise this paragraph please\n")
    run_cli("trace", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "task.npz"))
    args = ("generate", str(model_dir), "--budget", "0.25", "--prompt", "Hello", "--max-new-tokens", "6")
    result = json.loads(run_cli(*args, "--policy-fit", str(tmp_path / "task.npz"), "--json").stdout)
    assert result["new_tokens"] == 6 and result["stats"]["policy"] == "adaptive" and result["stats"]["policy_fit_tokens"] > 0
    refused = run_cli(*args, "--policy", "lru", "--policy-fit", str(tmp_path / "task.npz"), check=False)
    assert refused.returncode == 2 and "policy_fit fits the adaptive / next-use / pinned policies, not 'lru'" in refused.stderr
    other_model = run_cli(*args, "--policy-fit", str(trace_paths["law"]), check=False)
    assert other_model.returncode == 2 and "recorded on 26 MoE layers x 64 experts" in other_model.stderr


def test_trace_info_on_shared_traces(trace_paths):
    summary = json.loads(run_cli("trace-info", str(trace_paths["law"]), str(trace_paths["intent"]), "--json").stdout)
    assert summary["layers"] == 26 and summary["tasks"] == ["intent", "law"]
    assert 0.2 < summary["reuse_rate"] < 0.4 and len(summary["per_layer"]) == 26


def test_errors_are_clear_and_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, expert_ids=np.zeros((3, 2), dtype=np.int16))
    result = run_cli("trace-info", str(bad), check=False)
    assert result.returncode == 2 and "lacks the array(s)" in result.stderr
    result = run_cli("info", str(tmp_path), check=False)
    assert result.returncode == 2 and "has no config.json" in result.stderr


@pytest.mark.slow
def test_demo_runs_on_the_embedded_model():
    result = json.loads(run_cli("demo", "--json").stdout)
    assert result["routing"]["layers"] == 6 and result["routing"]["experts"] == 32
    stats = result["stats"]
    assert result["new_tokens"] == 48 and stats["num_slots"] == 48  # 25% of 6 x 32 experts
    assert stats["hits"] + stats["misses"] == sum(layer["hits"] + layer["misses"] for layer in stats["per_layer"])
    assert len(stats["per_layer"]) == 6 and 0 < stats["hit_rate"] < 1


def test_generate_prints_text_and_stats(tmp_path):
    from moe_runtime.embedded import embedded_model_dir

    args = ("generate", str(embedded_model_dir()), "--budget", "0.25", "--prompt", "Hello", "--max-new-tokens", "6")
    result = json.loads(run_cli(*args, "--json").stdout)
    assert result["new_tokens"] == 6 and result["stats"]["loads"] > 0
    table = run_cli(*args).stdout
    assert "hit rate" in table and "per MoE layer" in table
    result = run_cli("generate", str(embedded_model_dir()), "--budget", "1KiB", "--prompt", "x", check=False)
    assert result.returncode == 2 and "the minimum is" in result.stderr


def test_bench_interrupted_with_ctrl_c_prints_the_runs_that_finished(trace_paths, tmp_path):
    """A real SIGINT once the progress bar shows a finished run: exit 130 and the finished rows."""
    import re
    import signal
    import time

    log = tmp_path / "stderr.txt"
    args = ("bench", str(trace_paths["summary"]), "--budget", "0.1,0.25,0.5", "--policy", "all")
    with log.open("w") as stderr:
        # A shell's background job inherits SIGINT ignored (and Python then installs no
        # KeyboardInterrupt handler): give the child a terminal's default disposition.
        process = subprocess.Popen(
            [sys.executable, "-m", "moe_runtime.cli.main", *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 300
        while not re.search(r"\b[1-9]\d*/\d+\b", log.read_text()) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    runs = 3 * len(POLICIES)  # every policy at three budgets
    finished = re.search(rf"interrupted: (\d+) of {runs} runs finished", stdout)
    assert process.returncode == 130 and finished, stdout
    assert 1 <= int(finished.group(1)) < runs and "Belady" in stdout


def test_bench_reports_policies_against_belady(trace_paths, tmp_path):
    plot = tmp_path / "bench.png"
    args = ("bench", str(trace_paths["summary"]), "--budget", "0.25", "--policy", "lru,next-use", "--predictor", "affinity")
    report = json.loads(run_cli(*args, "--json", "--plot", str(plot)).stdout)
    assert report["fit"].startswith("first half") and not report["interrupted"]
    assert {(r["policy"], r["predictor"]) for r in report["results"]} == {("lru", "affinity"), ("next-use", "affinity")}
    optimum = report["belady"][0]
    for row in report["results"]:
        assert row["loads_per_token"] >= optimum["loads_per_token"]
        for key in ("hit_rate", "misses_per_token", "prefetch_hits_per_token", "wasted_prefetches_per_token", "ms_per_token"):
            assert key in row
    assert plot.stat().st_size > 10_000
    assert "Belady" in run_cli(*args).stdout


def test_bench_models_load_host_and_hybrid_execution(trace_paths):
    args = ("bench", str(trace_paths["intent"]), "--budget", "0.25", "--execution", "all", "--host-gbps", "40")
    report = json.loads(run_cli(*args, "--json").stdout)
    ms = {row["execution"]: row["ms_per_token"] for row in report["results"]}
    assert set(ms) == {"device", "host", "hybrid"} and ms["hybrid"] < min(ms["device"], ms["host"])
    assert report["timing"]["host_ms"] == pytest.approx(17.3e6 / 40e9 * 1e3)
    table = run_cli(*args).stdout
    assert "exec" in table and "hybrid" in table and max(len(line) for line in table.splitlines()) <= 80
    result = run_cli("bench", str(trace_paths["intent"]), "--execution", "gpu", check=False)
    assert result.returncode == 2 and "unknown execution 'gpu'" in result.stderr


def test_bench_with_fit_traces_and_bad_input(trace_paths, tmp_path):
    report = json.loads(run_cli("bench", str(trace_paths["law"]), "--fit", str(trace_paths["intent"]), "--budget", "0.5", "--policy", "pinned", "--json").stdout)
    assert report["fit"] == "--fit traces" and report["results"][0]["policy"] == "pinned"
    result = run_cli("bench", str(trace_paths["law"]), "--policy", "fifo", check=False)
    assert result.returncode == 2 and "unknown policy 'fifo'" in result.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, expert_ids=np.zeros((4, 2, 2), dtype=np.int16), gate_weights=np.zeros((4, 2, 2), dtype=np.float16), seq_offsets=np.array([0, 4]), num_experts=np.int64(2), top_k=np.int64(3))
    result = run_cli("bench", str(bad), check=False)
    assert result.returncode == 2 and "top_k = 3 but expert_ids has 2" in result.stderr


def test_predictor_fit_then_eval_on_held_out_sequences(trace_paths, tmp_path):
    from moe_runtime.trace import load_trace

    fit, held_out = load_trace(trace_paths["summary"]).split(0.5)
    fit_path, held_path, out = fit.save(tmp_path / "fit.npz"), held_out.save(tmp_path / "held.npz"), tmp_path / "learned.npz"
    summary = json.loads(run_cli("predictor", "fit", str(fit_path), "--kind", "learned", "--out", str(out), "--lookahead", "1,2", "--json").stdout)
    assert summary["fit_seconds"] < 300 and out.is_file()
    report = json.loads(run_cli("predictor", "eval", str(out), str(held_path), "--lookahead", "1,2", "--m", "K,2K", "--json").stdout)
    rows = {(r["lookahead"], r["m"]): r for r in report["results"]}
    assert set(rows) == {(1, 6), (1, 12), (2, 6), (2, 12)}
    assert rows[(1, 12)]["recall"] >= rows[(1, 6)]["recall"] > 0.5
    assert len(rows[(1, 6)]["per_layer_recall"]) == 25
    refused = run_cli("predictor", "eval", str(out), str(fit_path), check=False)
    assert refused.returncode == 2 and "used to fit this predictor" in refused.stderr


def test_profile_make_match_and_eval(trace_paths, tmp_path):
    from moe_runtime.trace import load_trace

    fits = {}
    for task in ("law", "translation"):
        fit, held = load_trace(trace_paths[task]).split(0.5)
        fits[task] = (fit.save(tmp_path / f"{task}-fit.npz"), held.save(tmp_path / f"{task}-held.npz"))
        made = json.loads(run_cli("profile", str(fits[task][0]), "--task", task, "--keep", "0.5", "--out", str(tmp_path / f"{task}.json"), "--json").stdout)
        assert made["kept_share"] == 0.5 and min(made["kept_per_layer"]) >= 6
    profiles = [str(tmp_path / "law.json"), str(tmp_path / "translation.json")]
    matches = json.loads(run_cli("profile", "match", *profiles, "--trace", str(fits["law"][1]), "--tokens", "16", "--json").stdout)["matches"]
    assert [m["task"] for m in matches] == ["law"] * len(matches)
    figures = json.loads(run_cli("profile", "eval", profiles[0], "--trace", str(fits["law"][1]), "--json").stdout)
    assert 0.6 < figures["retained_gate_mass"] <= 1 and 0 < figures["selection_coverage"] <= 1
    refused = run_cli("profile", "eval", profiles[0], "--trace", str(tmp_path / "other-shape.npz"), check=False)
    assert refused.returncode == 2 and "no trace file" in refused.stderr


def test_info_reports_what_a_profile_keeps():
    from moe_runtime.embedded import embedded_model_dir
    from moe_runtime.profiles import PROFILES_DIR

    info = json.loads(run_cli("info", str(embedded_model_dir()), "--profile", str(PROFILES_DIR / "embedded" / "code.json"), "--json").stdout)
    assert info["kept_experts"] == 96 and info["pruned_experts"] == 96
    assert info["kept_expert_bytes"] == info["total_expert_bytes"] // 2
    refused = run_cli("info", str(embedded_model_dir()), "--profile", str(PROFILES_DIR / "esft-vanilla-lite" / "law.json"), check=False)
    assert refused.returncode == 2 and "made for (L, E, K) = (26, 64, 6)" in refused.stderr


def test_place_writes_plans_and_refuses_infeasible_budgets(trace_paths, tmp_path):
    out = tmp_path / "plan.json"
    plan = json.loads(run_cli("place", str(trace_paths["summary"]), "--gpus", "2", "--eval", str(trace_paths["intent"]), "--out", str(out), "--json").stdout)
    assert plan["kind"] == "multi_gpu" and plan["method"] == "search" and plan["cut_fraction"] < plan["naive_cut_fraction"]
    assert "held_out_cut_fraction" in plan and json.loads(out.read_text())["gpus"] == 2
    refused = run_cli("place", str(trace_paths["summary"]), "--gpus", "3", "--out", str(out), check=False)
    assert refused.returncode == 2 and "G must divide E" in refused.stderr
    refused = run_cli("place", str(trace_paths["summary"]), "--gpu-budget", "4", "--host-budget", "0.5", "--out", str(out), check=False)
    assert refused.returncode == 2 and "fewer than top-k = 6: short by 2" in refused.stderr


def test_bench_live_replays_real_routing_through_the_engine_and_the_simulator_agrees(trace_paths):
    args = ("bench", str(trace_paths["law"]), "--live", "--scale", "64", "--tokens", "12", "--budget", "0.1,0.25", "--policy", "lru")
    report = json.loads(run_cli(*args, "--json").stdout)
    assert set(report["constants"]["law"]) == {"layer_ms", "load_ms", "bytes_per_expert"}
    for row in report["live"]:
        assert row["arch"] == "deepseek-v2-lite" and row["tokens"] == 12  # chosen from the trace's (L, E, K)
        assert row["measured_loads_per_token"] == row["simulated_loads_per_token"] > 0  # the same decisions
        assert row["measured_ms_per_token"] > 0 and row["simulated_ms_per_token"] > 0 and row["disk_bytes_per_token"] > 0
    result = run_cli("bench", str(trace_paths["law"]), "--live", "--arch", "gpt-oss-20b", "--scale", "64", check=False)
    assert result.returncode == 2 and "routes (L, E, K) = (24, 32, 4)" in result.stderr


def test_bench_simulates_quantized_experts_with_their_bytes(trace_paths):
    args = ("bench", str(trace_paths["intent"]), "--budget", "0.25", "--json")
    plain = json.loads(run_cli(*args).stdout)
    int4 = json.loads(run_cli(*args, "--quantize", "int4").stdout)
    assert int4["results"][0]["loads_per_token"] == plain["results"][0]["loads_per_token"]  # the same decisions
    assert int4["results"][0]["ms_per_token"] < plain["results"][0]["ms_per_token"]  # each load moves 0.28x the bytes
    assert run_cli("bench", str(trace_paths["intent"]), "--quantize", "int2", check=False).returncode == 2


def test_bench_live_with_int8_experts_or_int8_misses(trace_paths):
    args = ("bench", str(trace_paths["law"]), "--live", "--scale", "64", "--tokens", "6", "--budget", "0.25", "--policy", "lru")
    plain, int8 = (json.loads(run_cli(*args, *extra, "--json").stdout) for extra in ((), ("--quantize", "int8", "--uncached")))
    assert int8["live"][0]["quantize"] == "int8" and plain["live"][0]["quantize"] == "none"
    assert int8["constants"]["law"]["bytes_per_expert"] < 0.56 * plain["constants"]["law"]["bytes_per_expert"]
    assert int8["live"][0]["measured_loads_per_token"] == int8["live"][0]["simulated_loads_per_token"] == plain["live"][0]["measured_loads_per_token"]
    assert int8["live"][0]["disk_bytes_per_token"] < 0.56 * plain["live"][0]["disk_bytes_per_token"]
    mixed = json.loads(run_cli(*args, "--miss-precision", "int8", "--json").stdout)["live"][0]
    assert mixed["quantize"] == "none, misses int8"
    assert mixed["stall_ms_per_token"] < plain["live"][0]["stall_ms_per_token"]  # misses never wait for a load


def test_evaluate_scores_quantized_experts_against_the_unquantized_model(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Mixture-of-Experts models route each token to a few experts. " * 20)
    report = json.loads(run_cli("evaluate", "embedded", "--text", str(text), "--quantize", "int8", "--budget", "0.5", "--tokens", "200", "--json").stdout)
    assert report["tokens"] == 199 and report["perplexity"] > 1 and report["quantize"] == "int8"
    assert 0 <= report["kl_to_reference"] < 0.01 and report["top1_agreement"] > 0.9
    assert "perplexity" in run_cli("evaluate", "embedded", "--text", str(text), "--tokens", "50", "--no-reference").stdout
    result = run_cli("evaluate", "embedded", "--text", str(tmp_path / "missing.txt"), check=False)
    assert result.returncode == 2 and "missing.txt" in result.stderr
