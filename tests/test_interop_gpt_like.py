"""from_torch / to_torch for GPTs written in the nanoGPT and minGPT styles (tests/gpt_styles.py): the
twin is npformer's GPT with the configuration read off the modules, and compare() finds its outputs,
loss, parameter gradients and one AdamW step equal to torch's in float64 (rtol 1e-10); to_torch gives
npformer's TorchGPT with every weight bit for bit; what does not fit raises ValueError naming it.

Run with -s to print the worst relative difference per model.
"""

import numpy as np
import pytest

from npformer.interop import compare, from_torch, to_torch
from npformer.models.gpt import GPT
from tests.helpers import DEVICE, T, host
from tests.torch_compare import one_torch_thread, print_worst

torch = pytest.importorskip("torch")
from tests.gpt_styles import Config, NewGELU, StyleGPT, make  # noqa: E402  (needs torch)

pytestmark = pytest.mark.verify
WORST = {}
ADAMW = ("AdamW", {"lr": 1e-2, "weight_decay": 0.1})


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report():
    with one_torch_thread():
        yield
    print_worst("worst relative difference of from_torch twins of nanoGPT/minGPT-style models (compare, float64)",
                WORST)


def tokens(model, seed, B=3):
    rng = np.random.default_rng(seed)
    c = model.config
    idx, targets = rng.integers(0, c.vocab_size, (B, c.block_size)), rng.integers(0, c.vocab_size, (B, c.block_size))
    targets[0, 2] = -1                                             # an ignored target
    return idx, targets


def check(name, model, twin, seed):
    """compare with one AdamW step at rtol 1e-10; record the worst relative difference per kind.

    The worst "updated" entry is c_attn's key bias: its gradient is zero in exact arithmetic (softmax
    ignores a constant added to a row of scores), and AdamW turns the ~1e-17 rounding left in it into a
    step of lr * g / eps, about 1e-11, different on each side."""
    idx, targets = tokens(model, seed)
    report = compare(model, twin, idx, targets, loss=lambda out: out[1], steps=1, optimizer=ADAMW)
    report.assert_close(rtol=1e-10)
    assert {e.kind for e in report} == {"weight", "output", "loss", "grad", "updated"}
    slot = WORST.setdefault(name, {})
    for kind in ("output", "grad", "updated"):
        slot[kind] = max(slot.get(kind, 0.0), report.worst(1, kind)[0].rel)
    return report


def assert_same_parameters(a, b):
    """Two torch modules hold parameters of the same names, dtypes and bits (tied ones listed once)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for k in pa:
        x, y = pa[k].detach().numpy(), pb[k].detach().numpy()
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


STYLES = [  # (style, overrides)
    ("nano", dict()),
    ("nano", dict(bias=False)),
    ("nano", dict(tie=False, flash=False)),
    ("nano", dict(bias=False, tie=False, n_head=4, n_layer=1)),
    ("min", dict()),
    ("min", dict(tie=True, n_head=1)),
]


@pytest.mark.parametrize("style,overrides", STYLES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_style_gpt_twin_matches_and_round_trips(style, overrides):
    seed = STYLES.index((style, overrides))
    model = make(style, seed, **overrides)
    c = model.config
    twin = from_torch(model)
    assert type(twin) is GPT and twin.training
    g = twin.config
    assert (g.vocab_size, g.block_size, g.n_layer, g.n_head, g.n_embd) == (c.vocab_size, c.block_size, c.n_layer,
                                                                            c.n_head, c.n_embd)
    assert g.bias == c.bias and g.tie_embeddings == c.tie and g.layer_norm_eps == 1e-5
    assert g.gelu_approximate == ("none" if style == "nano" else "tanh")      # nn.GELU() vs minGPT's NewGELU
    assert (twin.lm_head.weight is twin.transformer.wte.weight) == c.tie
    if not c.bias:
        assert not any(n.endswith("bias") for n, _ in twin.named_parameters())   # LayerNorms included
    check(f"{style} {overrides}", model, twin, seed)
    back = to_torch(twin)                                          # npformer's TorchGPT, nanoGPT layout
    assert type(back).__name__ == "TorchGPT" and back.training
    assert_same_parameters(back, model)
    assert (back.lm_head.weight is back.transformer.wte.weight) == c.tie
    check(f"{style} {overrides} -> TorchGPT", back, twin, seed + 1)
    again = from_torch(back)
    for (k, a), (k2, b) in zip(twin.state_dict().items(), again.state_dict().items()):
        assert k == k2 and np.array_equal(host(a).view(np.uint8), host(b).view(np.uint8)), k


def test_float32_model_gives_a_float32_twin_and_dropout_and_mode_carry_over():
    model = make("nano", 7, dtype=torch.float32, dropout=0.1).eval()
    twin = from_torch(model)
    assert twin.config.dropout == 0.1 and not twin.training
    assert all(p.dtype == np.float32 for p in twin.parameters())
    idx, _ = tokens(model, 7)
    with torch.no_grad():
        want = model(torch.tensor(idx))[0].numpy()
    got = host(twin(T(idx))[0])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    back = to_torch(twin)
    assert back.transformer.wte.weight.dtype == torch.float32 and not back.training
    assert back.transformer.drop.p == back.transformer.h[0].attn.dropout == 0.1


def test_an_exported_bias_free_npformer_gpt_matches():
    from npformer.models.gpt import GPTConfig
    gpt = GPT(GPTConfig(vocab_size=9, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=False, tie_embeddings=False,
                        gelu_approximate="none", layer_norm_eps=1e-4), dtype=np.float64, device=DEVICE)
    rng = np.random.default_rng(3)
    for p in gpt.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.3)
    back = to_torch(gpt)
    assert type(back).__name__ == "TorchGPT" and back.transformer.ln_f.bias is None
    assert back.transformer.ln_f.eps == 1e-4
    idx = rng.integers(0, 9, (2, 6))
    compare(back, gpt, idx, idx, loss=lambda out: out[1], steps=1, optimizer=ADAMW).assert_close(rtol=1e-10)
    with pytest.raises(ValueError, match="layout must be 'hf' or 'nanogpt'"):
        to_torch(gpt, layout="mingpt")


# ----------------------------------------------------------------------------- what does not fit

class Swish(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class TightNorm(torch.nn.Module):
    """A LayerNorm-like module with eps 1e-6 hard-coded and no eps attribute: the probe must catch it."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)


def edit(fn, style="nano", **overrides):
    def make_model():
        m = make(style, 0, **overrides)
        fn(m)
        return m
    return make_model


@pytest.mark.parametrize("make_model,match", [
    (edit(lambda m: setattr(m.transformer.h[1].mlp, "gelu", Swish())),
     r"h.1.mlp.gelu: Swish computes neither GELU \(erf\) nor GELU \(tanh\)"),
    (edit(lambda m: setattr(m.transformer.h[0], "ln_2", TightNorm(8).double())),
     r"h.0.ln_2: TightNorm does not compute layer_norm\(x, weight, bias, eps=1e-05\)"),
    (edit(lambda m: setattr(m.transformer.h[0].attn, "c_proj", torch.nn.Linear(8, 8, bias=False).double())),
     r"bias differs: .*h.0.ln_1 has True but .*h.0.attn.c_proj has False"),
    (edit(lambda m: setattr(m.transformer.h[1].attn, "n_head", 4)), r"n_head differs"),
    (edit(lambda m: setattr(m.transformer.h[0].attn.resid_dropout, "p", 0.2)), r"dropout differs"),
    (edit(lambda m: setattr(m, "lm_head", torch.nn.Linear(8, 13).double()), tie=False),
     r"lm_head: has a bias"),
    (edit(lambda m: setattr(m.transformer.h[0].mlp, "c_fc", torch.nn.Linear(8, 24).double())),
     r"h.0.mlp.c_fc: Linear\(8, 24\); npformer's GPT needs Linear\(8, 32\)"),
    (edit(lambda m: setattr(m.transformer.h[0].mlp, "extra", torch.nn.Linear(8, 8).double())),
     r"h.0.mlp: expected one activation module .* found \['gelu', 'extra'\]"),
    (edit(lambda m: m.transformer.h[0].register_parameter("scale", torch.nn.Parameter(torch.ones(8)))),
     r"parameters npformer's GPT has no place for: \['transformer.h.0.scale'\]"),
    (edit(lambda m: m.transformer.h[0].attn.bias.fill_(1.0), flash=False),
     r"buffer transformer.h.0.attn.bias \(1, 1, 8, 8\) is not a causal mask"),
    (edit(lambda m: setattr(m.transformer, "wte", torch.nn.Embedding(13, 8, padding_idx=0).double())),
     r"transformer.wte: Embedding\(padding_idx=0\) is not supported"),
    (edit(lambda m: (delattr(m.transformer.h[0].attn, "n_head"), delattr(m, "config"))),
     r"h.0.attn: has no n_head attribute"),
])
def test_what_npformers_gpt_cannot_mirror_raises_naming_it(make_model, match):
    with pytest.raises(ValueError, match=match):
        from_torch(make_model())


def test_the_activation_and_n_head_are_found_without_the_usual_attributes():
    """A minGPT-style NewGELU anywhere in the MLP is probed; n_head falls back to the model's config."""
    m = make("nano", 4)
    m.transformer.h[0].mlp.gelu = NewGELU()
    m.transformer.h[1].mlp.gelu = NewGELU()
    for block in m.transformer.h:
        del block.attn.n_head
    twin = from_torch(m)
    assert twin.config.gelu_approximate == "tanh" and twin.config.n_head == m.config.n_head


def test_a_plain_module_without_the_structure_is_not_taken_for_a_gpt():
    m = StyleGPT(Config())
    del m.lm_head
    with pytest.raises(TypeError, match="StyleGPT is not supported"):
        from_torch(m)
