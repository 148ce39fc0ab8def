"""Acceptance test of npformer.interop's harness on a model from_torch knows nothing about: an
encoder-decoder written in torch in the style of the Annotated Transformer (its own class names,
q/k/v/o as a `linears` list, pre-norm sublayer connections, sqrt(d_model)-scaled embeddings,
sinusoidal positions, a log-softmax generator), and a twin assembled from npformer.nn pieces.

The whole mapping between them is the RENAME table and FUSE below; load_torch_state_dict copies the
weights and compare checks the outputs, every parameter gradient and the weights
after two AdamW steps at 1e-10.
"""

import math

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.interop import compare, load_torch_state_dict
from tests.torch_compare import one_torch_thread

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.verify
tnn = torch.nn


# ----------------------------------------------------------------------------- the torch model

class MultiHeadedAttention(tnn.Module):
    def __init__(self, h, d_model):
        super().__init__()
        self.h, self.d_k = h, d_model // h
        self.linears = tnn.ModuleList([tnn.Linear(d_model, d_model) for _ in range(4)])   # q, k, v, out

    def forward(self, query, key, value, mask):
        """mask: (B, 1, S) or (B, T, S), True = may attend."""
        B = query.size(0)
        q, k, v = [lin(x).view(B, -1, self.h, self.d_k).transpose(1, 2)                    # (B, h, L, d_k)
                   for lin, x in zip(self.linears, (query, key, value))]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)                            # (B, h, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), -1e9)
        x = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, -1, self.h * self.d_k)  # (B, T, D)
        return self.linears[3](x)


class PositionwiseFeedForward(tnn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w_1, self.w_2 = tnn.Linear(d_model, d_ff), tnn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.w_2(self.w_1(x).relu())


class SublayerConnection(tnn.Module):
    """x + sublayer(norm(x)): pre-norm (torch's LayerNorm: the Annotated one divides by std + eps)."""

    def __init__(self, d_model):
        super().__init__()
        self.norm = tnn.LayerNorm(d_model)

    def forward(self, x, sublayer):
        return x + sublayer(self.norm(x))


class EncoderLayer(tnn.Module):
    def __init__(self, d_model, h, d_ff):
        super().__init__()
        self.self_attn, self.feed_forward = MultiHeadedAttention(h, d_model), PositionwiseFeedForward(d_model, d_ff)
        self.sublayer = tnn.ModuleList([SublayerConnection(d_model) for _ in range(2)])

    def forward(self, x, mask):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, mask))
        return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(tnn.Module):
    def __init__(self, d_model, h, d_ff):
        super().__init__()
        self.self_attn, self.src_attn = MultiHeadedAttention(h, d_model), MultiHeadedAttention(h, d_model)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff)
        self.sublayer = tnn.ModuleList([SublayerConnection(d_model) for _ in range(3)])

    def forward(self, x, memory, src_mask, tgt_mask):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, tgt_mask))
        x = self.sublayer[1](x, lambda y: self.src_attn(y, memory, memory, src_mask))
        return self.sublayer[2](x, self.feed_forward)


class Stack(tnn.Module):
    """N layers then a final LayerNorm (the Annotated Encoder and Decoder)."""

    def __init__(self, make, n, d_model):
        super().__init__()
        self.layers = tnn.ModuleList([make() for _ in range(n)])
        self.norm = tnn.LayerNorm(d_model)

    def forward(self, x, *args):
        for layer in self.layers:
            x = layer(x, *args)
        return self.norm(x)


class Embeddings(tnn.Module):
    def __init__(self, d_model, vocab):
        super().__init__()
        self.lut, self.d_model = tnn.Embedding(vocab, d_model), d_model

    def forward(self, x):
        return self.lut(x) * math.sqrt(self.d_model)


class PositionalEncoding(tnn.Module):
    """x + PE[:T]; the (1, max_len, d_model) table is computed in float64 (a float32 one carries float32
    rounding that a float64 comparison would rightly report)."""

    def __init__(self, d_model, max_len=64):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe[None])

    def forward(self, x):
        return x + self.pe[:, : x.size(1)]


class Generator(tnn.Module):
    def __init__(self, d_model, vocab):
        super().__init__()
        self.proj = tnn.Linear(d_model, vocab)

    def forward(self, x):
        return self.proj(x).log_softmax(dim=-1)


class EncoderDecoder(tnn.Module):
    def __init__(self, src_vocab, tgt_vocab, N=2, d_model=16, d_ff=24, h=4):
        super().__init__()
        self.encoder = Stack(lambda: EncoderLayer(d_model, h, d_ff), N, d_model)
        self.decoder = Stack(lambda: DecoderLayer(d_model, h, d_ff), N, d_model)
        self.src_embed = tnn.Sequential(Embeddings(d_model, src_vocab), PositionalEncoding(d_model))
        self.tgt_embed = tnn.Sequential(Embeddings(d_model, tgt_vocab), PositionalEncoding(d_model))
        self.generator = Generator(d_model, tgt_vocab)
        for p in self.parameters():
            if p.dim() > 1:
                tnn.init.xavier_uniform_(p)

    def forward(self, src, tgt, src_mask, tgt_mask):
        memory = self.encoder(self.src_embed(src), src_mask)
        return self.generator(self.decoder(self.tgt_embed(tgt), memory, src_mask, tgt_mask))


# ----------------------------------------------------------------------------- the npformer twin

class Twin(nn.Module):
    """The same model from npformer.nn: pre-LN (norm_first) encoder and decoder stacks."""

    def __init__(self, src_vocab, tgt_vocab, N=2, d_model=16, d_ff=24, h=4):
        super().__init__()
        kw = dict(dim_feedforward=d_ff, dropout=0.0, norm_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, h, **kw), N, nn.LayerNorm(d_model))
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, h, **kw), N, nn.LayerNorm(d_model))
        self.src_embed, self.tgt_embed = nn.Embedding(src_vocab, d_model), nn.Embedding(tgt_vocab, d_model)
        self.pe = nn.SinusoidalPositionalEncoding(d_model, max_len=64)
        self.generator = nn.Linear(d_model, tgt_vocab)
        self.d_model, self.h = d_model, h

    def forward(self, src, tgt, src_mask, tgt_mask):
        """The torch model's masks (True = may attend) turned into npformer's (True = masked out)."""
        pad = ~src_mask[:, 0, :]                                              # (B, S)
        block = (~tgt_mask).repeat(self.h, axis=0)                            # (B*h, T, T)
        x = self.pe(self.src_embed(src) * math.sqrt(self.d_model))
        y = self.pe(self.tgt_embed(tgt) * math.sqrt(self.d_model))
        memory = self.encoder(x, src_key_padding_mask=pad)
        y = self.decoder(y, memory, tgt_mask=block, memory_key_padding_mask=pad)
        return nf.log_softmax(self.generator(y), axis=-1)


# torch name -> twin name (first match wins; each `*` is any run of characters)
RENAME = {"*.self_attn.linears.3.*": "*.self_attn.out_proj.*",
          "*.src_attn.linears.3.*": "*.multihead_attn.out_proj.*",
          "*.feed_forward.w_1.*": "*.linear1.*",
          "*.feed_forward.w_2.*": "*.linear2.*",
          "*.sublayer.0.norm.*": "*.norm1.*",
          "*.sublayer.1.norm.*": "*.norm2.*",
          "*.sublayer.2.norm.*": "*.norm3.*",
          "*_embed.0.lut.weight": "*_embed.weight",
          "*_embed.1.pe": None,                              # the twin computes its own table
          "generator.proj": "generator"}
# twin in_proj_weight (3E, E) / in_proj_bias (3E,) <- torch's q, k, v Linear layers
FUSE = {"*.self_attn.in_proj_*": ("*.self_attn.linears.0.*", "*.self_attn.linears.1.*", "*.self_attn.linears.2.*"),
        "*.multihead_attn.in_proj_*": ("*.src_attn.linears.0.*", "*.src_attn.linears.1.*", "*.src_attn.linears.2.*")}


def batch(seed, B=2, S=6, T=5, vocab=11):
    """Token ids with padding (0) and the Annotated masks: src (B, 1, S), tgt (B, T, T), True = attend."""
    rng = np.random.default_rng(seed)
    src, tgt = rng.integers(1, vocab, (B, S)), rng.integers(1, vocab, (B, T))
    src[1, -2:], tgt[1, -1:] = 0, 0
    src_mask = (src != 0)[:, None, :]
    tgt_mask = (tgt != 0)[:, None, :] & np.tril(np.ones((T, T), bool))[None]
    return src, tgt, src_mask, tgt_mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def test_annotated_transformer_matches_its_twin_through_two_adamw_steps():
    torch.manual_seed(0)
    model = EncoderDecoder(11, 11).double()
    with nf.default_dtype(np.float64):
        twin = Twin(11, 11)
    mapping = load_torch_state_dict(twin, model, rename=RENAME, fuse_qkv=FUSE)
    assert twin.torch_mapping is mapping
    report = compare(model, twin, *batch(0), steps=2, optimizer=("AdamW", {"lr": 1e-2, "weight_decay": 0.1}))
    report.assert_close(rtol=1e-10)
    names = [n for n, _ in model.named_parameters()]
    for kind in ("weight", "grad", "updated"):
        assert [e.name for e in report.select(kind)] == names                   # torch's names, all of them
    assert [e.kind for e in report.select(name="loss")] == ["loss"] and not report.select("input_grad")
    # the key biases' gradients are zero in exact arithmetic (softmax ignores a constant added to a row
    # of scores): rounding noise on both sides, passed by atol; every other gradient agrees to 1e-12
    noise = [e for e in report.select("grad") if ".linears.1.bias" in e.name]
    assert len(noise) == 6 and all(e.scale < 1e-13 and e.abs < 1e-14 for e in noise)
    assert max(e.rel for e in report.select("grad") if e not in noise) < 1e-12


def test_a_twin_with_the_scale_left_out_is_caught():
    """The same pair, the twin forgetting the sqrt(d_model) embedding scale: the weights agree, the
    outputs do not, and assert_close says so, output first."""
    torch.manual_seed(1)
    model = EncoderDecoder(11, 11).double()
    with nf.default_dtype(np.float64):
        twin = Twin(11, 11)
    load_torch_state_dict(twin, model, rename=RENAME, fuse_qkv=FUSE)
    twin.d_model = 1                                                             # sqrt(1): no scale
    report = compare(model, twin, *batch(1))
    assert max(e.rel for e in report.select("weight")) == 0.0
    assert report.worst(1, "output")[0].rel > 1e-3
    with pytest.raises(AssertionError, match=r"first to differ .*\n  output output "):
        report.assert_close()


def test_without_fuse_qkv_the_error_lists_every_unmapped_entry_and_suggests_the_fusion():
    torch.manual_seed(2)
    model = EncoderDecoder(11, 11).double()
    with nf.default_dtype(np.float64):
        twin = Twin(11, 11)
    with pytest.raises(ValueError) as err:
        load_torch_state_dict(twin, model, rename=RENAME)
    msg = str(err.value)
    assert msg.startswith("load_torch_state_dict into Twin: 12 missing, 36 unexpected")   # 6 attentions x 2 and x 6
    assert ("missing: twin encoder.layers.0.self_attn.in_proj_weight (48, 16): no torch entry maps to it; fused "
            "q/k/v? (fuse_qkv=) of encoder.layers.0.self_attn.linears.0.weight, encoder.layers.0.self_attn."
            "linears.1.weight, encoder.layers.0.self_attn.linears.2.weight (16, 16)") in msg
    assert msg.count("\n  unexpected: torch ") == 36
