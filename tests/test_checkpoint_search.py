"""Recovery from a damaged checkpoint (npformer/training/checkpoint_search.py and the fallback of
npformer/training/checkpoint.py): find_intact's order, load_checkpoint/load_meta with and without
fallback, a newer format version, set_aside_damaged, and pruning around damaged entries."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from npformer.training.checkpoint import (VERSION, CheckpointError, NewerCheckpointError, find_intact,
                                          load_checkpoint, load_meta, set_aside_damaged)
from npformer.training.loading import load_gpt
from tests.test_checkpoint import J, ckpt_dirs, edit_meta, flip_byte, latest_name, make_states, save, truncate


# ----------------------------------------------------------------------------- recovery

DAMAGE = {    # name: (damage done to the newest checkpoint p, what its reason must say)
    "flipped model.npz": (lambda p: flip_byte(J(p, "model.npz"), 1000),
                          r"model\.npz is corrupt or truncated \(checksum mismatch\)"),
    "truncated optimizer.npz": (lambda p: truncate(J(p, "optimizer.npz")), r"optimizer\.npz is corrupt or truncated"),
    "deleted tokenizer.json": (lambda p: os.remove(J(p, "tokenizer.json")), r"is incomplete: tokenizer\.json is missing"),
    "corrupt meta.json": (lambda p: flip_byte(J(p, "meta.json"), 0), r"meta\.json is corrupt"),
    "deleted meta.json": (lambda p: os.remove(J(p, "meta.json")), r"is incomplete: meta\.json is missing"),
}


def two_checkpoints(out, keep=2):
    """ckpt-000200 (weights of seed 2) and ckpt-000400 (seed 4), latest.json at 400; their paths."""
    return save(out, 200, seed=2, keep=keep), save(out, 400, seed=4, keep=keep)


def assert_weights_of(ck, seed):
    np.testing.assert_array_equal(ck.model_state["transformer.wte.weight"],
                                  make_states(seed)[0]["transformer.wte.weight"])


@pytest.mark.parametrize("name", list(DAMAGE))
def test_fallback_skips_a_damaged_newest_checkpoint(tmp_path, name):
    old, new = two_checkpoints(tmp_path)
    damage, reason = DAMAGE[name]
    damage(new)
    d, damaged = find_intact(str(tmp_path))
    assert d == old and [p for p, _ in damaged] == [new]
    assert re.search(reason, damaged[0][1]) and damaged[0][1].startswith(new) and "\n" not in damaged[0][1]
    ck = load_checkpoint(str(tmp_path), fallback=True)
    assert ck.path == old and ck.step == 200 and ck.damaged == damaged
    assert_weights_of(ck, 2)
    assert load_meta(str(tmp_path), fallback=True) == (old, ck.meta)     # the meta the resume will use


@pytest.mark.parametrize("name", list(DAMAGE))
def test_without_fallback_the_error_names_the_newest_intact_checkpoint(tmp_path, name):
    old, new = two_checkpoints(tmp_path)
    damage, reason = DAMAGE[name]
    damage(new)
    hint = re.escape(f"; the newest intact checkpoint is {old} (pass --ckpt {old})") + "$"
    for load in (load_checkpoint, load_meta, load_gpt):        # fallback=False is the default
        with pytest.raises(CheckpointError, match=reason + ".*" + hint) as err:
            load(str(tmp_path))
        assert str(err.value).startswith(new) and "\n" not in str(err.value)
    assert latest_name(tmp_path) == "ckpt-000400" and ckpt_dirs(tmp_path) == ["ckpt-000200", "ckpt-000400"]


def test_latest_json_is_tried_first_then_the_newest_step_down(tmp_path):
    paths = [save(tmp_path, s, seed=s, keep=0) for s in (100, 200, 300)]
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000200"}))
    assert find_intact(str(tmp_path)) == (paths[1], [])        # a newer orphan does not win over latest.json
    truncate(J(paths[1], "model.npz"))
    d, damaged = find_intact(str(tmp_path))
    assert d == paths[2] and [p for p, _ in damaged] == [paths[1]]
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000300"}))
    flip_byte(J(paths[2], "optimizer.npz"), -100)
    d, damaged = find_intact(str(tmp_path))
    assert d == paths[0] and [p for p, _ in damaged] == [paths[2], paths[1]]    # newest first


@pytest.mark.parametrize("content, reason", [
    (b"{not json", r"latest\.json is corrupt"), (b"", r"latest\.json is corrupt"),
    (b'{"nothing": 1}', r"latest\.json is corrupt"), (None, r"latest\.json is missing"),
    (b'{"checkpoint": "ckpt-000600"}', r"latest\.json points at ckpt-000600, which is missing")])
def test_fallback_survives_a_broken_latest_json(tmp_path, content, reason):
    old, new = two_checkpoints(tmp_path)
    latest = tmp_path / "latest.json"
    latest.unlink() if content is None else latest.write_bytes(content)
    d, damaged = find_intact(str(tmp_path))
    assert d == new and len(damaged) == 1                       # every checkpoint is fine: the newest step
    assert damaged[0][0] == str(latest) and re.search(reason, damaged[0][1])
    with pytest.raises(CheckpointError, match=reason + ".*the newest intact checkpoint is " + re.escape(new)):
        load_checkpoint(str(tmp_path))
    assert load_checkpoint(str(tmp_path), fallback=True).path == new


def test_latest_json_naming_a_removed_checkpoint_falls_back_to_the_previous(tmp_path):
    old, new = two_checkpoints(tmp_path)
    shutil.rmtree(new)
    d, damaged = find_intact(str(tmp_path))
    assert d == old
    assert damaged == [(str(tmp_path / "latest.json"),
                        f"{tmp_path / 'latest.json'} points at ckpt-000400, which is missing")]
    shutil.rmtree(old)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint: .*latest\.json points at ckpt-000400"):
        find_intact(str(tmp_path))


def test_a_newer_checkpoint_is_not_skipped_as_damaged(tmp_path):
    old, new = two_checkpoints(tmp_path)
    edit_meta(new, version=VERSION + 1)
    for call in (find_intact, load_checkpoint, lambda p: load_checkpoint(p, fallback=True)):
        with pytest.raises(NewerCheckpointError, match=rf"^{re.escape(new)} has checkpoint format version "
                                                       rf"{VERSION + 1}, newer .*upgrade npformer$"):
            call(str(tmp_path))


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    old, new = two_checkpoints(tmp_path)
    truncate(J(old, "model.npz"))
    flip_byte(J(new, "model.npz"), 1000)
    message = (rf"^{re.escape(new)}/model\.npz is corrupt or truncated \(checksum mismatch\); "
               rf"no intact checkpoint in {re.escape(str(tmp_path))} \(2 tried\)$")
    for call in (find_intact, load_checkpoint, load_meta, lambda p: load_checkpoint(p, fallback=True)):
        with pytest.raises(CheckpointError, match=message):
            call(str(tmp_path))


def test_a_checkpoint_directory_is_verified_alone(tmp_path):
    old, new = two_checkpoints(tmp_path)
    assert find_intact(new) == (new, []) and load_checkpoint(new).damaged == []
    flip_byte(J(new, "model.npz"), 1000)
    for call in (find_intact, lambda p: load_checkpoint(p, fallback=True), lambda p: load_meta(p, fallback=True)):
        with pytest.raises(CheckpointError, match=r"model\.npz is corrupt or truncated \(checksum mismatch\)$"):
            call(new)                                           # no fallback to ckpt-000200, no hint


def test_set_aside_damaged_then_save_at_the_same_step(tmp_path):
    old, new = two_checkpoints(tmp_path)
    flip_byte(J(new, "model.npz"), 1000)
    (tmp_path / "latest.json").write_text("{not json")         # reported, repointed, not renamed
    d, damaged = find_intact(str(tmp_path))
    assert d == old and [p for p, _ in damaged] == [str(tmp_path / "latest.json"), new]
    moved = set_aside_damaged(str(tmp_path), damaged, d)
    assert moved == [str(tmp_path / "damaged-ckpt-000400")]
    assert sorted(os.listdir(moved[0])) == ["meta.json", "model.npz", "optimizer.npz", "tokenizer.json"]
    assert ckpt_dirs(tmp_path) == ["ckpt-000200"] and latest_name(tmp_path) == "ckpt-000200"
    assert find_intact(str(tmp_path)) == (old, [])              # damaged-* is never tried
    assert load_checkpoint(str(tmp_path)).damaged == []
    # the resumed run reaches step 400 again: a fresh checkpoint that verifies
    save(tmp_path, 400, seed=9)
    ck = load_checkpoint(str(tmp_path))
    assert ck.path == new and ck.damaged == [] and (tmp_path / "damaged-ckpt-000400").is_dir()
    assert_weights_of(ck, 9)
    # damaged again at the same step: the name is taken
    truncate(J(new, "optimizer.npz"))
    assert set_aside_damaged(str(tmp_path), find_intact(str(tmp_path))[1], old) == [str(tmp_path / "damaged-ckpt-000400-2")]
    with pytest.raises(CheckpointError, match="not a checkpoint directory in"):
        set_aside_damaged(str(tmp_path), [], str(tmp_path / "damaged-ckpt-000400"))


def test_saving_the_latest_step_again_replaces_it_when_damaged(tmp_path):
    path = save(tmp_path, 8, seed=1)
    flip_byte(J(path, "model.npz"), 1000)
    save(tmp_path, 8, seed=2)
    ck = load_checkpoint(str(tmp_path))
    assert ck.path == path
    assert_weights_of(ck, 2)


@pytest.mark.parametrize("keep, newest", [(1, [30]), (2, [20, 30]), (0, [10, 20, 30]), (-1, [10, 20, 30])])
def test_pruning_keeps_the_newest_and_leaves_other_entries(tmp_path, keep, newest):
    others = {"damaged-ckpt-000001", "damaged-ckpt-000002-2", f".tmp-ckpt-000003-{os.getppid()}", "ckpt-notes"}
    for name in others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.npz").write_bytes(b"kept")
    for step in (10, 20, 30):
        save(tmp_path, step, seed=step, keep=keep)
    assert set(os.listdir(tmp_path)) == others | {"latest.json"} | {f"ckpt-{s:06d}" for s in newest}
    save(tmp_path, 5, keep=keep)                                # older than all: kept anyway, as latest
    assert set(os.listdir(tmp_path)) == others | {"latest.json"} | {f"ckpt-{s:06d}" for s in [5, *newest]}
    assert load_checkpoint(str(tmp_path)).step == 5
