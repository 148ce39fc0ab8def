"""A minimal PyTorch GPT with npformer's parameter names, and the training steps the
side-by-side benchmarks time.

It is the strongest eager baseline we know how to write: nanoGPT's layout, one fused q/k/v
Linear, ``F.scaled_dot_product_attention`` and tanh GELU. Its weights are loaded from an
npformer GPT's state_dict (the same names and (out, in) layouts), so both frameworks start
from identical parameters.
"""

import torch
import torch.nn as tnn
import torch.nn.functional as F


class _Attn(tnn.Module):
    def __init__(self, C, nh, bias):
        super().__init__()
        self.c_attn, self.c_proj, self.nh = tnn.Linear(C, 3 * C, bias=bias), tnn.Linear(C, C, bias=bias), nh

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))   # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _MLP(tnn.Module):
    def __init__(self, C, bias):
        super().__init__()
        self.c_fc, self.c_proj = tnn.Linear(C, 4 * C, bias=bias), tnn.Linear(4 * C, C, bias=bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(tnn.Module):
    def __init__(self, C, nh, bias, eps):
        super().__init__()
        self.ln_1, self.attn = tnn.LayerNorm(C, eps=eps, bias=bias), _Attn(C, nh, bias)
        self.ln_2, self.mlp = tnn.LayerNorm(C, eps=eps, bias=bias), _MLP(C, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(tnn.Module):
    """GPT-2 architecture; forward(idx, targets) -> (logits, loss) like npformer's GPT."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.transformer = tnn.ModuleDict(dict(
            wte=tnn.Embedding(config.vocab_size, C), wpe=tnn.Embedding(config.block_size, C),
            h=tnn.ModuleList([_Block(C, config.n_head, config.bias, config.layer_norm_eps)
                              for _ in range(config.n_layer)]),
            ln_f=tnn.LayerNorm(C, eps=config.layer_norm_eps, bias=config.bias)))
        self.lm_head = tnn.Linear(C, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def torch_twin(npformer_gpt, dtype=torch.float32):
    """A TorchGPT holding exactly the weights of an npformer GPT."""
    from npformer import backend
    model = TorchGPT(npformer_gpt.config).to(dtype)
    state = {k: torch.from_numpy(backend.to_numpy(v).copy()).to(dtype) for k, v in npformer_gpt.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def npformer_step(model, x, y, opt, threads=None, shards=None):
    """One npformer training step (forward, loss, backward, clip 1.0, optimizer step), as a closure.

    threads: CPU workers of the data-parallel forward/backward: worker processes on Linux
    (npformer.training.workers), else threads (npformer.training.parallel); None for all usable
    cores on the CPU, 1 on the GPU. shards: how many pieces the batch is cut into
    (None: npformer's default). The closure's ``worker_pids`` lists the forked workers (their
    memory counts too).
    """
    from npformer import backend
    from npformer.optim import clip_grad_norm
    from npformer.training import workers
    from npformer.training.parallel import blas_context, check_threads, forward_backward, step_in_threads

    threads = check_threads(threads, backend.device_of(x))
    pool = workers.ShardWorkers(model, threads) if threads > 1 and workers.available() else None

    def step():
        with blas_context(threads):
            if pool is not None:
                pool.forward_backward(x, y, shards=shards)
            else:
                forward_backward(model, x, y, threads, shards=shards)
            clip_grad_norm(model.parameters(), 1.0)
            step_in_threads(opt, threads)
        opt.zero_grad()
    step.worker_pids = pool.pids if pool is not None else []
    return step
