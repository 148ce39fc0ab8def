"""Interop with PyTorch and HF transformers: twins of torch modules, weight mapping, and comparison.

    twin = from_torch(torch_module)      # npformer module computing what torch_module computes
    back = to_torch(twin)                # and back; weights survive the round trip bit for bit
    compare(torch_module, twin, x).assert_close()       # outputs, gradients, optimizer steps, float64

A twin built by hand, with other names or layouts, gets the torch weights through
``load_torch_state_dict(twin, torch_module, rename=..., fuse_qkv=..., transpose=...)``, which
remembers its TorchMapping on the twin for compare. See docs/verification.md.

transformers' GPT-2, BERT and LLaMA models have twins among npformer.models (gpt2.py, bert.py, llama.py).

HF checkpoint directories (config.json + model.safetensors), without torch:
``from_pretrained(path, dtype=None, with_tokenizer=False)`` and ``save_pretrained(model, path)``
(npformer/interop/pretrained.py; needs safetensors: ``pip install 'npformer[hf]'``).

torch and transformers are imported only when these functions run.
"""

from .comparison import Entry, Report, compare
from .mapping import TorchMapping, load_torch_state_dict
from .pretrained import from_pretrained, save_pretrained
from .torch_interop import SUPPORTED, from_torch, to_torch

__all__ = ["from_torch", "to_torch", "SUPPORTED", "compare", "Report", "Entry", "TorchMapping",
           "load_torch_state_dict", "from_pretrained", "save_pretrained"]
