"""Run folders as an attacker or a full disk would leave them: nothing in a run folder is
unpickled, resume falls back to the newest readable checkpoint, write failures are one clear
line with no temporary folders left and nothing saved lost, the HF export is fsynced."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from asarm.errors import CheckpointError
from asarm.train import RunFolderError, TrainConfig, export_model, export_run, main, read_trainer_state, train
from asarm.train import checkpoints as ck
from conftest import tiny_model
from test_train import corpus, losses, tiny_cfg, write_cfg  # noqa: F401  (corpus is a fixture)


class Planted:
    """A pickle that runs a shell command when it is loaded with pickle's full power."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_state(model, step: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "stream": {"epoch": 0, "index": 8 * step}, "best_valid": 1.5, "tokens": 64 * step,
            "elapsed_s": 0.25, "rng": {0: ck.rng_states()}, "config": {"seq_len": 32, "adam_betas": (0.9, 0.98)}}


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the trainer state without pickle ------------------------------------------------------------
def test_trainer_state_round_trips_without_pickle(tmp_path):
    model = tiny_model()
    random.seed(3)
    np.random.seed(4)
    state = tiny_state(model, 5)
    ck.save_checkpoint(tmp_path, model, state, best=True)
    folder = tmp_path / "step-0000005"
    assert entries(folder) == ["config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    back = read_trainer_state(folder)
    opt, opt_back = state["optimizer"], back["optimizer"]
    assert opt_back["param_groups"] == opt["param_groups"] and isinstance(opt_back["param_groups"][0]["betas"], tuple)
    assert set(opt_back["state"]) == set(opt["state"]) and all(isinstance(k, int) for k in opt_back["state"])
    for k, v in opt["state"].items():
        for name, t in v.items():
            assert torch.equal(opt_back["state"][k][name], t) and opt_back["state"][k][name].dtype == t.dtype
    assert back["scheduler"] == state["scheduler"] and back["config"] == state["config"]
    # the RNG states come back exactly: the next draws are the same
    expect = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_states(back["rng"][0])
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2]
    with pytest.raises(TypeError, match="without pickle"):
        ck.encode_state({"x": object()}, {})


def test_planted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    torch.save({"step": 1, "optimizer": Planted(marker)}, folder / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="not plain data"):
        read_trainer_state(folder)
    assert not marker.exists()
    # an older asarm's plain trainer_state.pt (numpy RNG state included) still reads
    torch.save(tiny_state(tiny_model(), 1) | {"rng": {0: {"torch": torch.get_rng_state(),
                                                           "numpy": np.random.get_state()}}}, folder / "trainer_state.pt")
    assert read_trainer_state(folder)["step"] == 1


def test_damaged_checkpoints_fall_back_with_a_warning(tmp_path):
    model = tiny_model()
    ck.save_checkpoint(tmp_path, model, tiny_state(model, 5), best=True)
    ck.save_checkpoint(tmp_path, model, tiny_state(model, 10), best=False)  # BEST keeps step 5
    assert entries(tmp_path) == ["BEST", "LATEST", "step-0000005", "step-0000010"]
    latest = tmp_path / "step-0000010" / "trainer_state.json"
    good = latest.read_bytes()
    for damage in (b"", good[: len(good) // 2], b"\x00" * 64):  # empty, truncated, garbage
        latest.write_bytes(damage)
        warnings = []
        folder, state = ck.load_newest(ck.candidates(tmp_path, "LATEST"), read_trainer_state, warnings.append)
        assert folder.name == "step-0000005" and state["step"] == 5
        assert len(warnings) == 1 and "step-0000010" in warnings[0] and "\n" not in warnings[0]
    (tmp_path / "step-0000005" / "trainer_state.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint: step-0000010: .*; step-0000005: "):
        ck.load_newest(ck.candidates(tmp_path, "LATEST"), read_trainer_state, lambda *a: None)
    # LATEST naming a deleted folder
    shutil.rmtree(tmp_path / "step-0000010")
    with pytest.raises(CheckpointError, match="step-0000010: the folder does not exist"):
        ck.load_newest(ck.candidates(tmp_path, "LATEST"), read_trainer_state, lambda *a: None)


def test_the_previous_checkpoint_is_kept_for_resume_to_fall_back_to(tmp_path):
    model = tiny_model()
    for step in (5, 10, 15):  # each the best so far: LATEST and BEST name the same folder
        ck.save_checkpoint(tmp_path, model, tiny_state(model, step), best=True)
    assert entries(tmp_path) == ["BEST", "LATEST", "step-0000010", "step-0000015"]
    (tmp_path / "step-0000015" / "model.safetensors").write_bytes(b"\x00" * 16)  # one damaged file
    warnings = []
    folder, state = ck.load_newest(ck.candidates(tmp_path, "LATEST"),
                                   lambda d: (ck.load_checkpoint_weights(tiny_model(), d), read_trainer_state(d))[1],
                                   warnings.append)
    assert folder.name == "step-0000010" and state["step"] == 10 and len(warnings) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda st: st.update(step=-3), "step must be an integer >= 0, got -3"),
    (lambda st: st.update(step=True), "step must be an integer >= 0"),
    (lambda st: st["rng"][0].update(torch=torch.zeros(7, dtype=torch.uint8)), "bad RNG state of rank 0: the torch"),
    (lambda st: st["rng"][0].update(python=(3, (1, 2), None)), "bad RNG state of rank 0: the python"),
    (lambda st: st.update(rng={0: "garbage"}), "bad RNG state of rank 0"),
    (lambda st: st.update(rng=["x"]), "bad RNG state: expected one entry per rank"),
])
def test_a_negative_step_or_a_bad_rng_state_is_a_clear_error(tmp_path, damage, message):
    model = tiny_model()
    state = tiny_state(model, 5)
    damage(state)
    with pytest.raises(CheckpointError, match=message):
        read_trainer_state(ck.save_checkpoint(tmp_path, model, state))


def test_deeply_nested_trainer_state_json_is_one_line(tmp_path):
    model = tiny_model()
    ck.save_checkpoint(tmp_path, model, tiny_state(model, 5))
    folder = tmp_path / "step-0000005"
    (folder / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_trainer_state(folder)
    nested = {"format": ck.FORMAT, "state": json.loads("[" * 900 + "]" * 900)}  # parses, then decodes deeply
    (folder / "trainer_state.json").write_text(json.dumps(nested))
    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)  # decode_state recursion hits the limit before json's parser would
    try:
        with pytest.raises(CheckpointError, match="nested too deeply"):
            read_trainer_state(folder)
    finally:
        sys.setrecursionlimit(limit)


# --- runs ------------------------------------------------------------------------------------------
def test_resume_falls_back_to_the_newest_readable_checkpoint_and_continues_exactly(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    cfg = tiny_cfg(corpus, out, max_steps=6, save_every=3, eval_every=100)
    train(TrainConfig(**{**cfg, "max_steps": 3}))
    step3 = tmp_path / "step-0000003"
    shutil.copytree(out / "checkpoints" / "step-0000003", step3)
    train(TrainConfig(**cfg), resume=True)  # steps 4-6; step 3's folder is kept as the previous checkpoint
    reference = losses(out)
    assert [s for s, _ in reference] == [str(i) for i in range(1, 7)]
    assert (out / "checkpoints" / "step-0000003").is_dir()
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as resume left it: the copy from before
    shutil.copytree(step3, out / "checkpoints" / "step-0000003")
    (out / "checkpoints" / "step-0000006" / "trainer_state.json").write_text("")  # truncated
    capfd.readouterr()
    result = train(TrainConfig(**cfg), resume=True)
    err = capfd.readouterr().err
    assert "warning: checkpoint" in err and "step-0000006 is unreadable" in err and "resumed from" in err
    assert result["step"] == 6 and losses(out) == reference  # steps 4-6 again, the same numbers
    # LATEST naming a deleted folder, nothing else left: one clear error
    for p in (out / "checkpoints").iterdir():
        if p.is_dir():
            shutil.rmtree(p)
    assert main(["--config", str(write_cfg(tmp_path / "c.json", cfg)), "--resume"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("asarm train: error: --resume:") and "does not exist" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_disk_full_during_a_checkpoint(corpus, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    cfg = tiny_cfg(corpus, out, max_steps=10, save_every=5, eval_every=100)
    real_save = ck.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # the second checkpoint's trainer-state tensors
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    assert main(["--config", str(write_cfg(tmp_path / "c.json", cfg))]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("asarm train: error: cannot write checkpoint") and "No space left on device" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert entries(out / "checkpoints") == ["BEST", "LATEST", "step-0000005"]  # no .tmp folder left
    assert read_trainer_state(out / "checkpoints" / "step-0000005")["step"] == 5
    monkeypatch.setattr(ck, "save_file", real_save)  # space freed: the run continues
    assert train(TrainConfig(**cfg), resume=True)["step"] == 10
    assert [s for s, _ in losses(out)] == [str(i) for i in range(1, 11)]

    # a full disk during the HF export leaves the previous export as it was
    before = (out / "model" / "model.safetensors").read_bytes()
    import safetensors.torch

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(RunFolderError, match="cannot write the export .*No space left on device"):
        export_run(TrainConfig(**cfg), "latest")
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folders


def _make_read_only(folder: Path, monkeypatch) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return  # root ignores permissions but not the immutable attribute
    import asarm.train.trainer as trainer_module

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(trainer_module, "write_text_atomic", read_only)


def _undo_read_only(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    elif shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_read_only_output_folder_is_one_line(corpus, tmp_path, monkeypatch, capfd):
    out = tmp_path / "ro"
    out.mkdir()
    cfg = write_cfg(tmp_path / "c.json", tiny_cfg(corpus, out))
    _make_read_only(out, monkeypatch)
    try:
        assert main(["--config", str(cfg)]) == 2
        assert entries(out) == []
    finally:
        _undo_read_only(out)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"asarm train: error: cannot write the run folder {out}")


def test_planted_pickles_in_a_run_folder_never_run(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    cfg_path = write_cfg(tmp_path / "c.json", tiny_cfg(corpus, out, max_steps=2, save_every=1, eval_every=100))
    assert main(["--config", str(cfg_path)]) == 0
    marker = tmp_path / "pwned"
    for folder in (out / "checkpoints").iterdir():
        if folder.is_dir():  # the attack of issue 15: a pickle as trainer_state.pt
            for name in ("trainer_state.json", "trainer_state.safetensors"):
                (folder / name).unlink()
            torch.save({"step": 2, "optimizer": Planted(marker)}, folder / "trainer_state.pt")
    capfd.readouterr()
    assert main(["--config", str(cfg_path), "--export", "latest"]) == 2
    assert main(["--config", str(cfg_path), "--resume", "--set", "max_steps=4"]) == 2
    err = capfd.readouterr().err
    assert not marker.exists() and "Traceback" not in err and "no readable checkpoint" in err
    torch.save({"train": Planted(marker), "valid": Planted(marker)}, out / "prepared" / "chunks.pt")
    assert main(["--config", str(cfg_path), "--resume", "--set", "max_steps=4"]) == 2
    assert not marker.exists() and "chunks.pt is unreadable" in capfd.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name fsynced files")
def test_export_fsyncs_files_and_folder_before_and_after_renaming(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "export"
    export_model(tiny_model(), None, target, dtype="fp32")
    moves = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and Path(e[2]).parent == target]
    assert {Path(e[2]).name for _, e in moves} == {"config.json", "model.safetensors"}
    assert moves[-1][1][2].endswith("config.json")  # the config last: a reader never sees it without weights
    for i, (_, src, _) in moves:
        assert ("fsync", src) in events[:i], f"{src} renamed before it was fsynced"
    assert ("fsync", str(target)) in events[moves[-1][0]:], "the export folder was not fsynced after the renames"
    assert json.loads((target / "config.json").read_text())["model_type"] == "xlnet"
