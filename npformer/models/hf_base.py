"""The base of the models written with Hugging Face's names (BERT, LLaMA, BART, T5).

    class BertPreTrainedModel(PreTrainedModel):
        config_class = BertConfig
        def _init_weights(self, generator): ...          HF's initialisation for this family

    a model:  super().__init__(config)
              with self.building(dtype):                  layers made in `dtype`, their own init thrown away
                  ...                                     (drawn from a throwaway generator)
              self.post_init(generator, device, init_weights)

from_pretrained / save_pretrained are HF's classmethod and method, through npformer.interop (a
directory of config.json and model.safetensors; torch is never imported).
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import backend, nn, random
from ..dtypes import default_dtype, resolve


class PreTrainedModel(nn.Module):
    """The config (an instance of the subclass's config_class), the dtype, the device and HF's
    initialisation (the subclass's _init_weights)."""

    config_class = None

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__}: config must be a {self.config_class.__name__}; got "
                            f"{type(config).__name__}")
        self.config = config

    @staticmethod
    @contextlib.contextmanager
    def building(dtype):
        """Inside: `dtype` (npformer's default when None) is the default dtype, and layers draw their
        own initialisation (overwritten by post_init) from a throwaway generator, so the process's
        global one is untouched."""
        with random.thread_default_generator(np.random.default_rng(0), "cpu"), default_dtype(resolve(dtype)):
            yield

    def post_init(self, generator=None, device: str = None, init_weights: bool = True):
        """HF's initialisation (when init_weights), then move every weight to `device`."""
        if init_weights:
            self._init_weights(generator)
        return self.to(device=device or backend.default_device())

    def _init_weights(self, generator):
        raise NotImplementedError(f"{type(self).__name__} defines no initialisation")

    @classmethod
    def from_pretrained(cls, path, dtype=None, **kwargs):
        """HF's classmethod: npformer.interop.from_pretrained(path, dtype, architecture=this class, **kwargs),
        e.g. BertForSequenceClassification.from_pretrained(dir, num_labels=2) on a masked-LM directory;
        the family's base class reads the directory's own architecture."""
        from ..interop.pretrained import from_pretrained
        base = cls.__name__.endswith("PreTrainedModel")
        return from_pretrained(path, dtype, architecture=None if base else cls.__name__, **kwargs)

    def save_pretrained(self, path, tokenizer=None) -> None:
        """npformer.interop.save_pretrained(self, path, tokenizer=tokenizer): config.json and
        model.safetensors, as HF writes them (and the tokenizer's files)."""
        from ..interop.pretrained import save_pretrained
        save_pretrained(self, path, tokenizer=tokenizer)
