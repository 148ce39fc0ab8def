"""npformer's GPT against HF transformers' GPT2LMHeadModel (eager attention, dropout 0), through
npformer.interop: logits, loss and the gradient of every parameter agree in float64 to 1e-9
relative (float32 to 1e-4), for HF models converted with from_torch and for npformer models
exported with to_torch; round trips keep every weight bit for bit; unsupported configs raise.

Models are built locally from small random configs; nothing is downloaded.
HF shifts labels inside the model (position t predicts labels[t + 1], -100 ignored); npformer's
GPT takes targets aligned with the logits (-1 ignored): targets = labels[:, 1:] then one -1.
HF casts the logits to float32 for its loss even in a float64 model, so the float64 comparison
applies HF's loss recipe to HF's float64 logits, and HF's own loss is checked to float32 precision.
"""

import numpy as np
import pytest

from npformer.interop import from_torch, to_torch
from npformer.models.gpt import GPT, GPTConfig
from tests.torch_compare import Worst, one_torch_thread
from tests.helpers import DEVICE, T, host

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.verify

TD = {np.float64: torch.float64, np.float32: torch.float32}
WORST = Worst("worst relative difference of npformer GPT to HF GPT2LMHeadModel (logits, loss, gradients)", other="HF")
close = WORST.close
ACTIVATIONS = ["gelu_new", "gelu", "gelu_pytorch_tanh"]


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    """One torch thread (tiny ops slow down badly when threads contend), then print the worst differences."""
    with one_torch_thread():
        yield
    WORST.report()



def hf_config(seed, **overrides):
    rng = np.random.default_rng(seed)
    n_head = int(rng.choice([1, 2, 4]))
    kw = dict(vocab_size=int(rng.integers(5, 40)), n_positions=int(rng.integers(4, 10)),
              n_embd=n_head * int(rng.choice([4, 6])), n_layer=int(rng.integers(1, 4)), n_head=n_head,
              activation_function=ACTIVATIONS[seed % 3], layer_norm_epsilon=float(10.0 ** rng.uniform(-6, -3)),
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
              attn_implementation="eager")
    return transformers.GPT2Config(**{**kw, **overrides})


def hf_model(seed, dtype=np.float64, **overrides):
    """A random GPT2LMHeadModel; every parameter is moved off GPT-2's init (unit LayerNorms, zero biases)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(hf_config(seed, **overrides)).to(TD[dtype])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


def conv1d_names(model):
    """HF parameters stored (in, out), i.e. transposed relative to npformer's (out, in)."""
    from transformers.pytorch_utils import Conv1D
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def compare(name, hf, gpt, dtype, seed):
    """Same tokens through both; compare logits, loss and every parameter gradient."""
    assert hf.config._attn_implementation == "eager"
    rng = np.random.default_rng(seed)
    B, Tn, V = 2, gpt.config.block_size, gpt.config.vocab_size
    idx = rng.integers(0, V, (B, Tn))
    labels = idx.copy()
    labels[1, 2] = -100                                            # an ignored target
    targets = np.concatenate([labels[:, 1:], np.full((B, 1), -100)], axis=1)
    targets[targets == -100] = -1
    out = hf(input_ids=torch.tensor(idx), labels=torch.tensor(labels))
    logits, loss = gpt(T(idx), T(targets))
    assert logits.dtype == dtype and loss.dtype == dtype
    close(name, "logits", logits, out.logits, dtype)
    # HF computes its loss from logits cast to float32 whatever the model's dtype; in float64, HF's own
    # recipe (shift, cross entropy, mean over labels != -100) is applied to its float64 logits here.
    assert out.loss.dtype == torch.float32
    rel32 = abs(loss.item() - out.loss.item()) / abs(out.loss.item())
    assert rel32 < 1e-6, f"{name}: loss {loss.item()} vs HF's float32 loss {out.loss.item()}"
    shifted = torch.tensor(np.concatenate([labels[:, 1:], np.full((B, 1), -100)], axis=1))
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(B * Tn, V), shifted.reshape(-1), ignore_index=-100)
    close(name, "loss", loss, ref, dtype)
    ref.backward()
    loss.backward()
    conv = conv1d_names(hf)
    theirs = dict(hf.named_parameters())                           # lm_head.weight is wte's: listed once
    ours = dict(gpt.named_parameters())
    assert list(ours) == list(theirs)
    for pname, p in ours.items():
        g = theirs[pname].grad
        close(name, f"grad of {pname}", p.grad, g.T if pname in conv else g, dtype)


def assert_same_weights(a: dict, b: dict):
    """Two state dicts (arrays or torch tensors) hold the same names and bitwise equal values."""
    assert list(a) == list(b)
    for k in a:
        x, y = (np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else host(v)) for v in (a[k], b[k]))
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gpt_from_hf_matches_hf(seed, dtype):
    hf = hf_model(seed, dtype)
    gpt = from_torch(hf)
    c = hf.config
    assert gpt.config == GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                                   n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=True,
                                   gelu_approximate="none" if c.activation_function == "gelu" else "tanh",
                                   layer_norm_eps=c.layer_norm_epsilon)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight and gpt.training == hf.training
    compare("from_torch(HF)", hf, gpt, dtype, seed)
    back = to_torch(gpt)                                           # HF -> npformer -> HF: bit for bit
    assert type(back) is type(hf) and back.lm_head.weight is back.transformer.wte.weight
    assert_same_weights(back.state_dict(), hf.state_dict())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gpt_exported_to_hf_matches(approximate, dtype):
    config = GPTConfig(vocab_size=13, block_size=7, n_layer=2, n_head=2, n_embd=8, gelu_approximate=approximate,
                       layer_norm_eps=1e-4)
    gpt = GPT(config, generator=np.random.default_rng(5), dtype=dtype, device=DEVICE)
    rng = np.random.default_rng(6)
    for p in gpt.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.3)
    hf = to_torch(gpt)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.dtype == TD[dtype]
    assert hf.config.activation_function == ("gelu_new" if approximate == "tanh" else "gelu")
    assert hf.config.n_positions == 7 and hf.config.layer_norm_epsilon == 1e-4
    assert hf.lm_head.weight is hf.transformer.wte.weight
    compare("to_torch(GPT)", hf, gpt, dtype, seed=7)
    assert_same_weights(from_torch(hf).state_dict(), gpt.state_dict())   # npformer -> HF -> npformer


def test_eval_mode_and_dropout_carry_over():
    hf = hf_model(4, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).eval()
    gpt = from_torch(hf)
    assert gpt.config.dropout == 0.1 and not gpt.training
    back = to_torch(gpt.train())
    assert back.training and back.config.attn_pdrop == back.config.resid_pdrop == back.config.embd_pdrop == 0.1
    idx = np.random.default_rng(4).integers(0, hf.config.vocab_size, (1, hf.config.n_positions))
    close("from_torch(HF)", "eval logits", gpt.eval()(T(idx))[0], hf(input_ids=torch.tensor(idx)).logits, np.float64)


# ----------------------------------------------------------------------------- unsupported configs

@pytest.mark.parametrize("overrides,option", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(n_inner=10), "n_inner"),
    (dict(attn_pdrop=0.2), "attn_pdrop"),
])
def test_unsupported_gpt2_options_raise_naming_them(overrides, option):
    with pytest.raises(ValueError, match=option):
        from_torch(hf_model(0, **overrides))


def test_untied_lm_head_becomes_tie_embeddings_false():
    """An HF model whose lm_head has its own weight (tie_word_embeddings=False, or untied by hand) gives a
    GPT with tie_embeddings=False that matches it; to_torch gives an untied HF model back, bit for bit."""
    hf = hf_model(1, tie_word_embeddings=False)
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    gpt = from_torch(hf)
    assert not gpt.config.tie_embeddings and gpt.lm_head.weight is not gpt.transformer.wte.weight
    compare("from_torch(HF untied)", hf, gpt, np.float64, seed=1)
    back = to_torch(gpt)
    assert not back.config.tie_word_embeddings and back.lm_head.weight is not back.transformer.wte.weight
    assert_same_weights(back.state_dict(), hf.state_dict())
    tied = hf_model(2)
    tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())   # untied by hand
    assert not from_torch(tied).config.tie_embeddings


def test_bias_free_gpt_cannot_be_gpt2():
    gpt = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4, bias=False), device=DEVICE)
    with pytest.raises(ValueError, match="bias"):
        to_torch(gpt, layout="hf")
    assert type(to_torch(gpt)).__name__ == "TorchGPT"            # the default for a bias-free GPT
