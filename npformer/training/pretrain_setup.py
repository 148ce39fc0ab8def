"""The start-up of ``npformer pretrain`` (pretrain.py): settings on resume, data, tokenizer, memory check.

Everything here runs before the run writes anything, on every rank of a distributed run
(docs/distributed.md), and raises for anything wrong: a resume with other settings, changed
data, a text shorter than a block, a run that would not fit in memory.
"""

from __future__ import annotations

import dataclasses

from .. import distributed
from ..data import ByteBPETokenizer, CharTokenizer, DataError, WordPieceStream, default_corpus, load_text
from ..data.dataset import data_fingerprint
from .checkpoint import CheckpointError
from .memory import available_memory, check_pretrain_memory
from .rundir import check_resumable, set_aside

MODEL_FIELDS = ("model", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias")


def setup(cfg, ckpt, log, comm):
    """(cfg with its resumed and derived settings, (train_text, val_text, fingerprint, tok, estimate,
    train_ids, val_ids, chars_per_token)): the start-up of pretrain.py's run, on every rank.

    ckpt: the checkpoint a resume continues from, else None; comm: None, or the run's communicator
    (rank 0 alone sets damaged checkpoints aside). Raises before anything is written."""
    root = comm is None or comm.rank == 0
    if cfg.resume:
        saved = ckpt.meta.get("pretrain_config", {})
        for name in ("warmup_iters", "lr_decay_iters"):         # None: the original schedule
            if getattr(cfg, name) is None and isinstance(saved.get(name), int):
                cfg = dataclasses.replace(cfg, **{name: saved[name]})
        cfg = cfg.checked()
        # the data is compared by its fingerprint below, wherever the file is now
        fields = MODEL_FIELDS + ("tokenizer", "seed", "batch_size")
        if cfg.model == "bert":             # BERT's recipe: short blocks first, longer ones later
            fields = tuple(f for f in fields if f != "block_size") + ("max_positions",)
        check_resumable(cfg, ckpt, "pretrain_config", fields)
        was = saved.get("block_size")
        if was is not None and was != cfg.block_size:
            log(f"note: the blocks change from {was} to {cfg.block_size} tokens (the position table has "
                f"{cfg.max_positions}): the run goes on with other rows, as BERT's short-then-long schedule does")

    if comm is not None:                    # the global batch's shards: each rank runs S / size of them
        cfg = dataclasses.replace(cfg, shards=distributed.global_shards(
            cfg.batch_size, cfg.batch_size * cfg.block_size, comm.size, cfg.workers, cfg.device, cfg.shards))
    train_text, val_text, fingerprint = load_corpus(cfg)
    if ckpt:
        check_data_unchanged(cfg, ckpt.meta.get("data_fingerprint"), fingerprint, log)
    tok = ckpt.tokenizer if ckpt else build_tokenizer(cfg, train_text, val_text, log)
    estimate = check_pretrain_memory(cfg, tok.vocab_size, available=available_to_rank(cfg, comm),
                                     data_bytes=8 * (len(train_text) + len(val_text)))
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    chars_per_token = (len(train_text) + len(val_text)) / max(1, len(train_ids) + len(val_ids))
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < cfg.block_size + 1:
            raise DataError(f"the {name} text has {len(ids)} tokens, shorter than one block "
                            f"(--block-size {cfg.block_size} needs {cfg.block_size + 1})")
    if ckpt and root:
        set_aside(cfg.out, ckpt, log)           # the resume is accepted: move damaged checkpoints aside
    return cfg, (train_text, val_text, fingerprint, tok, estimate, train_ids, val_ids, chars_per_token)


def load_corpus(cfg):
    """(train_text, val_text, data fingerprint): the built-in corpus, or --data with its last tenth held out."""
    if cfg.data is None:
        train, val = default_corpus()
        return train, val, data_fingerprint(None, train + val)
    text = load_text(cfg.data)
    n_val = max(1, len(text) // 10)
    return text[:-n_val], text[-n_val:], data_fingerprint(cfg.data, text)


def check_data_unchanged(cfg, saved: dict, now: dict, log) -> None:
    if not isinstance(saved, dict):
        log(f"note: the checkpoint in {cfg.out} records no data fingerprint (written by an older npformer); "
            f"the data cannot be checked for changes")
        return
    if (saved.get("bytes"), saved.get("sha256")) == (now["bytes"], now["sha256"]):
        return
    what = (f"the checkpoint was made on {saved.get('source')} ({saved.get('bytes'):,} bytes, SHA-256 "
            f"{str(saved.get('sha256'))[:16]}...) and {now['source']} is {now['bytes']:,} bytes, SHA-256 "
            f"{now['sha256'][:16]}...")
    if not cfg.allow_data_change:
        raise CheckpointError(f"--resume: the training data changed: {what}; restore the data, or pass "
                              f"--allow-data-change to continue on the new data (the run is then no longer "
                              f"an exact continuation)")
    log(f"note: the training data changed ({what}); continuing on the new data as --allow-data-change asks")


def build_tokenizer(cfg, train_text, val_text, log):
    if cfg.tokenizer == "char":
        return CharTokenizer(train_text + val_text)
    if cfg.tokenizer == "wordpiece":
        log(f"training a WordPiece tokenizer (vocabulary up to {cfg.vocab_size}) on {len(train_text):,} characters")
        return WordPieceStream.train(train_text, cfg.vocab_size)
    log(f"training a byte-level BPE tokenizer (vocabulary {cfg.vocab_size}) on {len(train_text):,} characters")
    return ByteBPETokenizer().train(train_text, cfg.vocab_size)


def available_to_rank(cfg, comm):
    """The memory this rank may use: None (memory.py reads it), or with several ranks on this
    machine, their share of what is available."""
    if comm is None or comm.local_size == 1 or cfg.device != "cpu":
        return None
    free, source = available_memory()
    return None if free is None else (free // comm.local_size, f"{source}, shared by {comm.local_size} ranks")
