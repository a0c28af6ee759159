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
from xpack.packager.io.checkpoint import Checkpoint, load_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

FISHER_SEED = 0
SAMPLE_PER_SEQUENCE = 64  # input rows kept per sequence and layer (TensorStats.in_sample), up to SAMPLE_TOKENS
SAMPLE_TOKENS = 512
# The blocks activations are rounded to 8 bits in: llama.cpp's Q8_0 / Q8_1 (32: legacy and IQ4_NL weights) and Q8_K
# (256: K-quants); onnxruntime's MatMulNBits at accuracy_level 4 rounds them per block of the weight's (16-128).
ACTIVATION_BLOCKS = (16, 32, 64, 128, 256)


@dataclass
class TensorStats:
    """The statistics of one linear layer (``model.layers.0.self_attn.q_proj.weight``)."""

    in_sq_mean: np.ndarray  # [in_features] float32: llama.cpp's importance matrix (mean over tokens of x_j^2)
    out_fisher: np.ndarray | None  # [out_features] float32: mean over tokens of (dL/dy_i)^2; None without fisher
    count: int  # tokens seen
    # block size -> [in_features / block] float32: mean over tokens of max|x| over each block of the input, squared.
    # llama.cpp quantizes the activations too (to 8 bits per block of 32 or 256) when the weight is quantized;
    # the rounding step of a block is its max|x| / 127 (plan.py's activation term).
    in_block_amax_sq: dict[int, np.ndarray] = field(default_factory=dict)
    # An embedding table read by lookup (also the output head when tied): how often each row was looked up
    # (fraction of tokens, [rows]) and the Fisher of the lookup's output per column, times the embedding's
    # scale squared (Gemma multiplies by sqrt(hidden)), [cols]. None for a plain linear layer.
    lookup_use: np.ndarray | None = None
    lookup_fisher: np.ndarray | None = None
    # [tokens, in_features] float32: the layer's inputs at a fixed sample of calibration positions. The diagonal
    # importance matrix ignores how input columns move together; a low-rank weight change (a merged LoRA delta)
    # is aligned with exactly those directions, and a quantizer that rounds a merged weight back towards the grid
    # its base came from (a dequantized GGUF base) removes it: plan.py measures ||x E^T||^2 on these rows.
    in_sample: np.ndarray | None = None
    # [tokens, out_features] float32: dL/dy at the same positions (sampled labels). With in_sample, the Fisher
    # quadratic of a weight change E is estimated whole, 1/2 mean_t (g_t . E x_t)^2, output correlations included.
    out_sample: np.ndarray | None = None


@dataclass
class LayerStats:
    tensors: dict[str, TensorStats] = field(default_factory=dict)  # HF weight name -> its statistics (linears)
    embedding: tuple[str, TensorStats] | None = None  # the input embedding's HF weight name and its lookup statistics
    tokens: int = 0  # calibration tokens the model read
    sequences: int = 0
    seq_len: int = 0
    calibration_sha256: str = ""
    calibration_source: str = ""
    fisher_seed: int | None = None  # the sampling seed; None when the Fisher was not collected
    # the first sequences' token ids and the model's float32 logits [len, vocab] (collect_stats' keep_logits_tokens):
    # the reference a calibrated mix is measured against, taken from this pass instead of a second one
    reference: list[tuple[list[int], np.ndarray]] = field(default_factory=list)


def collect_stats(
    model_dir: Path, calibration: CalibrationText, max_tokens: int = 4096, seq_len: int = 512, fisher: bool = True, seed: int = FISHER_SEED,
    keep_logits_tokens: int = 0,
) -> LayerStats:
    """Run the checkpoint in ``model_dir`` (float32, CPU) over ``calibration`` and collect, for every linear layer of
    its decoder and its output head, the importance matrix and (``fisher``) the diagonal Fisher of its output; the
    logits of the first sequences, up to ``keep_logits_tokens`` tokens, are kept too (``LayerStats.reference``)."""
    import numpy as np
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
    reference, kept = [], 0
    try:
        positions = torch.Generator().manual_seed(seed + 1)
        for ids in tqdm(sequences, desc="calibrate", unit="seq", disable=None):
            acc.sample_positions(len(ids), positions)
            logits = _run_sequence(model, ids, fisher, generator)
            if kept < keep_logits_tokens:
                reference.append((list(ids), logits.numpy().astype(np.float32, copy=True)))
                kept += len(ids)
    finally:
        for h in handles:
            h.remove()
    return LayerStats(
        tensors=acc.result(), embedding=acc.embedding_result(model), tokens=n_tokens, sequences=len(sequences), seq_len=seq_len, calibration_sha256=calibration.sha256,
        calibration_source=calibration.source, fisher_seed=seed if fisher else None, reference=reference,
    )


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(model_dir)
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
        self.in_amax: dict = {}
        self.samples: dict = {}
        self.grad_samples: dict = {}
        self.positions = None  # the positions sampled in the current sequence
        self.out_sq: dict = {}
        self.counts: dict[str, int] = {}

    def attach(self, model) -> list:
        self.lookups = None
        self.lookup_sq = None
        self.lookup_tokens = 0
        handles = [model.get_input_embeddings().register_forward_hook(self._embedding_hook)] if self.fisher else []
        handles += [module.register_forward_hook(self._hook(name)) for name, module in self.linears.items()]
        return handles

    def _hook(self, name: str):
        import torch

        def hook(module, inputs, output):
            x = inputs[0].detach()
            rows = x.numel() // x.shape[-1]
            flat = x.reshape(rows, -1)
            _add(self.in_sq, name, flat.pow(2).sum(0, dtype=torch.float64))
            kept = self.samples.setdefault(name, [])
            if self.positions is not None and sum(len(k) for k in kept) < SAMPLE_TOKENS:
                kept.append(flat[self.positions[self.positions < rows]].float().clone())
            for block in ACTIVATION_BLOCKS:
                if block > flat.shape[1]:
                    continue
                padded = flat if flat.shape[1] % block == 0 else torch.nn.functional.pad(flat, (0, -flat.shape[1] % block))  # as MatMulNBits pads K
                amax = padded.reshape(rows, -1, block).abs().amax(-1)
                _add(self.in_amax, (name, block), amax.pow(2).sum(0, dtype=torch.float64))
            self.counts[name] = self.counts.get(name, 0) + rows
            if self.fisher and output.requires_grad:
                positions = self.positions
                keep = positions is not None and sum(len(k) for k in self.grad_samples.get(name, [])) < SAMPLE_TOKENS

                def grad_hook(g):
                    flat_g = g.detach().reshape(rows, -1)
                    _add(self.out_sq, name, flat_g.pow(2).sum(0, dtype=torch.float64))
                    if keep:
                        self.grad_samples.setdefault(name, []).append(flat_g[positions[positions < rows]].float().clone())

                output.register_hook(grad_hook)

        return hook

    def _embedding_hook(self, module, inputs, output):
        """Count the rows looked up; ask for the output's gradient (every activation after it then gets one)."""
        import torch

        ids = inputs[0].reshape(-1)
        counts = torch.bincount(ids, minlength=module.weight.shape[0]).to(torch.float64)
        self.lookups = counts if self.lookups is None else self.lookups + counts
        self.lookup_tokens += ids.numel()
        output.requires_grad_(True)
        rows = ids.numel()

        def grad_hook(g):
            sq = g.detach().reshape(rows, -1).pow(2).sum(0, dtype=torch.float64)
            self.lookup_sq = sq if self.lookup_sq is None else self.lookup_sq + sq

        output.register_hook(grad_hook)
        return output

    def embedding_result(self, model) -> tuple[str, TensorStats] | None:
        import numpy as np

        if self.lookups is None or self.lookup_sq is None or not self.lookup_tokens:
            return None
        module = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is module) + ".weight"
        scale = float(getattr(module, "embed_scale", 1.0))  # Gemma's ScaledWordEmbedding: output = scale * row
        n = self.lookup_tokens
        cols = module.weight.shape[1]
        return name, TensorStats(
            in_sq_mean=np.ones(cols, dtype=np.float32), out_fisher=None, count=n,
            lookup_use=(self.lookups / n).numpy().astype(np.float32),
            lookup_fisher=(self.lookup_sq / n * scale * scale).numpy().astype(np.float32),
        )

    def sample_positions(self, length: int, generator) -> None:
        """The positions of the next sequence whose layer inputs are kept (the same positions for every layer)."""
        import torch

        self.positions = torch.randperm(length, generator=generator)[: min(SAMPLE_PER_SEQUENCE, length)].sort().values

    def result(self) -> dict[str, TensorStats]:
        import numpy as np
        import torch

        out = {}
        for name in self.linears:
            n = self.counts.get(name, 0)
            if not n:
                continue
            fisher = (self.out_sq[name] / n).numpy().astype(np.float32) if name in self.out_sq else None
            blocks = {b: (self.in_amax[(name, b)] / n).numpy().astype(np.float32) for b in ACTIVATION_BLOCKS if (name, b) in self.in_amax}
            sample = torch.cat(self.samples[name])[:SAMPLE_TOKENS].numpy() if self.samples.get(name) else None
            grads = torch.cat(self.grad_samples[name])[:SAMPLE_TOKENS].numpy() if self.grad_samples.get(name) else None
            if sample is None or grads is None or len(grads) != len(sample):
                grads = None
            out[name] = TensorStats((self.in_sq[name] / n).numpy().astype(np.float32), fisher, n, blocks, in_sample=sample, out_sample=grads)
        return out


def _add(sums: dict, name: str, value) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _activations_need_grad(module, inputs, output):
    """The weights need no gradient; the embedding output asks for one so every activation after it gets one."""
    return output.requires_grad_(True)


def _run_sequence(model, ids: list[int], fisher: bool, generator) -> torch.Tensor:
    """One forward pass (the hooks collect x^2); with ``fisher``, a backward pass of log p(sampled tokens).
    Returns the logits [len(ids), vocab], float32."""
    import torch

    input_ids = torch.tensor([ids])
    if not fisher:
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False).logits[0].float()
    with torch.enable_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs.gather(1, sample_tokens(log_probs.detach(), generator)).sum().backward()
    return logits.detach()


def sample_tokens(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per position [T, 1], drawn from the model's distribution log_probs [T, V] by inverting its CDF
    (as exact as torch.multinomial, and several times faster over a 262k vocabulary)."""
    import torch

    cdf = log_probs.exp().cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)
