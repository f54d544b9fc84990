"""The `tritongpt2` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
import warnings
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import torch

    from tritongpt2.engine.generation import SamplingParams


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _csv_of(known: Callable[[], Iterable[str]], what: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of known()."""

    def names(text: str) -> list[str]:
        allowed = list(known())
        given = _csv(text)
        unknown = [name for name in given if name not in allowed]
        if unknown or not given:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; known: {', '.join(allowed)}")
        return given

    return names


def _model_names() -> Iterable[str]:
    from tritongpt2.bench.model_shapes import MODEL_SHAPES

    return MODEL_SHAPES


def _audit_compile(args: argparse.Namespace) -> int:
    from tritongpt2.bench.compile_audit import (
        dump_cubins, markdown_table, run_candidate_audit, run_compile_audit, toolchain,
    )
    from tritongpt2.bench.model_shapes import model_shape

    shapes = [model_shape(name) for name in args.models]
    if args.candidates:
        results = run_candidate_audit(shapes, archs=args.arch, dtypes=args.dtypes or ["float16", "bfloat16"])
    else:
        results = run_compile_audit(shapes, archs=args.arch, dtypes=args.dtypes or list(DTYPES))
    table = markdown_table(results)
    print(table)
    if args.json:
        rows = [{**{k: v for k, v in vars(r).items() if k != "cubin"}, "blocks_per_sm": r.blocks_per_sm} for r in results]
        document = {"models": args.models, "toolchain": toolchain(), "results": rows}
        Path(args.json).write_text(json.dumps(document, indent=1))
    if args.dump:
        dump_cubins(results, Path(args.dump))
    problems = [problem for r in results for problem in r.problems()]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"{len(results)} configurations compiled, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("int8", "int4", "nf4")  # kernels/quantized_weight.py's FORMATS, without importing torch to parse


def _quantization(args: argparse.Namespace) -> dict[str, object]:
    """The engine options --quantization, --group-size and --double-quant give (checked by EngineOptions)."""
    return {"quantization": args.quantization, "group_size": args.group_size, "double_quant": args.double_quant}


def _dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _generate(args: argparse.Namespace) -> int:
    import torch

    from tritongpt2.engine.checkpoint import resolve_model_dir
    from tritongpt2.engine.engine import Engine
    from tritongpt2.engine.generation import stream_tokens
    from tritongpt2.engine.tokenizer import GPT2Tokenizer

    params = sampling_params(args.temperature, args.top_k, args.top_p)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().rstrip("\n")
    if not prompt:
        raise ValueError("empty prompt: give it as an argument or on standard input")
    folder = resolve_model_dir(args.model)
    tokenizer = GPT2Tokenizer.from_pretrained(folder)
    engine = Engine.from_pretrained(folder, dtype=_dtype(args.dtype), backend=args.backend, max_batch=1, **_quantization(args))
    ids = torch.tensor([tokenizer.encode(prompt)], device=engine.device)
    eos = tokenizer.eos_token_id
    steps = stream_tokens(engine, ids, max_new_tokens=args.max_new_tokens, params=params,
                          eos_token_id=eos if eos is not None else [], seed=args.seed)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    generated: list[int] = []
    shown = ""
    for tokens in steps:
        generated.append(int(tokens[0]))
        text = tokenizer.decode(generated)
        # A character split across tokens decodes to U+FFFD until its last byte arrives.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(generated)[len(shown):] + "\n")
    return 0


def sampling_params(temperature: float | None, top_k: int | None, top_p: float | None) -> SamplingParams:
    """Greedy unless a sampling option is given; --temperature 0 is greedy too (sampling's limit as
    the temperature falls). Every value is checked as the Python API checks it."""
    from tritongpt2.engine.generation import SamplingParams

    greedy = temperature == 0 or (temperature, top_k, top_p) == (None, None, None)
    return SamplingParams(
        not greedy,
        1.0 if temperature in (None, 0) else temperature,
        0 if top_k is None else top_k,
        1.0 if top_p is None else top_p,
    )


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from tritongpt2.embedder import Embedder

    texts = args.texts or [line for line in sys.stdin.read().split("\n") if line]
    if not texts:
        raise ValueError("no text to embed: give texts as arguments, or on standard input one per line")
    embedder = Embedder.from_pretrained(args.model, pooling=args.pooling, normalize=args.normalize,
                                        dtype=_dtype(args.dtype), backend=args.backend, **_quantization(args))
    vectors = embedder(texts)
    if args.output:
        # np.save adds .npy to a name without it.
        path = Path(args.output if args.output.endswith(".npy") else args.output + ".npy")
        np.save(path, vectors)
        print(f"wrote {path}", file=sys.stderr)
    else:
        json.dump({"model": str(args.model), "pooling": args.pooling, "normalize": args.normalize,
                   "embeddings": vectors.tolist()}, sys.stdout)
        sys.stdout.write("\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tritongpt2.engine.options import EngineOptions

    try:
        from tritongpt2.serve.app import ServeSettings
        from tritongpt2.serve.server import SchedulerOptions, app_for_model, serve_forever, warn_if_exposed
    except ImportError as missing:
        raise ValueError(f"serve needs the serve extra ({missing}): pip install 'tritongpt2[serve]'") from None

    api_key = args.api_key or os.environ.get("TRITONGPT2_API_KEY") or None
    warn_if_exposed(args.host, api_key)
    options = EngineOptions(dtype=_dtype(args.dtype), backend=args.backend, max_batch=args.max_batch, max_seq=args.max_seq,
                            **_quantization(args))
    scheduling = SchedulerOptions(pooling=args.pooling, normalize=args.normalize, max_queue=args.max_queue,
                                  embed_token_budget=args.embed_token_budget)
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    settings = ServeSettings(model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes)
    app = app_for_model(args.model, options, scheduling, settings)
    serve_forever(app, args.host, args.port, log_level=args.log_level)
    return 0


def bench_device(quick: bool, requested: str | None) -> torch.device:
    """--quick runs on the CPU (its kernels under the interpreter); otherwise CUDA when available."""
    import torch

    if quick:
        if requested == "cuda":
            raise ValueError("--quick runs on the CPU (tiny shapes, the kernels under the interpreter); drop --device cuda")
        return torch.device("cpu")
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def _output_folder(args: argparse.Namespace, label: str, committed_subfolder: str = "") -> Path:
    from tritongpt2.bench.report import committed_results_folder, new_results_folder

    if args.output and args.update_committed:
        raise ValueError(f"--output {args.output} and --update-committed name two folders: give one")
    if args.update_committed:
        return committed_results_folder() / committed_subfolder
    return Path(args.output) if args.output else new_results_folder(label)


def _bench_serve(args: argparse.Namespace) -> int:
    from tritongpt2.bench.model_shapes import model_shape
    from tritongpt2.bench.quiet import quiet_transformers
    from tritongpt2.bench.serve_load import LoadSettings, run_serve_load, serve_markdown, write_serve_results
    from tritongpt2.bench.suite import QUICK_SHAPE, device_name

    if len(args.models or []) > 1 or len(args.dtypes or []) > 1:
        raise ValueError("--serve loads one model in one dtype: give at most one of each in --models and --dtypes")
    if args.quick and args.models:
        raise ValueError("--quick serves its own tiny model; --models does not apply to it")
    device = bench_device(args.quick, args.device)
    shape = QUICK_SHAPE if args.quick else model_shape((args.models or ["gpt2"])[0])
    dtype = _dtype((args.dtypes or ["float16" if device.type == "cuda" else "float32"])[0])
    settings = LoadSettings(max_tokens=8, requests_per_stream=2, embed_requests=8, max_seq=shape.n_positions) if args.quick else LoadSettings()
    output = _output_folder(args, device_name(device) + "-serve", "quick" if args.quick else "")
    print(f"writing into {output}", file=sys.stderr)
    with quiet_transformers():
        document = run_serve_load(shape, dtype, device, settings=settings)
    print(serve_markdown(document))
    for path in write_serve_results(document, output):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.serve:
        return _bench_serve(args)
    if args.quick:
        # --quick runs the kernels under the interpreter, which must be on before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tritongpt2.bench.model_shapes import model_shape
    from tritongpt2.bench.quiet import quiet_transformers
    from tritongpt2.bench.report import markdown, write_results
    from tritongpt2.bench.suite import QUICK_SHAPE, default_workloads, device_name, run_suite

    if args.quick and args.models:
        raise ValueError("--quick times its own tiny model; --models does not apply to it")
    device = bench_device(args.quick, args.device)
    known = {work.label: work for work in default_workloads(device, args.quick)}
    unknown = [label for label in args.workloads or [] if label not in known]
    if unknown:
        raise ValueError(f"--workloads {','.join(unknown)}: not among this device's workloads ({', '.join(known)})")
    workloads = tuple(known[label] for label in args.workloads) if args.workloads else None
    on_gpu = device.type == "cuda"
    models = args.models or (["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] if on_gpu else ["gpt2"])
    shapes = [QUICK_SHAPE] if args.quick else [model_shape(name) for name in models]
    dtypes = [_dtype(name) for name in (args.dtypes or (["float16", "bfloat16"] if on_gpu else ["float32"]))]
    output = _output_folder(args, device_name(device), "quick" if args.quick else "")
    print(f"writing into {output}", file=sys.stderr)

    def write_so_far(document: dict) -> None:
        write_results(document, output, with_chart=False)

    with quiet_transformers():
        document = run_suite(shapes, dtypes, device, quick=args.quick, workloads=workloads, on_results=write_so_far)
    print(markdown(document))
    for path in write_results(document, output):
        print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in document["results"] if "error" in r]
    for record in failed:
        print(f"FAILED: {record['model']} {record['dtype']} {record['workload']} {record['impl']}: {record['error']}", file=sys.stderr)
    wrong = [c for c in document["parity"] if "error" in c or c["relative_error_vs_float64"] > c["limit"]]
    for check in wrong:
        print(f"PARITY FAILED: {check}", file=sys.stderr)
    return 1 if failed or wrong else 0


def _tune(args: argparse.Namespace) -> int:
    import torch

    from tritongpt2.bench.decode_step_report import step_markdown, step_report
    from tritongpt2.bench.decode_tuning import (
        failed_candidates, launch_timer, report_markdown, report_rows, tune_model, write_tuning,
    )
    from tritongpt2.bench.model_shapes import model_shape
    from tritongpt2.bench.quiet import quiet_transformers
    from tritongpt2.bench.report import committed_results_folder
    from tritongpt2.bench.suite import device_name, versions
    from tritongpt2.kernels import tiling

    if not torch.cuda.is_available():
        raise ValueError("tune times kernels on a GPU, but torch.cuda.is_available() is False")
    device = torch.device("cuda")
    output, table = Path(args.output), Path(args.table) if args.table else tiling.TUNING_TABLE
    timer = launch_timer(rounds=args.rounds)
    # Candidates with a problem in the committed candidate audits (every triton they were compiled with).
    audits = sorted(committed_results_folder().glob("compile-audit-candidates*.json"))
    excluded = failed_candidates([json.loads(path.read_text()) for path in audits])
    print(f"{len(excluded)} candidates left out: they fail the compile audit in {', '.join(p.name for p in audits)}",
          file=sys.stderr)
    tunings = []
    for name in args.models:
        print(f"tuning {name}", file=sys.stderr)
        tunings += tune_model(model_shape(name), timer, excluded=excluded)
    name = device_name(device)
    for path in write_tuning(tunings, name, versions(), table, output):
        print(f"wrote {path}", file=sys.stderr)
    print(report_markdown([r for r in report_rows(tunings) if r["chosen"] or r["default"]], name))
    if table == tiling.TUNING_TABLE:
        tiling.tuning_table.cache_clear()  # the step below runs with the winners
    with quiet_transformers():
        report = step_report(model_shape("gpt2"), torch.float16, 1024, device)
    (output / "decode-step.json").write_text(json.dumps({"device": name, "versions": versions(), **report}, indent=1) + "\n")
    markdown = step_markdown(report, name)
    (output / "decode-step.md").write_text(markdown)
    print(markdown)
    return 0


def _audit_quantization(args: argparse.Namespace) -> int:
    from tritongpt2.bench.ctranslate2_runner import ctranslate2_installed
    from tritongpt2.bench.model_shapes import model_shape
    from tritongpt2.bench.quantization_accuracy import int8_against_ctranslate2, measure, memory_table, write_results
    from tritongpt2.bench.quiet import quiet_transformers
    from tritongpt2.bench.suite import versions

    shape = model_shape(args.model)
    output = _output_folder(args, "quantization")
    with quiet_transformers():
        rows = measure(shape, new_tokens=args.tokens, dtype=_dtype(args.dtype))
        against = int8_against_ctranslate2(shape) if ctranslate2_installed() else None
    if against is None:
        print("ctranslate2 is not installed: int8 is not compared with CTranslate2's", file=sys.stderr)
    memory = memory_table([model_shape(name) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")])
    path = write_results(output, shape, rows, memory, args.dtype, versions(), against)
    print(path.read_text())
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (or hub id, with a network)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--backend", choices=["triton", "interpret", "torch"], help="default: triton with CUDA, else torch")
    _quantization_options(parser, "when loading (default: none, unless the checkpoint was saved quantized)")


def _quantization_options(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help="quantize the matmul weights, weight-only (int8 per "
                        f"channel, int4 in groups, nf4 as bitsandbytes), {when}")
    parser.add_argument("--group-size", type=int, help="int4's group along the inputs: 32, 64 or 128 (default: 64); nf4's "
                        "block is 64")
    parser.add_argument("--double-quant", action="store_true", help="nf4: quantize the blocks' absmax too, as "
                        "bitsandbytes' double quantization")


def _audit_traffic(args: argparse.Namespace) -> int:
    # Bytes are counted under the interpreter, which must be on before triton is imported.
    os.environ["TRITON_INTERPRET"] = "1"
    from tritongpt2.bench.model_shapes import model_shape
    from tritongpt2.bench.quiet import quiet_transformers
    from tritongpt2.bench.traffic_audit import run_traffic_audit
    from tritongpt2.engine.quantize import Quantization
    from tritongpt2.kernels.tiling import MIN_STREAMING_PROGRAMS

    shape = model_shape(args.model)
    quantization = Quantization.of(args.quantization, args.group_size, args.double_quant)
    output = _output_folder(args, "traffic")
    with quiet_transformers():
        rows = run_traffic_audit(shape, args.workload, args.batch, args.context, _dtype(args.dtype), quantization)
    print("| impl | weights | workload | batch | context | bytes/step | ideal | ratio to ideal | distinct bytes/step | "
          "ratio to ideal | launches/step | launches/layer "
          f"| fewest programs per streaming launch (an H100 has {MIN_STREAMING_PROGRAMS} SMs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['quantization'] or r['dtype']} | {r['workload']} | {r['batch']} | {r['context']} | "
              f"{r['bytes']:,} | {r['ideal_bytes']:,} | {r['ratio_to_ideal']} | {r['distinct_bytes']:,} | "
              f"{r['distinct_ratio_to_ideal']} | {r['launches']} | {r['launches_per_layer']} | {r['fewest_programs'] or '-'} |")
    path = output / f"traffic-{shape.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text())["results"] if path.exists() else []

    def key(r: dict) -> tuple:
        return r["workload"], r["batch"], r["context"], r["dtype"], r["impl"], r.get("quantization")

    keys = {key(r) for r in rows}
    kept = [r for r in previous if key(r) not in keys]
    path.write_text(json.dumps({"device": "interpreter", "results": kept + rows}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritongpt2", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    _model_options(generate)
    generate.add_argument("--max-new-tokens", type=int, default=50, help="at most this many tokens (default: %(default)s)")
    generate.add_argument("--temperature", type=float,
                          help="sample at this temperature; 0 is greedy, as is giving no sampling option")
    generate.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, help="sample from the smallest set holding this probability, in (0, 1]")
    generate.add_argument("--seed", type=int, help="seed for sampling")
    generate.add_argument("prompt", nargs="?", help="the prompt; read from standard input when absent")
    generate.set_defaults(run=_generate)

    embed = commands.add_parser("embed", help="embed texts: JSON on stdout, or .npy with --output")
    _model_options(embed)
    embed.add_argument("--pooling", choices=["mean", "last", "first"], default="mean")
    embed.add_argument("--normalize", action="store_true", help="scale each vector to unit length")
    embed.add_argument("--output", help="write an .npy file instead of JSON (.npy is added to a name without it)")
    embed.add_argument("texts", nargs="*", help="the texts; read from standard input, one per line, when absent")
    embed.set_defaults(run=_embed)
    serve = commands.add_parser("serve", help="an OpenAI-compatible server: /v1/completions, /v1/embeddings, /metrics")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; beyond localhost, "
                       "give --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--max-batch", type=int, default=16, help="cache rows: sequences decoded together (default: %(default)s)")
    serve.add_argument("--max-seq", type=int, help="tokens per row, prompt and completion (default: the model's n_positions)")
    serve.add_argument("--pooling", choices=["mean", "last", "first"], default="mean", help="how /v1/embeddings pools "
                       "the hidden states (default: %(default)s)")
    serve.add_argument("--normalize", action="store_true", help="scale each embedding to unit length")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the --model folder's name)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes (default: $TRITONGPT2_API_KEY)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the running batch before "
                       "503 with Retry-After (default: %(default)s)")
    serve.add_argument("--embed-token-budget", type=int, default=4096, help="padded tokens per embedding batch "
                       "(default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default: %(default)s)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="time tritongpt2 against transformers, side by side")
    bench.add_argument("--quick", action="store_true", help="tiny shapes on the CPU backends (even where CUDA is), with a parity check")
    bench.add_argument("--serve", action="store_true", help="load figures of `tritongpt2 serve` instead: generated tokens/s "
                       "at 1, 4, 16 and 32 concurrent streams, embedding latency at 1 and 16 clients (one model, one dtype)")
    bench.add_argument("--models", type=_csv_of(_model_names, "model"),
                       help="GPT-2 sizes, comma-separated (default: all four on a GPU, gpt2 on the CPU)")
    bench.add_argument("--dtypes", type=_csv_of(lambda: DTYPES, "dtype"),
                       help="comma-separated (default: float16,bfloat16 on a GPU, float32 on the CPU)")
    bench.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    bench.add_argument("--workloads", type=_csv, help="a comma-separated subset of the device's workloads by label, "
                       "e.g. 'decode 1x1024,embed 1x128' (default: all of them)")
    bench.add_argument("--output", help="folder for the JSON, markdown and PNG (default: a new "
                       "./tritongpt2-results/<device>-<time> folder)")
    bench.add_argument("--update-committed", action="store_true",
                       help="write into the checkout's bench/results (bench/results/quick with --quick), replacing its files")
    bench.set_defaults(run=_bench)

    tune = commands.add_parser("tune", help="on a GPU: time every decode tile candidate, write the fastest into the "
                               "tuning table, and report each kernel's GB/s and ms/token against transformers")
    tune.add_argument("--output", required=True, help="folder for the reports and a copy of the table")
    tune.add_argument("--models", type=_csv_of(_model_names, "model"), default=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                      help="GPT-2 sizes, comma-separated (default: %(default)s)")
    tune.add_argument("--table", help="the tuning table to write (default: the checkout's kernels/decode_tuning.json)")
    tune.add_argument("--rounds", type=int, default=5, help="timing rounds per candidate (default: %(default)s)")
    tune.set_defaults(run=_tune)

    audit = commands.add_parser("audit", help="check the kernels for real GPUs without one")
    audits = audit.add_subparsers(dest="audit", required=True)
    compile_ = audits.add_parser("compile", help="compile every kernel configuration for sm_90 and sm_80")
    compile_.add_argument("--arch", type=_csv, default=["sm_90", "sm_80"], help="comma-separated, e.g. sm_90,sm_80")
    compile_.add_argument("--models", type=_csv, default=["gpt2", "gpt2-xl"], help="comma-separated GPT-2 sizes")
    compile_.add_argument("--dtypes", type=_csv, help="comma-separated (default: float16,bfloat16,float32; "
                          "float16,bfloat16 with --candidates)")
    compile_.add_argument("--candidates", action="store_true",
                          help="instead of the configurations a step launches, every decode tuning candidate's "
                               "(kernels/tiling.py: split_candidates), at batch 1")
    compile_.add_argument("--json", help="write the results as JSON to this file")
    compile_.add_argument("--dump", help="write each cubin into this folder, with index.json naming their configurations")
    compile_.set_defaults(run=_audit_compile)
    traffic = audits.add_parser("traffic", help="count the bytes one step moves, against the ideal and transformers")
    traffic.add_argument("--model", default="gpt2")
    traffic.add_argument("--workload", choices=["decode", "prefill", "embed"], default="decode")
    traffic.add_argument("--batch", type=int, default=1)
    traffic.add_argument("--context", type=int, default=1024, help="cache context (decode) or tokens (prefill, embed)")
    traffic.add_argument("--dtype", choices=DTYPES, default="float16", help="the activations' and the cache's")
    _quantization_options(traffic, "in-process, counted against the format's ideal (transformers is then not counted)")
    traffic.add_argument("--output", help="folder of traffic-<model>.json, rows merged into it (default: a new "
                         "./tritongpt2-results/traffic-<time> folder)")
    traffic.add_argument("--update-committed", action="store_true", help="merge the rows into the checkout's bench/results")
    traffic.set_defaults(run=_audit_traffic)
    quantization = audits.add_parser("quantization", help="each weight-only format's logits error, greedy agreement "
                                     "and memory against float32 on the same random weights (CPU, torch backend)")
    quantization.add_argument("--model", default="gpt2", choices=_model_names())
    quantization.add_argument("--tokens", type=int, default=128, help="greedy continuation compared (default: %(default)s)")
    quantization.add_argument("--dtype", choices=DTYPES, default="float32", help="the engine's activations")
    quantization.add_argument("--output", help="folder for quantization-<model>-<dtype>.json and .md (default: a new "
                              "./tritongpt2-results/quantization-<time> folder)")
    quantization.add_argument("--update-committed", action="store_true", help="write them into the checkout's bench/results")
    quantization.set_defaults(run=_audit_quantization)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Errors in what the user gave (arguments, files, input) are one line and exit status 2;
    warnings are one line each."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except (ValueError, NotImplementedError, OSError) as error:
            print(f"tritongpt2: error: {_one_line(error)}", file=sys.stderr)
            return 2


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _show_warning(message: Warning | str, *_: object, **__: object) -> None:
    print(f"tritongpt2: warning: {_one_line(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
