"""The benchmark suite on tiny shapes on the CPU: the compiled baseline survives the GPU suite's
sequence of decode workloads, a failing implementation becomes an error row, what is done is on disk
before the next model fails, caches are sized to each workload and freed, and the suite and the
traffic audit share one ideal-bytes formula."""

import json
from dataclasses import replace

import pytest
import torch

from tritongpt2.bench import ideal, suite, traffic_audit
from tritongpt2.bench.memory import peak_bytes, weights_bytes
from tritongpt2.bench.model_shapes import model_shape
from tritongpt2.bench.peaks import Peaks
from tritongpt2.bench.report import write_results
from tritongpt2.bench.runners import HFCompiledStaticRunner, HFRunner, Runner, TritonGPT2Runner
from tritongpt2.bench.suite import GPU_IMPLS, GPU_WORKLOADS, QUICK_SHAPE, Workload, build_model, run_suite
from tritongpt2.kernels import cpu_matmul
from tritongpt2.kernels.packed_weight import dense, is_packed

pytest.importorskip("transformers")
CPU = torch.device("cpu")
PEAKS = Peaks(copy_gb_s=10.0, matmul_tflop_s=0.1)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(QUICK_SHAPE, torch.float32, CPU)


@pytest.mark.slow
def test_compiled_baseline_runs_the_gpu_decode_sequence_within_the_recompile_limit():
    # The GPU suite's decode workloads (batch 1, 8, 64 at two contexts) for two models of different
    # depth and width in two dtypes: 24 decode workloads, where compiling once for every model and
    # dtype hit dynamo's recompile limit (a hard error with fullgraph) at the 19th. Dynamo's
    # recompiles do not depend on the backend: "eager" keeps the test fast.
    shapes = [replace(QUICK_SHAPE, name=f"tiny{n}", n_layer=n, n_embd=32 * (n + 1)) for n in (1, 2)]
    workloads = tuple(Workload("decode", b, c) for b in (1, 8, 64) for c in (32, 128))

    def compiled(model, device):
        return [("hf-compile-static", lambda: HFCompiledStaticRunner(model, backend="eager"))]

    document = run_suite(shapes, [torch.float32, torch.bfloat16], CPU, workloads=workloads, runners=compiled,
                         rounds=1, warmup=1, repeats=2, peaks=PEAKS)
    assert len(document["results"]) == 24
    assert [r for r in document["results"] if "error" in r] == []


def test_compiled_baseline_decodes_and_generates_like_transformers(tiny_model, monkeypatch):
    compiles = []
    compile_ = torch.compile

    def recording_compile(fn, **options):
        compiles.append(options)
        return compile_(fn, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager, compiled = HFRunner(tiny_model, "eager"), HFCompiledStaticRunner(tiny_model, backend="eager")
    ids = torch.randint(0, QUICK_SHAPE.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    step, reference = compiled.decode_step(ids, 24), eager.decode_step(ids, 24)
    for _ in range(3):
        expected = reference()
        torch.testing.assert_close(step(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled.generate(ids[:1], 6), eager.generate(ids[:1], 6))
    # The decode step and transformers' static-cache generation, both compiled, one graph per shape.
    assert len(compiles) == 2 and all(o["fullgraph"] and o["dynamic"] is False for o in compiles)
    assert compiled.kinds == ("decode", "generate")


class FailsToEmbed(Runner):
    name = "fails-to-embed"
    kinds = ("embed", "prefill")

    def __init__(self, model):
        self.hf = HFRunner(model, "eager")

    def embed(self, ids):
        raise RuntimeError("out of memory, say")

    def prefill(self, ids):
        return self.hf.prefill(ids)


def test_a_failing_baseline_is_an_error_row_and_the_suite_goes_on():
    def runners(model, device):
        return [("hf-eager", lambda: HFRunner(model, "eager")), ("fails-to-embed", lambda: FailsToEmbed(model)),
                ("cannot-be-made", lambda: 1 / 0)]

    workloads = (Workload("embed", 1, 8), Workload("prefill", 1, 8))
    document = run_suite([QUICK_SHAPE], [torch.float32], CPU, workloads=workloads, runners=runners, rounds=2,
                         warmup=1, repeats=2, peaks=PEAKS)
    rows = {(r["workload"], r["impl"]): r for r in document["results"]}
    assert rows[("embed", "fails-to-embed")]["error"] == "RuntimeError: out of memory, say"
    assert rows[("prefill", "fails-to-embed")]["median_ms"] > 0  # the next workload still runs
    assert rows[("embed", "cannot-be-made")]["error"].startswith("ZeroDivisionError")
    assert rows[("prefill", "cannot-be-made")]["error"].startswith("ZeroDivisionError")
    assert all(rows[(w, "hf-eager")]["median_ms"] > 0 for w in ("embed", "prefill"))


def test_results_are_on_disk_after_the_first_model_when_the_second_fails(tmp_path, monkeypatch):
    build = suite.build_model

    def build_or_fail(shape, dtype, device, seed=0):
        if shape.name == "second":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return build(shape, dtype, device, seed)

    monkeypatch.setattr(suite, "build_model", build_or_fail)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_suite([QUICK_SHAPE, replace(QUICK_SHAPE, name="second")], [torch.float32], CPU,
                  workloads=(Workload("embed", 1, 8),), runners=lambda m, d: [("hf-eager", lambda: HFRunner(m, "eager"))],
                  rounds=1, warmup=1, repeats=2, peaks=PEAKS,
                  on_results=lambda document: write_results(document, tmp_path, with_chart=False))
    [path] = tmp_path.glob("*.json")
    assert [(r["model"], r["impl"]) for r in json.loads(path.read_text())["results"]] == [("tiny", "hf-eager")]
    assert "| tiny | float32 | embed |" in path.with_suffix(".md").read_text()


def test_results_are_handed_on_after_each_workload(tmp_path):
    # So that a run stopped part-way (a GPU loan's time limit) leaves the workloads it finished on disk.
    seen = []
    run_suite([QUICK_SHAPE], [torch.float32], CPU, workloads=(Workload("embed", 1, 8), Workload("embed", 2, 8)),
              runners=lambda m, d: [("hf-eager", lambda: HFRunner(m, "eager"))], rounds=1, warmup=1, repeats=2,
              peaks=PEAKS, on_results=lambda document: seen.append([r["batch"] for r in document["results"]]))
    assert seen == [[1], [1, 2], [1, 2]]  # after each workload, then after the parity check


def test_every_timing_call_is_followed_by_a_release():
    events = []

    class Recording(HFRunner):
        def embed(self, ids):
            events.append("call")
            return super().embed(ids)

        def decode_step(self, ids, context):
            events.append("call")
            return super().decode_step(ids, context)

        def release(self):
            events.append("release")

    run_suite([QUICK_SHAPE], [torch.float32], CPU, workloads=(Workload("embed", 1, 8), Workload("decode", 2, 24)),
              runners=lambda m, d: [("recording", lambda: Recording(m, "eager"))], rounds=2, warmup=1, repeats=2, peaks=PEAKS)
    # embed: warm-up and repeats call, then one release per round; decode: one prefill per round.
    rounds = "".join("c" if e == "call" else "r" for e in events).split("r")[:-1]
    assert len(rounds) == 4 and all(rounds)


def test_tritongpt2_sizes_its_cache_to_each_workload_and_frees_it(tiny_model):
    runner = TritonGPT2Runner(tiny_model, backend="torch", cuda_graphs=False)
    ids = torch.randint(0, QUICK_SHAPE.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    runner.decode_step(ids, 32)()
    assert (runner.engine.cache.max_batch, runner.engine.cache.max_seq) == (2, 32)
    runner.embed(ids[:1, :8])
    assert (runner.engine.cache.max_batch, runner.engine.cache.max_seq) == (1, 8)
    runner.generate(ids[:1, :8], 8)
    assert (runner.engine.cache.max_batch, runner.engine.cache.max_seq) == (1, 16)
    runner.release()
    assert runner.engine is None


def test_tritongpt2_holds_its_weights_as_from_pretrained_loads_them(tiny_model):
    # On the torch backend the layers' matmul weights are copies, packed for oneDNN where it runs
    # float32 (else [out, in] rows); everything else, and every weight under the other backends, is
    # the model's own tensor.
    block = tiny_model.transformer.h[0]
    torch_runner = TritonGPT2Runner(tiny_model, backend="torch", cuda_graphs=False)
    layer = torch_runner.weights.layers[0]
    assert is_packed(layer.fc_weight) == cpu_matmul.can_pack(torch.float32)
    if not is_packed(layer.fc_weight):
        assert layer.fc_weight.data_ptr() != block.mlp.c_fc.weight.data_ptr() and layer.fc_weight.stride()[0] == 1
    assert torch.equal(dense(layer.fc_weight), block.mlp.c_fc.weight)
    assert layer.fc_bias.data_ptr() == block.mlp.c_fc.bias.data_ptr()
    kernel_runner = TritonGPT2Runner(tiny_model, backend="interpret", cuda_graphs=False)
    assert kernel_runner.weights.layers[0].fc_weight.data_ptr() == block.mlp.c_fc.weight.data_ptr()


def test_transformers_decode_computes_no_prompt_logits(tiny_model):
    runner = HFRunner(tiny_model, "eager")
    rows = []
    runner.model.lm_head.register_forward_hook(lambda module, args, out: rows.append(tuple(args[0].shape[:-1])))
    ids = torch.randint(0, QUICK_SHAPE.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    step = runner.decode_step(ids, 24)
    step()
    assert rows == [(2, 1)]  # only the decoded token's, not the prompt's [2, 20]


def test_gpt2_xl_float16_gpu_plan_fits_in_60_gb():
    shape = model_shape("gpt2-xl")
    peak = peak_bytes(shape, torch.float16, GPU_WORKLOADS, GPU_IMPLS)
    one_cache = 2 * shape.n_layer * 64 * 1024 * shape.n_embd * 2  # batch 64 x 1024 tokens: 20 GB
    assert weights_bytes(shape, 2) + one_cache < peak < 60e9
    # The same arithmetic with two tritongpt2 engines holding 64 x 1024 caches for the whole run, as
    # they did, and transformers' full prompt logits, does not fit in 60 GB.
    full_logits = 64 * 1024 * shape.vocab_size * 2
    assert peak + 2 * one_cache + full_logits > 60e9


def test_suite_and_traffic_audit_share_one_ideal_bytes_formula():
    assert traffic_audit.ideal_bytes is ideal.ideal_bytes
    shape = model_shape("gpt2")
    for work in (Workload("embed", 1, 16), Workload("prefill", 1, 1024), Workload("decode", 8, 1024)):
        assert suite.bytes_read(shape, work, 2) == traffic_audit.ideal_bytes(shape, work.kind, work.batch, work.seq, 2)
    # Embedding reads the rows of wte it gathers, not the table the LM head reads whole.
    c = shape.n_embd
    embed = suite.bytes_read(shape, Workload("embed", 1, 16), 2)
    prefill = suite.bytes_read(shape, Workload("prefill", 1, 16), 2)
    assert prefill - embed == (shape.vocab_size * c - 16 * c) * 2 + (shape.vocab_size - 16 * c) * 2


def test_a_cpu_is_named_with_the_instruction_sets_its_figures_depend_on(tmp_path, monkeypatch):
    # Two CPUs of one model name (an AVX2 EPYC and an AVX-512 one) get results files of their own.
    capability = torch.backends.cpu.get_cpu_capability()
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(suite, "CPUINFO", str(info))
    assert suite.device_name(torch.device("cpu")) == f"CPU AMD EPYC ({capability}, AVX512-BF16)"
    info.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 amx_tile avx512_bf16\n")
    assert suite.device_name(torch.device("cpu")) == f"CPU Intel(R) Xeon(R) Processor ({capability}, AVX512-BF16, AMX)"
    monkeypatch.setattr(suite, "CPUINFO", str(tmp_path / "absent"))
    assert suite.device_name(torch.device("cpu")).endswith(f" ({capability})")
