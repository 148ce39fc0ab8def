"""How large do real bugs look to npformer.interop.compare? Plant each in a hand-written twin of a
torch pre-LN encoder layer and print what compare reports (docs/verification.md quotes the output).

    python scripts/planted_bugs.py

The twin below writes the attention out by hand from npformer ops, with the parameter names of
torch's TransformerEncoderLayer (so no mapping is needed), and takes one switch per bug:
    gelu="tanh"      the tanh approximation of GELU where torch uses the exact (erf) one
    scale=False      scores q k^T without the 1 / sqrt(d_head)
    mask_shift=2     a causal mask off by one: each query also sees the next key
    eps=1e-6         LayerNorm eps 1e-6 where torch's is 1e-5
Last, the float32 agreement: a float32 from_torch twin against the float64 torch layer.
"""

import math

import numpy as np
import torch

import npformer as nf
from npformer import nn
from npformer.interop import TorchMapping, compare, from_torch

D, H, F, B, T = 32, 4, 64, 2, 12


class Layer(nn.Module):
    """x + SA(norm1(x)), then x + FF(norm2(x)); attention written out; names as torch's layer."""

    def __init__(self, gelu="none", scale=True, mask_shift=1, eps=1e-5):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, H)          # only its parameters are used
        self.linear1, self.linear2 = nn.Linear(D, F), nn.Linear(F, D)
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=eps), nn.LayerNorm(D, eps=eps)
        self.gelu, self.scale, self.mask_shift = gelu, scale, mask_shift

    def attend(self, x):
        a, dh = self.self_attn, D // H
        q, k, v = nf.split(nf.linear(x, a.in_proj_weight, a.in_proj_bias), D, axis=2)      # 3 x (B, T, D)
        q, k, v = (t.reshape((B, T, H, dh)).permute((0, 2, 1, 3)) for t in (q, k, v))     # (B, H, T, dh)
        scores = q @ k.transpose(-2, -1)                                                   # (B, H, T, T)
        if self.scale:
            scores = scores * (1.0 / math.sqrt(dh))
        future = np.triu(np.ones((T, T), bool), k=self.mask_shift)                        # True = masked out
        y = nf.softmax(nf.masked_fill(scores, future, -np.inf), axis=-1) @ v              # (B, H, T, dh)
        return a.out_proj(y.permute((0, 2, 1, 3)).reshape((B, T, D)))

    def forward(self, x):
        x = x + self.attend(self.norm1(x))
        return x + self.linear2(nf.gelu(self.linear1(self.norm2(x)), approximate=self.gelu))


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True, dtype=torch.float64)
    x = np.random.default_rng(0).standard_normal((B, T, D))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)

    class Causal(torch.nn.Module):                               # torch's layer with its causal mask
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, src_mask=mask, is_causal=True)
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    print(f"torch.nn.TransformerEncoderLayer(d_model={D}, nhead={H}, dim_feedforward={F}, gelu, pre-LN), "
          f"x ({B}, {T}, {D}), causal; largest rel = max|twin - torch| / max|torch| per kind")
    print(f"{'twin':28s} {'output':>9s} {'input_grad':>10s} {'grad':>9s}  worst gradient")
    for label, bug in [("correct", {}), ('gelu="tanh"', dict(gelu="tanh")), ("no 1/sqrt(d_head)", dict(scale=False)),
                       ("mask off by one", dict(mask_shift=2)), ("LayerNorm eps 1e-6", dict(eps=1e-6))]:
        with nf.default_dtype(np.float64):
            twin = Layer(**bug)
        twin.load_state_dict(state)
        report = compare(Causal(), twin, x, mapping=TorchMapping(rename={"layer.*": "*"}))
        worst = {k: report.worst(1, k)[0] for k in ("output", "input_grad", "grad")}
        big = [e for e in report.select("grad") if e.scale > 1e-12]          # leave out the zero key bias
        g = max(big, key=lambda e: e.rel)
        print(f"{label:28s} {worst['output'].rel:9.1e} {worst['input_grad'].rel:10.1e} {g.rel:9.1e}  {g.name}")
    # float32: a float32 twin against the float64 layer, the same cotangent pushed back through both
    twin32 = from_torch(layer, dtype=np.float32)
    cot = np.random.default_rng(1).standard_normal((B, T, D))
    x32, x64 = nf.tensor(x.astype(np.float32), requires_grad=True), torch.tensor(x, requires_grad=True)
    y32 = twin32(x32, src_mask=np.triu(np.ones((T, T), bool), 1))
    y64 = layer(x64, src_mask=mask, is_causal=True)
    y32.backward(cot.astype(np.float32))
    y64.backward(torch.tensor(cot))
    rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b.numpy()).max() / b.abs().max())   # noqa: E731
    ours = dict(twin32.named_parameters())
    g = max(rel(ours[n].grad, p.grad) for n, p in layer.named_parameters() if p.grad.abs().max() > 1e-12)
    print(f"{'float32 from_torch twin':28s} {rel(y32.numpy(), y64.detach()):9.1e} {rel(x32.grad, x64.grad):10.1e} "
          f"{g:9.1e}  (against the float64 layer)")
    layer.zero_grad()


if __name__ == "__main__":
    main()
