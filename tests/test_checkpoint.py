"""Checkpoint loading and saving: round trips, transformers compatibility, every error case."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_model

import asarm
from asarm import checkpoint, storage
from asarm.checkpoint import DEFAULT_MODEL, load_model, save_model, shipped_models
from asarm.errors import CheckpointError, InputError
from asarm.model import ASARM
from asarm.tokenization import train_tokenizer

IDS = torch.tensor([[3, 1, 6, 0, 6, 6, 2, 4]])
RANKS = torch.tensor([[0, 0, 2, 0, 1, 3, 0, 0]])


def logits(model, ids=IDS, ranks=RANKS):
    with torch.no_grad():
        return model.chain_logits(ids.to(model.device), ranks.to(model.device))[0].float()


def hf_logits(hf, ids=IDS[0], ranks=RANKS[0]):
    hidden = ranks > 0
    perm = (hidden[None, :] & (ranks[:, None] <= ranks[None, :])).float()
    pos = torch.nonzero(hidden).flatten()
    tm = torch.zeros(len(pos), len(ranks))
    tm[torch.arange(len(pos)), pos] = 1
    with torch.no_grad():
        return hf(ids[None], perm_mask=perm[None], target_mapping=tm[None]).logits[0].float()


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(seed=3)
    save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_save_load_round_trip(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(path)
    assert isinstance(loaded, ASARM) and not loaded.training
    assert loaded.tokenizer is None and loaded.name_or_path == str(path)
    assert loaded.config.mask_token_id == 6
    assert torch.equal(logits(model), logits(loaded))
    # tied weights stay tied after loading
    assert loaded.lm_loss.weight is loaded.transformer.word_embedding.weight
    # no leftover temporary directories
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", "bfloat16"])
def test_load_bf16(saved, dtype):
    model, path = saved
    loaded = load_model(path, dtype=dtype)
    assert loaded.dtype == torch.bfloat16
    assert torch.allclose(logits(loaded), logits(model), atol=0.3, rtol=0.05)


@pytest.mark.parametrize("dtype", ["fp32", "float32", torch.float32, None])
def test_load_fp32(saved, dtype):
    model, path = saved
    loaded = load_model(path, dtype=dtype, device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"


def test_bad_dtype(saved):
    with pytest.raises(InputError, match="unknown dtype"):
        load_model(saved[1], dtype="int8")


def test_save_in_bf16(tmp_path):
    model = tiny_model(seed=1)
    save_model(model, tmp_path, dtype="bf16")
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "model.safetensors"))["transformer.mask_emb"].dtype == torch.bfloat16
    assert load_model(tmp_path).dtype == torch.float32  # upcast to fp32 unless dtype is given
    assert load_model(tmp_path, dtype="bf16").dtype == torch.bfloat16
    assert load_model(tmp_path, dtype="fp32").dtype == torch.float32


def test_transformers_loads_what_we_save(saved):
    from transformers import XLNetLMHeadModel

    model, path = saved
    hf, info = XLNetLMHeadModel.from_pretrained(str(path), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert torch.allclose(hf_logits(hf), logits(model), atol=1e-5, rtol=0)


def test_we_load_what_transformers_saves(tmp_path):
    """A checkpoint written by transformers itself (it has lm_loss.weight dropped or kept)."""
    from conftest import hf_reference

    model = tiny_model(seed=5)
    hf = hf_reference(model)
    hf.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-6)


def test_sharded_save_loads_and_transformers_reads_it(tmp_path):
    from transformers import XLNetLMHeadModel

    model = tiny_model(seed=4)
    total_mb = sum(v.numel() * 4 for k, v in model.state_dict().items() if k != "lm_loss.weight") / 2**20
    save_model(model, tmp_path / "ckpt", max_shard_mb=total_mb / 3)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert torch.equal(logits(model), logits(load_model(tmp_path / "ckpt")))
    hf, info = XLNetLMHeadModel.from_pretrained(str(tmp_path / "ckpt"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.allclose(hf_logits(hf.eval()), logits(model), atol=1e-5, rtol=0)


def test_resaving_replaces_the_other_weight_layout(tmp_path):
    """A single file after shards (or shards after a single file) leaves no stale weights behind:
    the loader prefers model.safetensors, so a stale one would shadow new shards."""
    old, new = tiny_model(seed=5), tiny_model(seed=6)
    save_model(old, tmp_path / "ckpt")
    save_model(new, tmp_path / "ckpt", max_shard_mb=0.01)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert torch.equal(logits(new), logits(load_model(tmp_path / "ckpt")))
    save_model(old, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(logits(old), logits(load_model(tmp_path / "ckpt")))


def test_missing_shard_is_named(tmp_path):
    save_model(tiny_model(seed=4), tmp_path / "ckpt", max_shard_mb=0.01)
    victim = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is missing"):
        load_model(tmp_path / "ckpt")


def test_bad_shard_size_is_refused(tmp_path):
    with pytest.raises(InputError, match="max_shard_mb must be positive"):
        save_model(tiny_model(seed=4), tmp_path / "ckpt", max_shard_mb=0)


def test_load_pytorch_bin_with_tied_key(tmp_path):
    model = tiny_model(seed=2)
    model.config.save(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # includes lm_loss.weight
    loaded = load_model(tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_load_bin_without_tied_key(tmp_path):
    model = tiny_model(seed=2)
    model.config.save(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_loss.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_load_with_extra_hf_buffer(tmp_path):
    model = tiny_model()
    model.config.save(tmp_path)
    state = dict(model.state_dict())
    state["transformer.position_ids"] = torch.arange(8)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_seg_embed_keys_are_loaded(saved):
    from safetensors.torch import load_file

    model, path = saved
    state = load_file(str(path / "model.safetensors"))
    assert "transformer.layer.0.rel_attn.seg_embed" in state
    assert "lm_loss.weight" not in state  # tied, stored once
    loaded = load_model(path)
    assert torch.equal(loaded.transformer.layer[0].rel_attn.seg_embed, model.transformer.layer[0].rel_attn.seg_embed)


def test_save_overwrites_atomically(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    save_model(first, tmp_path / "m")
    save_model(second, tmp_path / "m")
    assert torch.equal(logits(load_model(tmp_path / "m")), logits(second))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    first = tiny_model(seed=1)
    save_model(first, tmp_path / "m")
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(seed=2), tmp_path / "m")
    monkeypatch.undo()
    assert torch.equal(logits(load_model(tmp_path / "m")), logits(first))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_save_pretrained_from_pretrained_and_tokenizer(tmp_path):
    tok = train_tokenizer(["hello world, hello there. " * 20], vocab_size=300)
    model = tiny_model(vocab_size=300, mask_token_id=1)
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = ASARM.from_pretrained(tmp_path)
    assert loaded.tokenizer is not None
    assert loaded.config.mask_token_id == 6  # the tokenizer's <mask> wins over the config
    assert load_model(tmp_path, mask_token_id=4).config.mask_token_id == 4
    assert torch.equal(logits(loaded), logits(model))
    # tokenizer attached to the model is saved by default
    save_model(loaded, tmp_path / "again")
    assert load_model(tmp_path / "again").tokenizer is not None


def test_mask_token_from_config(tmp_path):
    save_model(tiny_model(mask_token_id=7), tmp_path)
    assert load_model(tmp_path).config.mask_token_id == 7
    with pytest.raises(InputError, match="outside the vocabulary"):
        load_model(tmp_path, mask_token_id=99)


def test_mask_token_default_without_asarm_field(tmp_path):
    save_model(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["asarm_mask_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).config.mask_token_id == 6


def test_lazy_public_names(saved):
    assert asarm.load_model is load_model and asarm.save_model is save_model


# --- errors -----------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tmp_path / "f")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_invalid_json_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)


def test_config_not_xlnet(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        load_model(tmp_path)


def test_missing_weights(tmp_path):
    tiny_config().save(tmp_path)
    with pytest.raises(CheckpointError, match="no weight file.*model.safetensors.*pytorch_model.bin"):
        load_model(tmp_path)


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_model(path)


def test_garbage_safetensors(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)


def test_bad_pickle(tmp_path):
    tiny_config().save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: corrupt weight file"):
        load_model(tmp_path)


def test_truncated_bin(tmp_path):
    model = tiny_model()
    model.config.save(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt weight file"):
        load_model(tmp_path)


def test_unsafe_pickle_refused(tmp_path):
    tiny_config().save(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="corrupt weight file"):
        load_model(tmp_path)


def test_missing_keys(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(str(path / "model.safetensors"))
    del state["transformer.layer.1.ff.layer_1.weight"]
    del state["transformer.mask_emb"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"do not match config.json: 2 missing key\(s\): "
                                              r"transformer.layer.1.ff.layer_1.weight, transformer.mask_emb"):
        load_model(path)


def test_unexpected_keys(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(str(path / "model.safetensors"))
    state["transformer.layer.2.ff.layer_1.weight"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): transformer.layer.2.ff.layer_1.weight"):
        load_model(path)


def test_wrong_shapes(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_inner"] = 48
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch\(es\): transformer.layer.0.ff.layer_1.bias has shape "
                                              r"\(32,\), config needs \(48,\)"):
        load_model(path)


def test_vocab_mismatch(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer.word_embedding.weight has shape"):
        load_model(path)


# --- shipped names and hub ids ------------------------------------------------------------------
def test_shipped_model_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "SHIPPED_DIR", tmp_path / "shipped")
    assert shipped_models() == []
    with pytest.raises(CheckpointError, match=f"shipped model '{DEFAULT_MODEL}' is not installed"):
        load_model(DEFAULT_MODEL)


def test_shipped_model_found(monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "SHIPPED_DIR", tmp_path)
    model = tiny_model(seed=4)
    save_model(model, tmp_path / "asarm-en-small")
    assert shipped_models() == ["asarm-en-small"]
    assert torch.equal(logits(load_model("asarm-en-small")), logits(model))
    assert torch.equal(logits(load_model()), logits(model))  # the default name


def test_unknown_short_name():
    with pytest.raises(CheckpointError, match="does not exist.*not a shipped model"):
        load_model("no-such-model-anywhere")


def test_hub_unreachable(monkeypatch):
    import huggingface_hub

    calls = []

    def offline(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="hub is unreachable.*local checkpoint directory"):
        load_model("therealgabeguo/ASARM", revision="nlp")
    assert calls[0]["repo_id"] == "therealgabeguo/ASARM" and calls[0]["revision"] == "nlp"


def test_hub_download_path_is_loaded(monkeypatch, tmp_path):
    import huggingface_hub

    model = tiny_model(seed=6)
    save_model(model, tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(tmp_path / "snap"))
    loaded = load_model("therealgabeguo/ASARM", revision="code")
    assert torch.equal(logits(loaded), logits(model))


# --- hostile configs: refused before anything is allocated (issue 15) ----------------------------
@pytest.mark.parametrize("field,value,message", [
    ("n_layer", 100000, "n_layer = 100000 is larger than any supported model"),
    ("d_model", 10**9, "d_model = 1000000000 is larger"),
    ("vocab_size", 2**40, "vocab_size = 1099511627776 is larger"),
    ("d_inner", 1e9, "d_inner must be a positive integer"),
    ("n_layer", True, "n_layer must be a positive integer"),
])
def test_hostile_config_sizes_are_refused(saved, field, value, message):
    import time

    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    if field == "d_model":
        cfg["d_head"] = value // cfg["n_head"]
    (path / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
    assert time.perf_counter() - start < 5  # nothing big was built


def test_config_within_bounds_but_not_the_weights_is_refused_before_allocation(saved, monkeypatch):
    """n_layer=1000 with a 3-layer weight file: the header says so; the model is never built."""
    from asarm import model as model_module

    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(n_layer=1000, d_model=1024, n_head=16, d_head=64, d_inner=4096)  # 12.6G parameters
    (path / "config.json").write_text(json.dumps(cfg))
    built = []
    monkeypatch.setattr(model_module.ASARM, "reset_parameters", lambda self, *a: built.append(1))
    with pytest.raises(CheckpointError, match="config.json says n_layer=1000, the weight file has"):
        load_model(path)
    assert not built


def test_parameter_estimate_counts_the_real_model():
    model = tiny_model(vocab_size=30, d_model=24, n_head=3, d_inner=40, n_layer=3)
    assert model.config.parameter_estimate() == model.num_parameters()


def test_header_shapes_without_loading(saved):
    _, path = saved
    shapes = storage.header_shapes(path)
    assert shapes["transformer.layer.0.ff.layer_1.weight"] == (32, 16)
    torch.save({k: torch.zeros(v) for k, v in shapes.items()}, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert storage.header_shapes(path) == shapes


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", ".."])
def test_shard_paths_stay_in_the_model_directory(tmp_path, shard):
    """A shard named ../../../../etc/passwd in model.safetensors.index.json was opened."""
    import json

    from asarm.errors import CheckpointError
    from asarm.storage import _shard_paths

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="not a file of the model directory"):
        _shard_paths(index)
