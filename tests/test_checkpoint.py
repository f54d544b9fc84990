"""Loading Hugging Face GPT-2 checkpoints from a folder (torch backend: no kernel is needed here)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import tritongpt2
from checkpoints import save_model
from tritongpt2.engine.checkpoint import load_state_dict
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.weights import PRODUCT_WEIGHTS, split_state_dict, weights_from_state_dict
from tritongpt2.kernels import cpu_matmul
from tritongpt2.kernels.backend import IN_OUT, OUT_IN
from tritongpt2.kernels.packed_weight import dense, is_packed

pytest.importorskip("transformers")


def assert_same_weights(engine: Engine, model: torch.nn.Module) -> None:
    base = model.transformer if hasattr(model, "transformer") else model
    assert torch.equal(engine.weights.wte, base.wte.weight.to(engine.weights.dtype))
    assert torch.equal(dense(engine.weights.layers[-1].fc_weight), base.h[-1].mlp.c_fc.weight.to(engine.weights.dtype))
    assert torch.equal(engine.weights.ln_f_bias, base.ln_f.bias.to(engine.weights.dtype))


@pytest.mark.parametrize("model_class", ["GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification"])
def test_keys_with_and_without_the_transformer_prefix(tmp_path, model_class):
    folder, model = save_model(tmp_path, model_class)
    engine = Engine.from_pretrained(folder, backend="torch")
    assert_same_weights(engine, model)
    assert engine.weights.lm_head is engine.weights.wte
    if model_class == "GPT2ForSequenceClassification":
        classifier = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch")
        assert torch.equal(classifier.score.weight, model.score.weight)


def write_bin(folder, state, shards):
    """pytorch_model.bin, or shards with their index (transformers 5 writes safetensors only)."""
    import json

    folder.mkdir()
    (folder / "config.json").write_text((folder.parent / "src" / "config.json").read_text())
    keys = sorted(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin", "sharded-bin"])
def test_weight_file_layouts(tmp_path, layout):
    folder, model = save_model(tmp_path / "src")
    if layout == "sharded-safetensors":
        model.save_pretrained(tmp_path / layout, max_shard_size="100KB")
        assert (tmp_path / layout / "model.safetensors.index.json").exists()
    else:
        write_bin(tmp_path / layout, load_state_dict(folder), shards=1 if layout == "bin" else 3)
    assert_same_weights(Engine.from_pretrained(tmp_path / layout, backend="torch"), model)


def test_bin_files_load_weights_only(tmp_path):
    folder, _ = save_model(tmp_path / "src")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"wte.weight": torch.zeros(1), "payload": print}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        Engine.from_pretrained(tmp_path / "evil", backend="torch")


def test_untied_lm_head_is_used_and_old_mask_buffers_are_ignored(tmp_path):
    folder, model = save_model(tmp_path, tie_word_embeddings=False)
    state = load_state_dict(folder)
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    engine = Engine.from_pretrained(folder, backend="torch")
    assert torch.equal(engine.weights.lm_head, model.lm_head.weight)
    assert not torch.equal(engine.weights.lm_head, engine.weights.wte)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_weights_are_laid_out_for_the_backend(tmp_path, monkeypatch, dtype, packing):
    # The torch backend's engine packs each layer's matmul weights for oneDNN where it packs their
    # dtype (float32 with AVX-512, bfloat16 with a native gemm: forced on and off here), else stores
    # them as [out, in] rows (oneDNN's linear reads them faster), seen as the checkpoint's [in, out];
    # IN_OUT keeps them as they are. Every layout gives the same float32 bits for batches (oneDNN
    # runs 2 rows or more alike).
    if packing and cpu_matmul.REORDER is None:
        pytest.skip("this torch has no oneDNN to pack weights with")
    monkeypatch.setattr(cpu_matmul, "PACKS_FLOAT32", packing)
    monkeypatch.setattr(cpu_matmul, "BFLOAT16_GEMM", packing)
    folder, model = save_model(tmp_path)
    engine = Engine.from_pretrained(folder, backend="torch", dtype=dtype)
    packed = packing and dtype != torch.float16
    for layer, block in zip(engine.weights.layers, model.transformer.h):
        for name, module in (("attn_weight", block.attn.c_attn), ("attn_proj_weight", block.attn.c_proj),
                             ("fc_weight", block.mlp.c_fc), ("mlp_proj_weight", block.mlp.c_proj)):
            weight = getattr(layer, name)
            assert is_packed(weight) == packed, name
            if not packed:
                assert weight.stride() == (1, weight.shape[0]), name
            assert torch.equal(dense(weight), module.weight.to(dtype)), name
        assert layer.fc_bias.is_contiguous() and layer.ln_1_weight.is_contiguous()
    assert engine.weights.wte.is_contiguous() and not is_packed(engine.weights.lm_head)
    base, _ = split_state_dict(load_state_dict(folder))
    kept = weights_from_state_dict(engine.config, base, source=folder, layout=IN_OUT, dtype=dtype)
    assert all(getattr(layer, name).is_contiguous() for layer in kept.layers for name in PRODUCT_WEIGHTS)
    rows = weights_from_state_dict(engine.config, base, source=folder, layout=OUT_IN, dtype=dtype)
    assert all(getattr(layer, name).T.is_contiguous() for layer in rows.layers for name in PRODUCT_WEIGHTS)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = [Engine(engine.config, weights, EngineOptions(backend="torch")).prefill(ids, logits="all").logits
              for weights in (kept, rows)]
    laid_out = engine.prefill(ids, logits="all").logits
    if cpu_matmul.ONEDNN_LINEAR is not None and dtype == torch.float32:
        assert torch.equal(laid_out, logits[0]) and torch.equal(laid_out, logits[1])
    for other in logits:
        torch.testing.assert_close(laid_out, other, rtol=1e-5, atol=1e-5) if dtype == torch.float32 else \
            torch.testing.assert_close(laid_out.float(), other.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="layout='rows'"):
        weights_from_state_dict(engine.config, base, source=folder, layout="rows")


def test_dtype_and_device(tmp_path):
    folder, model = save_model(tmp_path)
    engine = Engine.from_pretrained(folder, backend="torch", dtype=torch.bfloat16, device="cpu")
    assert engine.weights.dtype == torch.bfloat16 and engine.cache.keys.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in vars(engine.weights.layers[0]).values())
    with pytest.raises(ValueError, match="torch.int8"):
        Engine.from_pretrained(folder, backend="torch", dtype=torch.int8)
    with pytest.raises(ValueError, match="backend='torch' runs on cpu, but the weights are on meta"):
        Engine.from_pretrained(folder, backend="torch", device="meta")


def rewrite(folder, change):
    from safetensors.torch import save_file

    state = load_state_dict(folder)
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    folder, _ = save_model(tmp_path)
    rewrite(folder, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing keys: h\.1\.mlp\.c_fc\.bias"):
        Engine.from_pretrained(folder, backend="torch")
    folder, _ = save_model(tmp_path / "b")
    rewrite(folder, lambda s: s.update({"transformer.h.0.attn.c_attn.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected keys: h\.0\.attn\.c_attn\.extra"):
        Engine.from_pretrained(folder, backend="torch")
    folder, _ = save_model(tmp_path / "c")
    rewrite(folder, lambda s: s.update({"transformer.wpe.weight": torch.zeros(32, 80)}))
    with pytest.raises(ValueError, match=r"wpe\.weight \(32, 80\) != \(64, 80\)"):
        Engine.from_pretrained(folder, backend="torch")
    folder, _ = save_model(tmp_path / "d")
    rewrite(folder, lambda s: s.update({"pooler.weight": torch.zeros(3)}))
    with pytest.warns(UserWarning, match="checkpoint weights not used: pooler.weight"):
        tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch")


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint folder"):
        Engine.from_pretrained(tmp_path / "nothing-here", backend="torch")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights in"):
        Engine.from_pretrained(tmp_path, backend="torch")
    with pytest.raises(ValueError, match="is a file"):
        Engine.from_pretrained(tmp_path / "config.json", backend="torch")


def test_hub_id_without_network_says_so():
    code = (
        "from tritongpt2.engine.engine import Engine\n"
        "try:\n"
        "    Engine.from_pretrained('openai-community/gpt2', backend='torch')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "could not be downloaded from the Hugging Face hub (no network" in result.stdout, result.stderr


def _shard(folder):
    """model.safetensors renamed to a shard named by an index written next (in the cases below)."""
    (folder / "model.safetensors").rename(folder / "shard.safetensors")


def _write(name, data):
    def change(folder):
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return change


def _index(text):
    def change(folder):
        _shard(folder)
        _write("model.safetensors.index.json", text)(folder)
    return change


def _bin(obj):
    def change(folder):
        (folder / "model.safetensors").unlink()
        torch.save(obj, folder / "pytorch_model.bin")
    return change


def _bin_bytes(data):
    def change(folder):
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(data)
    return change


def _truncate(name):
    def change(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return change


def _truncated_shard(folder):
    _shard(folder)
    _truncate("shard.safetensors")(folder)
    _write("model.safetensors.index.json", '{"weight_map": {"wte.weight": "shard.safetensors"}}')(folder)


BROKEN = [
    ("truncated safetensors", _truncate("model.safetensors"), "model.safetensors is not a readable safetensors file"),
    ("empty safetensors", _write("model.safetensors", b""), "model.safetensors is not a readable safetensors file .*header too small"),
    ("garbage safetensors", _write("model.safetensors", b"\x00garbage" * 64), "model.safetensors is not a readable safetensors file"),
    ("index not JSON", _index("{not json"), "model.safetensors.index.json is not valid JSON"),
    ("index not UTF-8", _index(b"\xff\xfe\x00"), "model.safetensors.index.json is not valid JSON"),
    ("index a list", _index("[1, 2]"), "model.safetensors.index.json has no weight_map of tensor names to shard files"),
    ("index null", _index("null"), "model.safetensors.index.json has no weight_map"),
    ("index without weight_map", _index('{"metadata": {}}'), "model.safetensors.index.json has no weight_map"),
    ("shard names not strings", _index('{"weight_map": {"wte.weight": 3}}'), "model.safetensors.index.json has no weight_map"),
    ("shard outside the folder", _index('{"weight_map": {"wte.weight": "../shard.safetensors"}}'),
     r"model.safetensors.index.json names the shard '\.\./shard.safetensors', which is not a file in"),
    ("shard missing", _index('{"weight_map": {"wte.weight": "nope.safetensors"}}'), "names the shard 'nope.safetensors', which is not a file"),
    ("tensor missing from its shard", _index('{"weight_map": {"h.0.nope": "shard.safetensors"}}'),
     "model.safetensors.index.json lists tensors its shards do not hold: h.0.nope"),
    ("truncated shard", _truncated_shard, "shard.safetensors is not a readable safetensors file"),
    (".bin holding a bare tensor", _bin(torch.zeros(3)), "pytorch_model.bin holds a Tensor, not a dict of named tensors"),
    (".bin holding a list", _bin([torch.zeros(3)]), "pytorch_model.bin holds a list, not a dict of named tensors"),
    (".bin with a key that is not a name", _bin({1: torch.zeros(3)}), "pytorch_model.bin holds 1: Tensor, not a dict of named tensors"),
    (".bin with a value that is not a tensor", _bin({"wte.weight": 3}), "pytorch_model.bin holds 'wte.weight': int"),
    ("garbage .bin", _bin_bytes(b"garbage"), r"pytorch_model.bin could not be loaded as a weights-only PyTorch file \(.*\): Unsupported operand"),
    ("empty .bin", _bin_bytes(b""), "pytorch_model.bin could not be loaded as a weights-only PyTorch file .*: EOFError$"),
    ("config a list", _write("config.json", "[1]"), "config.json holds a JSON list, not an object of config fields"),
    ("config null", _write("config.json", "null"), "config.json holds a JSON NoneType"),
    ("config empty", _write("config.json", ""), "config.json is not valid JSON"),
    ("epsilon a string", _write("config.json", '{"layer_norm_epsilon": "1e-5"}'),
     "config.json: config layer_norm_epsilon='1e-5' must be a positive number"),
]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder, _ = save_model(tmp_path_factory.mktemp("good"))
    return folder


@pytest.mark.parametrize("change,message", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_checkpoints_are_one_value_error_naming_the_file(good_folder, tmp_path, change, message):
    folder = tmp_path / "broken"
    shutil.copytree(good_folder, folder)
    change(folder)
    with pytest.raises(ValueError, match=message) as raised:
        Engine.from_pretrained(folder, backend="torch")
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)
