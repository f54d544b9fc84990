"""The bench and audit commands, in process, with their long work replaced by canned results."""

import json

from tritongpt2 import cli
from tritongpt2.bench import compile_audit
from tritongpt2.bench.compile_audit import CompileResult


def test_cubin_dump_has_short_file_names_and_an_index(monkeypatch, tmp_path):
    config = ",".join(f"BLOCK_{i}={2 ** (i % 8)}" for i in range(40)) + ",x16:stride_am+stride_bk+N+K,warps=8,stages=3"
    results = [CompileResult("linear_kernel", config + suffix, arch, "float16", ["gpt2 decode"], registers=128,
                             spill_bytes=0, shared_bytes=1024, tensor_core="mma.sync", cubin=b"cubin " + suffix.encode())
               for suffix in ("", ",LAYER_NORM=True") for arch in ("sm_90", "sm_80")]
    assert len(f"{results[0].kernel}-{results[0].config}") > 255
    monkeypatch.setattr(compile_audit, "run_compile_audit", lambda shapes, archs, dtypes: results)
    assert cli.main(["audit", "compile", "--models", "gpt2", "--dump", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index) == 4 and all(len(name) < 100 and (tmp_path / name).exists() for name in index)
    for name, entry in index.items():
        [result] = [r for r in results if (r.config, r.arch) == (entry["config"], entry["arch"])]
        assert (tmp_path / name).read_bytes() == result.cubin and name.startswith("linear_kernel-" + result.arch)
