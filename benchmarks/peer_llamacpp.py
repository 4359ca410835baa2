"""CPU decode side by side with llama.cpp, on the same random-weight checkpoint, with the bound.

llama.cpp is built from the `llama-cpp-python` source distribution on PyPI (its vendored copy:
`llama-bench`, `llama-quantize` and the `convert_hf_to_gguf.py` converter), once, into the
cache folder. The live_decode.py checkpoint (OLMoE-shaped, bf16; `--shape olmoe-1b-7b`: OLMoE-1B-7B's
full shape, 1.3 B active parameters, written a layer at a time) is converted by llama.cpp's own
converter to BF16, F16 and Q8_0 GGUF and quantized to Q4_0 by llama-quantize. A random-weight
checkpoint has no tokenizer, so a small byte-level BPE one is written beside a link to its
weights and the converter is told it pre-tokenizes like GPT-2 (tokenization plays no part in a
decode benchmark: both sides decode token ids).

Contenders alternate, round after round, each in a fresh process: llama-bench (2 threads,
64 tokens generated after a 16-token context) per format, and on our side the unwrapped
transformers model and moe-runtime `wrap` at 100% and 25% (in place on the CPU), in bf16,
cast to fp16, with int8 / int4 (group 64) experts alone or with every other linear layer
quantized too ("-all", as llama.cpp's formats do), and at full precision with exact=False
("-fast"), 16-token prompt then 64 greedy tokens. The bound is the memory-read bandwidth
measured in the same run divided by the bytes one decode step must read (every non-expert
weight but the input embedding, plus top-k/E of the experts). `--wait-policy as-set,active` runs
every contender under each OMP_WAIT_POLICY in turn (rows side by side, `wait_policy` in the JSON).
After the rounds, the ratios two targets ask about (wrap(1.0) against the unwrapped model, 25%
against 100%) are measured again as pairs whose two models run in one process, their steps
taking turns (PAIRS; `pairs` in the JSON; `--no-pairs` skips them): separate processes on a
shared VM differ by more than those ratios do.

    pip install -e ".[bench]"   # gguf's needs: sentencepiece, protobuf
    python benchmarks/peer_llamacpp.py --rounds 2 --json peer.json
    python benchmarks/peer_llamacpp.py --shape olmoe-1b-7b --formats BF16,Q8_0,Q4_0,bf16,fp16,int8,int4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from live_decode import Shape, build_checkpoint  # noqa: E402

from moe_runtime.atomic import check_writable, staging_directory, write_text_atomically  # noqa: E402
from moe_runtime.embedded import cache_root  # noqa: E402
from moe_runtime.errors import run_script  # noqa: E402
from moe_runtime.hf_cache import cache_keyword  # noqa: E402

LLAMA_FORMATS = ("BF16", "F16", "Q8_0", "Q4_0")
OURS = [("transformers", "bf16", 1.0), ("transformers", "fp16", 1.0), ("moe-runtime", "bf16", 1.0), ("moe-runtime", "fp16", 1.0),
        ("moe-runtime", "bf16", 0.25), ("moe-runtime", "fp16", 0.25), ("moe-runtime", "int8", 1.0), ("moe-runtime", "int4", 1.0),
        ("moe-runtime", "int8-all", 1.0), ("moe-runtime", "int4-all", 1.0), ("moe-runtime", "int8-all", 0.25), ("moe-runtime", "int4-all", 0.25),
        ("moe-runtime", "bf16-fast", 1.0), ("moe-runtime", "fp16-fast", 1.0), ("moe-runtime", "fp16-fast", 0.25)]
# Our quantized formats: "int8" / "int4" experts (quantize=..., expert_format.py) with the rest of
# the model in bf16; "-all": every other linear layer but the routers too (quantize_rest=...).
# "-fast": full precision with exact=False (every product by the decode kernel, the routers'
# logits too, one native call per attention: sums in another order than torch's, as llama.cpp's).
QUANTIZED = ("int8", "int4")
PROMPT, NEW_TOKENS, THREADS = 16, 64, 2
SHAPES = {  # live_decode.py's checkpoint, and OLMoE-1B-7B's shape (1.3 B active of 6.9 B parameters)
    "live-decode": Shape(),
    "olmoe-1b-7b": Shape(hidden_size=2048, intermediate_size=1024, num_layers=16),
}


# ---------------------------------------------------------------- llama.cpp, built once
def llama_tree(root: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist, with llama-bench and llama-quantize built."""
    tree = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if tree is None:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-deps", "--no-binary", ":all:", "-d", str(root)], check=True)
        unpacking = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=root))  # an interrupted unpack is never trusted
        with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(unpacking, filter="data")
        for folder in unpacking.iterdir():
            folder.rename(root / folder.name)
        unpacking.rmdir()
        tree = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not (tree / "build" / "bin" / "llama-bench").is_file():
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
        subprocess.run(["cmake", "-B", "build", *flags], cwd=tree, check=True)
        subprocess.run(["cmake", "--build", "build", f"-j{os.cpu_count()}", "--target", "llama-bench", "llama-quantize"], cwd=tree, check=True)
    return tree


def gguf_paths(out: Path, only: set[str] | None = None) -> dict[str, Path]:
    """Where each of LLAMA_FORMATS (those in `only`, when given) is converted to; refused, before
    any work, when Q4_0 is to be made without the 16-bit file it is quantized from."""
    files = {name: out / f"model-{name.lower()}.gguf" for name in LLAMA_FORMATS if only is None or name in only}
    if "Q4_0" in files and not files["Q4_0"].is_file() and not {"F16", "BF16"} & set(files):
        raise ValueError("Q4_0 is quantized from the F16 or BF16 file: add one of them to --formats")
    return files


def gguf_files(tree: Path, checkpoint: Path, files: dict[str, Path]) -> dict[str, Path]:
    """The checkpoint converted once into each of `files` (gguf_paths; none: nothing to do)."""
    if not files:
        return files
    out = next(iter(files.values())).parent
    out.mkdir(parents=True, exist_ok=True)
    source = out / "hf"
    if not (source / "tokenizer.json").is_file():
        source.mkdir(exist_ok=True)
        for item in checkpoint.iterdir():
            target = source / item.name
            if not target.exists():
                target.symlink_to(item)
        byte_level_tokenizer(source)
    for name in ("BF16", "F16", "Q8_0"):
        if name in files and not files[name].is_file():
            convert = "import runpy, sys; sys.path.insert(0, sys.argv[1]); from conversion.base import TextModel; " \
                      "TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; sys.argv = sys.argv[2:]; " \
                      "runpy.run_path(sys.argv[0], run_name='__main__')"
            temporary = files[name].with_suffix(".tmp")
            subprocess.run([sys.executable, "-c", convert, str(tree), str(tree / "convert_hf_to_gguf.py"), str(source),
                            "--outtype", name.lower(), "--outfile", str(temporary)], check=True)
            temporary.rename(files[name])
    if "Q4_0" in files and not files["Q4_0"].is_file():
        temporary = files["Q4_0"].with_suffix(".tmp")
        source = files.get("F16", files.get("BF16"))  # llama-quantize takes either (checked above)
        subprocess.run([str(tree / "build" / "bin" / "llama-quantize"), str(source), str(temporary), "Q4_0"], check=True)
        temporary.rename(files["Q4_0"])
    return files


def byte_level_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer (trained on this file) saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)


def llama_bench(tree: Path, model: Path, env: dict[str, str]) -> float:
    """Generation tok/s of llama-bench: NEW_TOKENS tokens after a PROMPT-token context, THREADS threads."""
    command = [str(tree / "build" / "bin" / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(NEW_TOKENS), "-d", str(PROMPT),
               "-t", str(THREADS), "-r", "2", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(json.loads(done.stdout)[0]["avg_ts"])


# OMP_WAIT_POLICY for the contenders' processes ("as-set": the environment's own). Ours runs an
# OpenMP parallel region per kernel call, several a layer, with the interpreter between them;
# llama.cpp's threads wait for each other in ggml's own spinning barrier within a token.
WAIT_POLICIES = ("as-set", "active", "passive")


def environment(policy: str) -> dict[str, str]:
    """The contenders' environment under `policy`."""
    env = dict(os.environ)
    if policy != "as-set":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


# ---------------------------------------------------------------- our side, one process per row
def loaded(checkpoint: Path, contender: str, dtype: str, budget: float):
    """The checkpoint as `contender` runs it: transformers' model in `dtype`, or wrapped."""
    import torch
    from transformers import AutoModelForCausalLM

    import moe_runtime

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    if dtype.startswith("fp16"):
        model = model.half()
    if contender == "moe-runtime":
        experts = dtype.removesuffix("-all")
        quantize = experts if experts in QUANTIZED else None
        exact = False if dtype.endswith("-fast") else None
        moe_runtime.wrap(model, budget=budget, device="cpu", quantize=quantize, quantize_rest=quantize if dtype.endswith("-all") else None, exact=exact)
    return model


def prompt_ids():
    import torch

    return torch.randint(3, 50000, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def ours(checkpoint: Path, contender: str, dtype: str, budget: float) -> float:
    from moe_runtime.generation import time_generation

    model = loaded(checkpoint, contender, dtype, budget)
    time_generation(model, prompt_ids(), 4)
    return time_generation(model, prompt_ids(), NEW_TOKENS).decode_tokens_per_second


# ---------------------------------------------------------------- pairs, steps interleaved in one process
# Separate processes on a shared VM differ by as much as 15-55% between rounds (BENCHMARKS.md),
# more than the ratios two targets ask about (wrap(1.0) against the unwrapped model, 25% against
# 100%). A pair's two models run in one process instead, their greedy steps taking turns, so a
# slow spell slows both alike; each side's tok/s is one over its median step.
PAIRS = [  # (what the ratio is, format, (contender, budget) measured, (contender, budget) it is measured against)
    ("wrap(1.0) / unwrapped", "bf16", ("moe-runtime", 1.0), ("transformers", 1.0)),
    ("wrap(1.0) / unwrapped", "fp16", ("moe-runtime", 1.0), ("transformers", 1.0)),
    ("25% / 100%", "int8-all", ("moe-runtime", 0.25), ("moe-runtime", 1.0)),
    ("25% / 100%", "int4-all", ("moe-runtime", 0.25), ("moe-runtime", 1.0)),
    ("25% / 100%", "fp16-fast", ("moe-runtime", 0.25), ("moe-runtime", 1.0)),
]
PAIR_ROUNDS = 3


def paired(checkpoint: Path, dtype: str, first: tuple[str, float], second: tuple[str, float]) -> list[float]:
    """[first's tok/s, second's]: both models loaded, PAIR_ROUNDS rounds of a prefill each and
    NEW_TOKENS greedy steps taking turns; one over each side's median step."""
    import statistics

    import torch
    from transformers import DynamicCache

    models = [loaded(checkpoint, contender, dtype, budget) for contender, budget in (first, second)]
    steps: list[list[float]] = [[], []]
    with torch.inference_mode():
        for _ in range(PAIR_ROUNDS):
            caches = [{cache_keyword(model): DynamicCache(config=model.config)} for model in models]  # named once: not inside the timed steps
            tokens = [model(input_ids=prompt_ids(), **cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True) for model, cache in zip(models, caches)]
            for _ in range(NEW_TOKENS):
                for side, (model, cache) in enumerate(zip(models, caches)):
                    started = time.perf_counter()
                    tokens[side] = model(input_ids=tokens[side], **cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                    steps[side].append(time.perf_counter() - started)
    return [1 / statistics.median(times) for times in steps]


QUANTIZED_SHARE = {"int8": 0.53, "int4": 0.28}  # a quantized model's bytes over its bf16 checkpoint's (with the scales)


def fits_twice(checkpoint: Path, dtype: str) -> bool:
    """Whether two models of `dtype` fit in the memory available now: twice the weights at 16
    bits; quantized, twice the copies and the bf16 weights they are made from. (At the
    OLMoE-1B-7B shape on the 24 GiB VM of BENCHMARKS.md two int4-all models fit, and two
    int8-all ones were killed for memory when only the checkpoint itself was counted.)"""
    import psutil

    weights = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
    share = QUANTIZED_SHARE.get(dtype.removesuffix("-all"))
    needed = 2 * weights if share is None else weights * (1 + 2 * share)
    return needed < psutil.virtual_memory().available


def read_bandwidth_gbps() -> float:
    """Memory-read GB/s with THREADS threads: a 1 GiB tensor summed, best of 5."""
    import torch

    torch.set_num_threads(THREADS)
    data = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


def bytes_per_token(checkpoint: Path, shape: Shape) -> int:
    from moe_runtime.inspection import describe_model_dir

    info = describe_model_dir(checkpoint)
    embedding = 50304 * shape.hidden_size * 2  # the input embedding: one row per token
    return int(info["non_expert_bytes"] - embedding + info["total_expert_bytes"] * shape.top_k / shape.num_experts)


def checkpoint_of(shape: Shape) -> Path:
    """The random-weight checkpoint of `shape`, built once: live_decode.py's for its own shape,
    else written one MoE layer at a time (a 14 GB model is never twice in RAM)."""
    if shape == Shape():
        return build_checkpoint(shape)
    from moe_runtime.random_checkpoint import write_random_checkpoint
    from moe_runtime.tiny_models import tiny_config

    target = cache_root() / "bench" / shape.name
    if not (target / "config.json").is_file():
        print(f"building {target} ...", flush=True)
        with staging_directory(target, "peer benchmark checkpoint", legacy=lambda folder: (folder / "config.json").is_file()) as staging:
            write_random_checkpoint(tiny_config(shape.family, **shape.overrides()), staging)
    return target


def child(argv: list[str]) -> None:
    if argv[0] == "pair":
        checkpoint, dtype, index = argv[1:]
        _, _, first, second = PAIRS[int(index)]
        print(json.dumps(paired(Path(checkpoint), dtype, first, second)))
        return
    checkpoint, contender, dtype, budget = argv
    print(json.dumps(ours(Path(checkpoint), contender, dtype, float(budget))))


def run_pairs(checkpoint: Path, only: set[str] | None, env: dict[str, str]) -> list[dict]:
    """Each of PAIRS (those of `only`'s formats) in a process of its own: {pair, format, ratio,
    tokens_per_second: [first, second]}; a pair whose two models do not fit is left out, said so."""
    results = []
    for index, (pair, dtype, _, _) in enumerate(PAIRS):
        if only is not None and dtype not in only:
            continue
        if not fits_twice(checkpoint, dtype):
            print(f"pair {pair} {dtype}: left out (two models do not fit in the memory available)", flush=True)
            continue
        done = subprocess.run([sys.executable, __file__, "--child", "pair", str(checkpoint), dtype, str(index)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"pair {pair} {dtype}: failed (exit {done.returncode}): {done.stderr.strip()[-300:]}", flush=True)
            continue
        speeds = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"pair": pair, "format": dtype, "ratio": speeds[0] / speeds[1], "tokens_per_second": speeds})
        print(f"pair {pair} {dtype}: {speeds[0]:.1f} / {speeds[1]:.1f} tok/s = {speeds[0] / speeds[1]:.2f}x", flush=True)
    return results


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-root", type=Path, default=cache_root() / "llama.cpp", help="where the sdist is unpacked and built")
    parser.add_argument("--json", help="write {rows, bound_tokens_per_second} here")
    parser.add_argument("--formats", help="only these formats, a comma list of llama.cpp's and ours (e.g. Q8_0,Q4_0,int8,int4)")
    parser.add_argument("--shape", choices=SHAPES, default="live-decode")
    parser.add_argument(
        "--wait-policy", default="as-set",
        help="OpenMP's OMP_WAIT_POLICY for every contender's process, a comma list run side by side (as-set: the environment's; active; passive)",
    )
    parser.add_argument(
        "--no-pairs", dest="pairs", action="store_false",
        help="skip the pairs (wrap(1.0) / unwrapped, 25%% / 100%%) measured with their steps interleaved in one process",
    )
    args = parser.parse_args()
    policies = args.wait_policy.split(",")
    if not set(policies) <= set(WAIT_POLICIES):
        parser.error(f"--wait-policy takes a comma list of {', '.join(WAIT_POLICIES)}, got {args.wait_policy!r}")
    only = None if args.formats is None else set(args.formats.split(","))
    if args.json:
        check_writable(args.json, "output")
    shape = SHAPES[args.shape]
    files = gguf_paths(cache_root() / "bench" / f"{shape.name}-gguf", only)
    checkpoint = checkpoint_of(shape)
    tree = llama_tree(args.llama_root)
    files = gguf_files(tree, checkpoint, files)
    best: dict[tuple, float] = {}
    bandwidths = []
    for round_ in range(args.rounds):
        bandwidths.append(read_bandwidth_gbps())
        for policy in policies:
            env = environment(policy)
            for name, path in files.items():
                if only is not None and name not in only:
                    continue
                speed = llama_bench(tree, path, env)
                best[("llama.cpp", name, 1.0, policy)] = max(best.get(("llama.cpp", name, 1.0, policy), 0.0), speed)
                print(f"round {round_ + 1}, {policy}: llama.cpp {name}: {speed:.1f} tok/s", flush=True)
            for contender, dtype, budget in OURS:
                if only is not None and dtype not in only:
                    continue
                command = [sys.executable, __file__, "--child", str(checkpoint), contender, dtype, str(budget)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:  # e.g. killed for memory at a large shape: the row is reported missing, the run goes on
                    print(f"round {round_ + 1}: {contender} {dtype} {budget}: failed (exit {done.returncode}): {done.stderr.strip()[-300:]}", flush=True)
                    continue
                speed = json.loads(done.stdout.strip().splitlines()[-1])
                best[(contender, dtype, budget, policy)] = max(best.get((contender, dtype, budget, policy), 0.0), speed)
                print(f"round {round_ + 1}, {policy}: {contender} {dtype} {budget}: {speed:.1f} tok/s", flush=True)
    pairs = run_pairs(checkpoint, only, environment(policies[0])) if args.pairs else []
    bound = max(bandwidths) * 1e9 / bytes_per_token(checkpoint, shape)
    rows = [{"contender": c, "format": f, "budget": b, "wait_policy": p, "tokens_per_second": s} for (c, f, b, p), s in best.items()]
    print(f"{shape.name}: read bandwidth {max(bandwidths):.1f} GB/s, {bytes_per_token(checkpoint, shape) / 1e6:.0f} MB per token")
    print(f"{'contender':<14}{'format':<10}{'budget':>7}{'policy':>8}{'tok/s':>8}{'of bound':>10}")
    for row in rows:
        print(
            f"{row['contender']:<14}{row['format']:<10}{row['budget']:>7}{row['wait_policy']:>8}{row['tokens_per_second']:>8.1f}"
            f"{row['tokens_per_second'] / bound:>10.0%}"
        )
    print(f"{'bound':<14}{'':<10}{'':>7}{'':>8}{bound:>8.1f}")
    if pairs:
        print(f"\n{'pair, steps interleaved in one process':<40}{'format':<10}{'tok/s':>14}{'ratio':>8}")
        for row in pairs:
            speeds = " / ".join(f"{speed:.1f}" for speed in row["tokens_per_second"])
            print(f"{row['pair']:<40}{row['format']:<10}{speeds:>14}{row['ratio']:>7.2f}x")
    if args.json:
        report = {"shape": shape.name, "bandwidth_gbps": max(bandwidths), "rows": rows, "pairs": pairs, "bound_tokens_per_second": bound}
        write_text_atomically(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    run_script(main)
