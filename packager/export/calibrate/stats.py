"""Per-layer statistics of a model reading calibration text: which inputs and outputs of each linear layer matter.

Two measures, one pass:

- the importance matrix, exactly as llama.cpp's llama-imatrix computes it: per input column j of a linear
  layer, the mean over tokens of x_j^2. llama.cpp's quantizer weighs each column's rounding error by it.
- the diagonal Fisher of the layer's output: per output row i, the mean over tokens of (dL/dy_i)^2, with L
  the log-likelihood of a token sampled from the model's own prediction at every position. Sampled (not
  the text's) labels make it the true Fisher in expectation, so (dy_i)^2 weighted by it approximates the
  KL divergence a quantization error dy causes: what a KL budget needs, per tensor and per row.

Everything runs in float32 on the CPU, one sequence at a time; the weights need no gradients (only the
activations do), so memory stays that of one forward and backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.archs import Arch, require_arch
from xpack.packager.export.calibrate.text import CalibrationText
from xpack.packager.io.checkpoint import Checkpoint

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

FISHER_SEED = 0


@dataclass
class TensorStats:
    """The statistics of one linear layer (``model.layers.0.self_attn.q_proj.weight``)."""

    in_sq_mean: np.ndarray  # [in_features] float32: llama.cpp's importance matrix (mean over tokens of x_j^2)
    out_fisher: np.ndarray | None  # [out_features] float32: mean over tokens of (dL/dy_i)^2; None without fisher
    count: int  # tokens seen


@dataclass
class LayerStats:
    tensors: dict[str, TensorStats] = field(default_factory=dict)  # HF weight name -> its statistics
    tokens: int = 0  # calibration tokens the model read
    sequences: int = 0
    seq_len: int = 0
    calibration_sha256: str = ""
    calibration_source: str = ""
    fisher_seed: int | None = None  # the sampling seed; None when the Fisher was not collected


def collect_stats(
    model_dir: Path, calibration: CalibrationText, max_tokens: int = 4096, seq_len: int = 512, fisher: bool = True, seed: int = FISHER_SEED,
) -> LayerStats:
    """Run the checkpoint in ``model_dir`` (float32, CPU) over ``calibration`` and collect, for every linear layer of
    its decoder and its output head, the importance matrix and (``fisher``) the diagonal Fisher of its output."""
    import torch
    from tqdm import tqdm

    model_dir = Path(model_dir)
    arch = require_arch(Checkpoint(model_dir).config, "calibration")
    model, tokenizer = _load(model_dir)
    sequences, n_tokens = calibration.tokenize(tokenizer, seq_len, max_tokens)
    if not n_tokens:
        raise XpackError(f"the calibration text {calibration.source} has no tokens")
    acc = _Accumulator(_linears(model, arch, model_dir), fisher)
    handles = acc.attach(model)
    generator = torch.Generator().manual_seed(seed)
    try:
        for ids in tqdm(sequences, desc="calibrate", unit="seq", disable=None):
            _run_sequence(model, ids, fisher, generator)
    finally:
        for h in handles:
            h.remove()
    return LayerStats(
        tensors=acc.result(), tokens=n_tokens, sequences=len(sequences), seq_len=seq_len, calibration_sha256=calibration.sha256,
        calibration_source=calibration.source, fisher_seed=seed if fisher else None,
    )


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise XpackError(f"cannot load {model_dir} for calibration: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _linears(model, arch: Arch, model_dir: Path) -> dict[str, torch.nn.Linear]:
    """HF weight name -> nn.Linear, for the text decoder and the output head (vision towers left out)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not arch.is_vision(arch.canonical(name)):
            out[f"{name}.weight"] = module
    if not out:
        raise XpackError(f"{model_dir} has no linear layers to calibrate")
    return out


class _Accumulator:
    """Sums of x_j^2 (forward hooks on the inputs) and (dL/dy_i)^2 (tensor hooks on the outputs), in float64."""

    def __init__(self, linears: dict, fisher: bool):
        self.linears = linears
        self.fisher = fisher
        self.in_sq: dict = {}
        self.out_sq: dict = {}
        self.counts: dict[str, int] = {}

    def attach(self, model) -> list:
        handles = [model.get_input_embeddings().register_forward_hook(_activations_need_grad)] if self.fisher else []
        handles += [module.register_forward_hook(self._hook(name)) for name, module in self.linears.items()]
        return handles

    def _hook(self, name: str):
        import torch

        def hook(module, inputs, output):
            x = inputs[0].detach()
            rows = x.numel() // x.shape[-1]
            _add(self.in_sq, name, x.reshape(rows, -1).pow(2).sum(0, dtype=torch.float64))
            self.counts[name] = self.counts.get(name, 0) + rows
            if self.fisher and output.requires_grad:
                output.register_hook(lambda g: _add(self.out_sq, name, g.detach().reshape(rows, -1).pow(2).sum(0, dtype=torch.float64)))

        return hook

    def result(self) -> dict[str, TensorStats]:
        import numpy as np

        out = {}
        for name in self.linears:
            n = self.counts.get(name, 0)
            if not n:
                continue
            fisher = (self.out_sq[name] / n).numpy().astype(np.float32) if name in self.out_sq else None
            out[name] = TensorStats((self.in_sq[name] / n).numpy().astype(np.float32), fisher, n)
        return out


def _add(sums: dict, name: str, value) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _activations_need_grad(module, inputs, output):
    """The weights need no gradient; the embedding output asks for one so every activation after it gets one."""
    return output.requires_grad_(True)


def _run_sequence(model, ids: list[int], fisher: bool, generator) -> None:
    """One forward pass (the hooks collect x^2); with ``fisher``, a backward pass of log p(sampled tokens)."""
    import torch

    input_ids = torch.tensor([ids])
    if not fisher:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return
    with torch.enable_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs.gather(1, sample_tokens(log_probs.detach(), generator)).sum().backward()


def sample_tokens(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per position [T, 1], drawn from the model's distribution log_probs [T, V] by inverting its CDF
    (as exact as torch.multinomial, and several times faster over a 262k vocabulary)."""
    import torch

    cdf = log_probs.exp().cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)
