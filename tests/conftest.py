"""Shared pytest fixtures.

Tiny model twins (see tests/twins.py) are built once per session, lazily, on first use, so test
modules that never ask for them never import torch/transformers.
"""

from __future__ import annotations

import hashlib
import json
import os

# Never touch the network: every model/tokenizer in the suite is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The twins are tiny: one intra-op thread is fastest, and on a small shared box a second OpenMP thread
# turns every op into a wait for a free core (a 2-layer forward went from ~5 ms to ~400 ms).
# Must be set before torch is first imported; export OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


class TwinFactory:
    """Builds each twin once per session and caches it.

    ``get(name)`` returns the default :class:`twins.Twin` (base + default adapter).
    ``get(name, **lora_overrides)`` returns a Twin sharing the cached base checkpoint but with its
    own adapter built with those LoraConfig overrides (``adapter_dtype=`` and ``seed=`` are passed
    to ``build_adapter``); each distinct set of overrides is built once.
    Do not modify the returned folders; copy them first (``shutil.copytree``) if a test must.
    """

    def __init__(self, root):
        self.root = root
        self._cache: dict[tuple[str, str], object] = {}

    def get(self, name: str, **overrides):
        import twins

        key = (name, _overrides_key(overrides))
        if key in self._cache:
            return self._cache[key]
        if not overrides:
            twin = twins.make_twin(name, self.root)
        else:
            base = self.get(name)
            adapter_kwargs = {k: overrides.pop(k) for k in ("adapter_dtype", "seed") if k in overrides}
            adapter_dir = self.root / name / f"adapter-{key[1][:12]}"
            twins.build_adapter(name, base.model_dir, adapter_dir, **adapter_kwargs, **overrides)
            lora_kwargs = twins.default_lora_kwargs(name)
            lora_kwargs.update(overrides)
            twin = twins.Twin(
                name=name,
                model_dir=base.model_dir,
                adapter_dir=adapter_dir,
                model_class=base.model_class,
                lora_kwargs=lora_kwargs,
                is_vision=base.is_vision,
            )
        self._cache[key] = twin
        return twin

    __call__ = get


def _overrides_key(overrides: dict) -> str:
    if not overrides:
        return ""
    text = json.dumps(overrides, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture(scope="session")
def twin_factory(tmp_path_factory) -> TwinFactory:
    """Session-wide factory of tiny random-weight model twins: ``twin_factory.get("gemma3_vision")``."""
    return TwinFactory(tmp_path_factory.mktemp("twins"))
