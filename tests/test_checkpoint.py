"""Checkpoints: exact round trips without pickle, latest.json and pruning, every way a checkpoint
can be broken (corrupt, truncated, missing, newer, not a checkpoint) named in the error. The
recovery from a damaged one is tested in tests/test_checkpoint_search.py."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npformer.data.tokenizers import ByteBPETokenizer, CharTokenizer
from npformer.training.checkpoint import (VERSION, CheckpointError, load_checkpoint, meta_digest, resolve_checkpoint,
                                          save_checkpoint)


def make_states(seed=0):
    """A model state (float32 and float64 arrays) and a flat optimizer state like AdamW's."""
    rng = np.random.default_rng(seed)
    model = {"transformer.wte.weight": rng.standard_normal((7, 4)).astype(np.float32),
             "transformer.ln_f.bias": rng.standard_normal(4),
             "lm_head.scale": np.float32(rng.standard_normal())}
    opt = {"optimizer": "AdamW", "n_groups": 1, "group.0.n_params": 1, "group.0.lr": 1e-3,
           "group.0.betas": [0.9, 0.99], "group.0.param_names": ["transformer.wte.weight"],
           "param.0.0.shape": np.array([7, 4]), "state.0.0.exp_avg": rng.standard_normal((7, 4)),
           "scalar.0.0.step": 3}
    return model, opt


META = {"model": "gpt", "run": {"step": 0, "best_val": 1.25, "note": "héllo"}}


def save(out, step, seed=0, keep=2, tok=None):
    model, opt = make_states(seed)
    return save_checkpoint(str(out), step, model, opt, tok or CharTokenizer("hello world"),
                           {**META, "run": {**META["run"], "step": step}}, keep=keep)


def ckpt_dirs(out):
    return sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))


def latest_name(out):
    with open(os.path.join(out, "latest.json"), encoding="utf-8") as f:
        return json.load(f)["checkpoint"]


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("tok", [CharTokenizer("hello world\n"),
                                 ByteBPETokenizer().train("low lower lowest " * 20, 262)])
def test_round_trip_is_exact(tmp_path, tok):
    path = save(tmp_path, 12, seed=3, tok=tok)
    assert path == os.path.join(str(tmp_path), "ckpt-000012")
    ck = load_checkpoint(str(tmp_path))                 # through latest.json ...
    assert ck.path == path and ck.step == 12
    model, opt = make_states(3)
    assert set(ck.model_state) == set(model)
    for k, v in model.items():
        got = ck.model_state[k]
        assert got.dtype == np.asarray(v).dtype and got.shape == np.shape(v)
        np.testing.assert_array_equal(got, v)
    assert set(ck.optimizer_state) == set(opt)
    for k, v in opt.items():
        np.testing.assert_array_equal(ck.optimizer_state[k], np.asarray(v))
    assert ck.meta["model"] == "gpt" and ck.meta["run"] == {**META["run"], "step": 12}
    assert ck.meta["version"] == VERSION and ck.tokenizer == tok
    assert type(ck.tokenizer) is type(tok)
    again = load_checkpoint(path)                       # ... or the checkpoint directory itself
    assert again.path == path and again.meta == ck.meta


def test_npz_files_hold_no_object_arrays(tmp_path):
    path = save(tmp_path, 1)
    for name in ("model.npz", "optimizer.npz"):
        with np.load(os.path.join(path, name), allow_pickle=False) as z:
            kinds = {k: z[k].dtype.kind for k in z.files}
        assert kinds and "O" not in kinds.values(), (name, kinds)


def test_saving_an_object_array_is_refused(tmp_path):
    model, opt = make_states()
    model["bad"] = np.array([{"a": 1}], dtype=object)
    with pytest.raises(CheckpointError, match="'bad'.*object"):
        save_checkpoint(str(tmp_path), 1, model, opt, CharTokenizer("ab"), META)
    assert not [d for d in os.listdir(tmp_path) if "ckpt" in d]    # nothing half-written is left


def test_an_object_array_on_disk_is_not_unpickled(tmp_path):
    path = save(tmp_path, 1)
    np.savez(os.path.join(path, "model.npz"), w=np.array([{"a": 1}], dtype=object))
    # make the checksums consistent, so only allow_pickle=False can stop it
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(path, "model.npz"), "rb") as f:
        meta["sha256"]["model.npz"] = hashlib.sha256(f.read()).hexdigest()
    meta["meta_sha256"] = meta_digest(meta)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(CheckpointError, match="model.npz cannot be read.*pickle"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- latest.json, keep

def test_latest_points_at_newest_and_only_keep_newest_remain(tmp_path):
    for step in (4, 8, 12, 16, 20):
        save(tmp_path, step, seed=step, keep=3)
        assert latest_name(tmp_path) == f"ckpt-{step:06d}"
        assert load_checkpoint(str(tmp_path)).step == step
    assert ckpt_dirs(tmp_path) == ["ckpt-000012", "ckpt-000016", "ckpt-000020"]
    save(tmp_path, 24, keep=1)
    assert ckpt_dirs(tmp_path) == ["ckpt-000024"]
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp")]


def test_pruning_orders_steps_numerically(tmp_path):
    save(tmp_path, 999_999, keep=1)
    save(tmp_path, 1_000_000, keep=1)      # "ckpt-1000000" sorts before "ckpt-999999" as text
    assert ckpt_dirs(tmp_path) == ["ckpt-1000000"]
    assert load_checkpoint(str(tmp_path)).step == 1_000_000


def test_orphan_is_replaced_and_latest_never_removed(tmp_path):
    save(tmp_path, 4, keep=2)
    # a run killed after renaming ckpt-000008 into place but before moving latest.json
    orphan = tmp_path / "ckpt-000008"
    orphan.mkdir()
    (orphan / "model.npz").write_bytes(b"half written")
    assert latest_name(tmp_path) == "ckpt-000004"
    save(tmp_path, 8, seed=1, keep=2)
    ck = load_checkpoint(str(tmp_path))
    assert ck.step == 8 and ck.path == str(orphan)
    np.testing.assert_array_equal(ck.model_state["transformer.ln_f.bias"], make_states(1)[0]["transformer.ln_f.bias"])
    # saving the latest step again never removes (or rewrites) the latest checkpoint
    before = {f: (orphan / f).read_bytes() for f in os.listdir(orphan)}
    save(tmp_path, 8, seed=2, keep=1)
    assert {f: (orphan / f).read_bytes() for f in os.listdir(orphan)} == before
    # keep=1 while saving an older step than some on disk: the new latest survives pruning
    save(tmp_path, 6, keep=1)
    assert latest_name(tmp_path) == "ckpt-000006" and load_checkpoint(str(tmp_path)).step == 6


# ----------------------------------------------------------------------------- broken checkpoints

def flip_byte(path, offset):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset % len(data)] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


def truncate(path, keep_fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep_fraction))


def edit_meta(path, drop=(), **changes):
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta.update(changes)
    for key in drop:
        del meta[key]
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _meta_digit(path):
    """Offset of the step value's last digit in meta.json (a flip there keeps the JSON valid)."""
    with open(os.path.join(path, "meta.json"), "rb") as f:
        text = f.read()
    return text.index(b'"step": 7') + len(b'"step": 7') - 1


J = os.path.join
BREAKAGES = {    # name: (damage done to the checkpoint directory p, what the error must say)
    "flipped model.npz": (lambda p: flip_byte(J(p, "model.npz"), 1000), r"model\.npz is corrupt"),
    "flipped optimizer.npz": (lambda p: flip_byte(J(p, "optimizer.npz"), -100), r"optimizer\.npz is corrupt"),
    "flipped tokenizer.json": (lambda p: flip_byte(J(p, "tokenizer.json"), 12), r"tokenizer\.json is corrupt"),
    "flipped meta.json value": (lambda p: flip_byte(J(p, "meta.json"), _meta_digit(p)),
                                r"meta\.json is corrupt \(checksum"),
    "flipped meta.json brace": (lambda p: flip_byte(J(p, "meta.json"), 0), r"meta\.json is corrupt"),
    "truncated model.npz": (lambda p: truncate(J(p, "model.npz")), r"model\.npz is corrupt or truncated"),
    "truncated optimizer.npz": (lambda p: truncate(J(p, "optimizer.npz"), 0.9), r"optimizer\.npz .*truncated"),
    "empty model.npz": (lambda p: truncate(J(p, "model.npz"), 0.0), r"model\.npz is corrupt or truncated"),
    "missing model.npz": (lambda p: os.remove(J(p, "model.npz")), r"model\.npz is missing"),
    "missing tokenizer.json": (lambda p: os.remove(J(p, "tokenizer.json")), r"tokenizer\.json is missing"),
    "missing meta.json": (lambda p: os.remove(J(p, "meta.json")), r"ckpt-000007 is incomplete: meta\.json is missing"),
    "newer version": (lambda p: edit_meta(p, version=VERSION + 1), rf"format version {VERSION + 1}, newer"),
    "invalid version": (lambda p: edit_meta(p, version="1"), r"invalid format version '1'"),
    "other format": (lambda p: edit_meta(p, format="something-else"), r"not an npformer checkpoint"),
    "meta checksum wrong": (lambda p: edit_meta(p, meta_sha256="0" * 64), r"meta\.json is corrupt \(checksum"),
    "file checksums dropped": (lambda p: edit_meta(p, drop=("meta_sha256",), sha256={}),
                               r"meta\.json has no checksum for model\.npz"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_broken_checkpoint_raises_naming_the_problem(tmp_path, name):
    path = save(tmp_path, 7)
    load_checkpoint(str(tmp_path))                      # fine before
    breakage, message = BREAKAGES[name]
    breakage(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"{not json", b'{"nothing": 1}', b'["ckpt-000007"]', b"\xff\xfe",
                                     b'{"checkpoint": "ckpt-000099"}', b""])
def test_corrupt_latest_json(tmp_path, content):
    save(tmp_path, 7)
    (tmp_path / "latest.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"latest\.json (is corrupt|points at ckpt-000099, which is missing)"):
        load_checkpoint(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "absent"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="not found|holds no checkpoint"):
        load_checkpoint(str(tmp_path / "notes.txt"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not an npformer checkpoint"):
        load_checkpoint(str(tmp_path / "d"))


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    save(tmp_path, 4)
    before = {f: (tmp_path / "ckpt-000004" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt-000004")}

    class Broken:
        def save(self, path):
            raise OSError("disk full")

    model, opt = make_states()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), 8, model, opt, Broken(), META)
    assert ckpt_dirs(tmp_path) == ["ckpt-000004"] and latest_name(tmp_path) == "ckpt-000004"
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp")]
    assert {f: (tmp_path / "ckpt-000004" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt-000004")} == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save(tmp_path, 3)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    for name in ("latest.json", "ckpt-000003/meta.json", "ckpt-000003/model.npz"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    """A `.tmp-ckpt-*-PID` directory left by a process killed mid-save is deleted by the next save;
    one whose process is alive (here: this test's own parent) is kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".tmp-ckpt-000004-{dead}"
    alive = tmp_path / f".tmp-ckpt-000004-{os.getppid()}"
    for d in (stale, alive):
        d.mkdir()
        (d / "model.npz").write_bytes(b"partial")
    save_checkpoint(str(tmp_path), 8, {"w": np.ones(2)}, {}, CharTokenizer("ab"), {})
    assert not stale.exists()
    assert alive.exists()
    assert (tmp_path / "ckpt-000008" / "meta.json").exists()
