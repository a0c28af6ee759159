"""Choose a quantization type per tensor: the lowest predicted KL within a size, or the smallest size within a KL.

The prediction is layer-local, so it scales to 4B-11B models (no forward pass per tensor and type):
for a linear layer y = W x whose weight gets the rounding error E = dequant(quant(W)) - W, the output
moves by E x, and to second order the KL divergence of the model's next-token distribution is

    KL ~= 1/2 * sum_i F_i * E_x[(E_i . x)^2]

with F_i the diagonal Fisher of the layer's output (stats.py: sampled labels) and the expectation over the
layer's inputs at a sample of calibration positions (stats.py keeps 512). With only the diagonal importance
matrix X_j = E[x_j^2] it becomes sum_j X_j E_ij^2 (K-FAC/HAWQ's diagonal approximation), which missed what a
merged LoRA delta does: the delta is small but aligned with the inputs' main directions, and on a base that
was itself dequantized from a GGUF the quantizer rounds the merged weight back towards the base's grid,
erasing the delta (measured on the SmolLM2 demo: attention at Q5_1 predicted ~1e-4 diagonal, measured 0.15). E is the
error llama.cpp's quantizer really makes for that type with that importance matrix (qerror.py), not a
noise model. Tensors are assumed to add up independently; the caller measures the real KL afterwards.

A second term: with a quantized weight, llama.cpp's CPU kernels also round the activations to 8 bits per
block (Q8_0/Q8_1 blocks of 32 for the legacy types and IQ4_NL, Q8_K blocks of 256 for K-quants; an F16
weight takes F16 activations, ~no error). The output then moves by W dx, with dx uniform within a step of
max|x_block| / 127, so the term is 1/2 sum_i F_i sum_b (sum_{j in b} W_ij^2) E[max|x_b|^2] / (127^2 * 12).
Measured on real Gemma 3 270M, it is what made plain Q8_0 three times worse than the weight error alone
predicts, and what an F16 weight buys back.

The errors of different tensors do not add up independently when they are coherent: on a base dequantized
from a GGUF, rounding a merged weight back towards the base's grid undoes a part of the adapter in every
layer at once, and those parts add up before they are squared (SmolLM2 demo, o_proj at Q5_1 in 30 layers:
0.013 as a sum of the layers' own terms, 0.057 measured). So the stats keep, at one sample of positions
shared by all layers, each layer's input x_t and output gradient g_t, and the first-order change of the
log-likelihood, sum over tensors of g_t . E x_t, is summed across tensors before it is squared (joint_kl).

The choice is a multiple-choice knapsack: each tensor picks one candidate (type, bytes, predicted KL).
It is started with a Lagrange multiplier on the tensors' own terms (each tensor minimises KL + lambda *
bytes, lambda bisected to meet the budget) and finished by coordinate descent on the joint KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from xpack.errors import XpackError
from xpack.packager.export.calibrate.qerror import quant_error, row_bytes

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from xpack.packager.export.calibrate.stats import TensorStats

# The types a calibrated mix may give a tensor, by --bits. Only types whose block fits the tensor's rows
# are offered (K-quants need rows that are a multiple of 256: Gemma 3 270M's 640-wide rows do not).
CANDIDATES = {
    4: ("IQ4_NL", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16"),
    8: ("Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16"),
}
# Above this many weights a tensor's error is computed on a sample of its rows (rows quantize independently):
# the rows with the largest Fisher exactly, and a fixed-seed sample of the others, scaled up.
EXACT_ELEMENTS = 8 << 20
TOP_ROWS = 4096
SAMPLED_ROWS = 4096


@dataclass(frozen=True)
class Candidate:
    type: str
    bytes: int
    kl: float  # predicted contribution to the mean KL per token, alone (the tensor's own Fisher quadratic)
    # per sampled calibration position, the first-order change of log p(sampled token), g_t . E x_t: summed over
    # tensors and squared it gives the joint KL, cross-tensor terms included (see joint_kl); None when not sampled
    dots: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class TensorOptions:
    name: str  # GGUF tensor name
    shape: tuple[int, int]  # [rows, row length]
    plain_type: str  # what llama.cpp's plain file type gives it
    candidates: list[Candidate] = field(default_factory=list)

    def get(self, qtype: str) -> Candidate:
        return next(c for c in self.candidates if c.type == qtype)


def block_fits(qtype: str, row_length: int) -> bool:
    import gguf

    return row_length % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] == 0


# The activation block each weight type's CPU dot product quantizes its input to (ggml's vec_dot_type); None: float.
def activation_block(qtype: str) -> int | None:
    if qtype in ("F32", "F16", "BF16"):
        return None
    return 256 if qtype.endswith("_K") or qtype.startswith("IQ") and qtype != "IQ4_NL" else 32


@dataclass(frozen=True)
class QuantFormat:
    """What the planner needs of a file format's weight types: which types ``--bits`` offers, the error a type
    makes on a weight [rows, row length] (with an importance matrix), the bytes it takes, whether a row length
    fits its blocks, and the block its kernels round the activations in (None: not rounded)."""

    name: str
    candidates: dict[int, tuple[str, ...]]
    error: Callable[..., "np.ndarray"]  # (weight [rows, cols], type, imatrix [cols] | None) -> dequant(quant(W)) - W
    nbytes: Callable[[str, int, int], int]  # (type, rows, cols) -> bytes
    fits: Callable[[str, int], bool]
    activation_block: Callable[[str], "int | None"]
    # The activation term from each sampled position's own block maxima (its rounding step), not the mean step over all
    # tokens: the tokens with outlier activations (an attention sink) are rarely the ones whose prediction the loss is
    # sensitive to, and the mean step weighted by the mean Fisher overstates the error (onnxruntime's int8 down_proj on
    # SmolLM2: 0.022 predicted that way, 0.0022 measured). Off for GGUF, whose README figures were measured without it.
    activation_per_position: bool = False


GGUF_FORMAT = QuantFormat("gguf", CANDIDATES, quant_error, lambda t, rows, cols: rows * row_bytes(t, cols), block_fits, activation_block)


def _blocks(a: "np.ndarray", block: int) -> "np.ndarray":
    """[n, cols] -> [n, blocks, block], the last block zero-padded (as MatMulNBits pads K)."""
    import numpy as np

    if a.shape[1] % block:
        a = np.pad(a, ((0, 0), (0, -a.shape[1] % block)))
    return a.reshape(a.shape[0], -1, block)


def prediction(weight: np.ndarray, qtype: str, stats: TensorStats, use_imatrix: bool = True, fmt: QuantFormat = GGUF_FORMAT) -> tuple[float, np.ndarray | None]:
    """(predicted KL of this tensor alone, the per-position first-order changes or None): the matmul term with the
    activation term (rows sampled when large), + the lookup term for an embedding table (see :func:`_lookup_kl`)."""
    if stats.out_fisher is None and stats.lookup_use is None:
        raise XpackError("a KL prediction needs the output Fisher (collect_stats(..., fisher=True))")
    imatrix = stats.in_sq_mean if use_imatrix and stats.out_fisher is not None else None
    total, dots = _matmul_kl(weight, qtype, stats, imatrix, fmt) if stats.out_fisher is not None else (0.0, None)
    if stats.lookup_use is not None and stats.lookup_fisher is not None:
        total += _lookup_kl(weight, qtype, stats, imatrix, fmt)
    return total, dots


def _matmul_kl(weight: np.ndarray, qtype: str, stats: TensorStats, imatrix, fmt: QuantFormat) -> tuple[float, np.ndarray | None]:
    import numpy as np

    fisher = np.asarray(stats.out_fisher, dtype=np.float64)
    block = fmt.activation_block(qtype)
    amax_sq = stats.in_block_amax_sq.get(block) if block else None
    step_var = None if amax_sq is None else np.asarray(amax_sq, dtype=np.float32) / (127.0**2 * 12.0)
    rows, weights = _row_sample(fisher, weight.shape[0] * weight.shape[1])
    x = None if stats.in_sample is None else np.asarray(stats.in_sample, dtype=np.float32)
    g = None if stats.out_sample is None else np.asarray(stats.out_sample, dtype=np.float32)
    if x is not None and g is not None and len(rows) == weight.shape[0]:
        return _sampled_kl(weight, qtype, imatrix, x, g, step_var, block, fmt)
    x2 = np.asarray(stats.in_sq_mean, dtype=np.float32)
    total = 0.0
    for start in range(0, len(rows), 2048):  # bounded memory: 2048 rows at a time
        idx = rows[start : start + 2048]
        w = weight[idx]
        err = fmt.error(w, qtype, imatrix)
        # E[(E_i x)^2] on the sampled inputs (their correlations count), else with the diagonal importance matrix
        per_row = np.square(x @ err.T).mean(0) if x is not None else (err * err) @ x2
        if step_var is not None:
            per_row = per_row + _blocks(w * w, block).sum(-1) @ step_var
        total += float(per_row.astype(np.float64) @ (fisher[idx] * weights[start : start + 2048]))
    return 0.5 * total, None


def _sampled_kl(weight, qtype, imatrix, x, g, step_var, block, fmt: QuantFormat) -> tuple[float, np.ndarray]:
    """1/2 mean_t (g_t . E x_t)^2 + the activation term 1/2 mean_t sum_j var_j (g_t W)_j^2, on the sampled positions:
    the Fisher quadratic with its correlations on both sides (inputs and outputs), not only its diagonal."""
    import numpy as np

    dots = np.zeros(len(x), dtype=np.float64)
    back = np.zeros_like(x) if step_var is not None else None
    for start in range(0, weight.shape[0], 2048):
        w = weight[start : start + 2048]
        err = fmt.error(w, qtype, imatrix)
        dots += ((x @ err.T) * g[:, start : start + 2048]).sum(1)
        if back is not None:
            back += g[:, start : start + 2048] @ w
    if back is None:
        act = 0.0
    elif fmt.activation_per_position:
        steps = np.square(np.abs(_blocks(x, block)).max(-1).astype(np.float64)) / (127.0**2 * 12.0)  # [T, blocks]
        act = 0.5 * float(np.mean((_blocks(back * back, block).sum(-1) * steps).sum(-1)))
    else:
        act = 0.5 * float(np.mean(_blocks(back * back, block).sum(-1) @ step_var.astype(np.float64)))
    return 0.5 * float(np.mean(dots * dots)) + act, dots


def _lookup_kl(weight: np.ndarray, qtype: str, stats: TensorStats, imatrix, fmt: QuantFormat) -> float:
    """An embedding row's error enters the residual stream wherever its token is read: 1/2 sum_r use_r sum_d G_d E_rd^2,
    with use_r the row's share of the calibration tokens and G the Fisher of the lookup's output."""
    import numpy as np

    use = np.asarray(stats.lookup_use, dtype=np.float64)[: weight.shape[0]]
    rows = np.nonzero(use)[0]
    if not len(rows):
        return 0.0
    g = np.asarray(stats.lookup_fisher, dtype=np.float32)
    total = 0.0
    for start in range(0, len(rows), 2048):
        idx = rows[start : start + 2048]
        err = fmt.error(weight[idx], qtype, imatrix)
        total += float(((err * err) @ g).astype(np.float64) @ use[idx])
    return 0.5 * total


def _row_sample(fisher: np.ndarray, elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices and their weights: every row (weight 1), or the top-Fisher rows plus a scaled random sample."""
    import numpy as np

    n = fisher.shape[0]
    if elements <= EXACT_ELEMENTS or n <= TOP_ROWS + SAMPLED_ROWS:
        return np.arange(n), np.ones(n)
    order = np.argsort(fisher)[::-1]
    top, rest = np.sort(order[:TOP_ROWS]), order[TOP_ROWS:]
    sample = np.sort(np.random.default_rng(0).choice(rest, size=SAMPLED_ROWS, replace=False))
    return np.concatenate([top, sample]), np.concatenate([np.ones(len(top)), np.full(len(sample), len(rest) / SAMPLED_ROWS)])


def tensor_options(name: str, weight: np.ndarray, plain_type: str, stats: TensorStats, bits: int, use_imatrix: bool = True,
                   fmt: QuantFormat = GGUF_FORMAT) -> TensorOptions:
    """Every candidate type of ``bits`` that fits the tensor's rows, plus its plain type, with bytes and predicted KL."""
    rows, cols = weight.shape
    types = [t for t in fmt.candidates[bits] if fmt.fits(t, cols)]
    if plain_type not in types and fmt.fits(plain_type, cols):
        types.append(plain_type)
    options = TensorOptions(name, (rows, cols), plain_type)
    for qtype in types:
        kl, dots = prediction(weight, qtype, stats, use_imatrix, fmt)
        options.candidates.append(Candidate(qtype, fmt.nbytes(qtype, rows, cols), kl, dots))
    return options


# ---------------------------------------------------------------------------------------------
# the knapsack


def _pick(options: list[TensorOptions], lam: float) -> dict[str, Candidate]:
    return {o.name: min(o.candidates, key=lambda c: (c.kl + lam * c.bytes, c.bytes)) for o in options}


def _totals(choice: dict[str, Candidate]) -> tuple[int, float]:
    return sum(c.bytes for c in choice.values()), sum(c.kl for c in choice.values())


def solve(options: list[TensorOptions], budget_bytes: int | None = None, max_kl: float | None = None) -> dict[str, Candidate]:
    """The per-tensor choice: lowest predicted KL with total bytes <= ``budget_bytes``, or the fewest bytes with
    predicted KL <= ``max_kl`` (exactly one of the two)."""
    if (budget_bytes is None) == (max_kl is None):
        raise ValueError("give exactly one of budget_bytes and max_kl")
    if not options:
        return {}
    smallest = {o.name: min(o.candidates, key=lambda c: (c.bytes, c.kl)) for o in options}
    best = {o.name: min(o.candidates, key=lambda c: (c.kl, c.bytes)) for o in options}
    if budget_bytes is not None:
        if _totals(smallest)[0] > budget_bytes:
            raise XpackError(f"no mix of the candidate types fits {budget_bytes / 1e6:.1f} MB of weights (the smallest is "
                             f"{_totals(smallest)[0] / 1e6:.1f} MB); give a larger --target-size")
        if _totals(best)[0] <= budget_bytes:
            return _descend(options, best, budget_bytes)
        ok = lambda choice: _totals(choice)[0] <= budget_bytes  # noqa: E731
    else:
        if _totals(best)[1] > max_kl:
            return _meet(options, best, max_kl)  # the tensors' own terms already miss it: the best the joint KL allows
        ok = lambda choice: _totals(choice)[1] <= max_kl  # noqa: E731
    lo, hi = 0.0, 1.0
    while not ok(_pick(options, hi)):
        hi *= 10
        if hi > 1e30:
            break
    # budget: the smallest lambda that fits (lowest KL); max_kl: the largest lambda that meets it (fewest bytes)
    for _ in range(100):
        mid = (lo + hi) / 2
        if ok(_pick(options, mid)) == (budget_bytes is not None):
            hi = mid
        else:
            lo = mid
    choice = _pick(options, hi if budget_bytes is not None else lo)
    if not ok(choice):
        choice = _pick(options, hi)
    if budget_bytes is not None:
        return _descend(options, _greedy_fill(options, choice, budget_bytes), budget_bytes)
    return _meet(options, choice, max_kl)


def joint_kl(choice: dict[str, Candidate]) -> float:
    """The predicted KL of a whole choice: the tensors' own terms plus the cross terms of their sampled changes."""
    import numpy as np

    own = sum(c.kl for c in choice.values())
    dots = [c.dots for c in choice.values() if c.dots is not None]
    if not dots:
        return own
    total = np.sum(dots, axis=0)
    return max(own + 0.5 * (float(np.mean(total * total)) - sum(float(np.mean(d * d)) for d in dots)), 0.0)


class _Joint:
    """joint_kl kept up to date as single tensors change type (O(positions) per trial)."""

    def __init__(self, choice: dict[str, Candidate]):
        import numpy as np

        self.choice = dict(choice)
        dots = [c.dots for c in choice.values() if c.dots is not None]
        self.sum = np.sum(dots, axis=0) if dots else None
        self.own = sum(c.kl for c in choice.values())
        self.selfsq = sum(float(np.mean(d * d)) for d in dots)

    def value(self, name: str | None = None, new: Candidate | None = None) -> float:
        import numpy as np

        if self.sum is None:
            return self.own if name is None else self.own - self.choice[name].kl + new.kl
        own, total, selfsq = self.own, self.sum, self.selfsq
        if name is not None:
            cur = self.choice[name]
            own = own - cur.kl + new.kl
            if cur.dots is not None:
                total, selfsq = total - cur.dots, selfsq - float(np.mean(cur.dots * cur.dots))
            if new.dots is not None:
                total, selfsq = total + new.dots, selfsq + float(np.mean(new.dots * new.dots))
        return max(own + 0.5 * (float(np.mean(total * total)) - selfsq), 0.0)

    def set(self, name: str, new: Candidate) -> None:
        import numpy as np

        cur = self.choice[name]
        self.own += new.kl - cur.kl
        if self.sum is not None:
            if cur.dots is not None:
                self.sum, self.selfsq = self.sum - cur.dots, self.selfsq - float(np.mean(cur.dots * cur.dots))
            if new.dots is not None:
                self.sum, self.selfsq = self.sum + new.dots, self.selfsq + float(np.mean(new.dots * new.dots))
        self.choice[name] = new

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.choice.values())


def _descend(options: list[TensorOptions], choice: dict[str, Candidate], budget_bytes: int, passes: int = 4) -> dict[str, Candidate]:
    """Coordinate descent on the joint KL within the budget: each tensor in turn takes its best type given the others."""
    state = _Joint(choice)
    for _ in range(passes):
        changed = False
        for o in options:
            used = state.bytes - state.choice[o.name].bytes
            best, best_value = state.choice[o.name], state.value()
            for c in o.candidates:
                if c is not best and used + c.bytes <= budget_bytes:
                    v = state.value(o.name, c)
                    if v < best_value - 1e-12:
                        best, best_value = c, v
            if best is not state.choice[o.name]:
                state.set(o.name, best)
                changed = True
        if not changed:
            break
    return state.choice


def _meet(options: list[TensorOptions], choice: dict[str, Candidate], max_kl: float) -> dict[str, Candidate]:
    """The fewest bytes with joint KL <= max_kl: upgrade (most KL saved per byte) until met, then drop bytes that are not needed."""
    state = _Joint(choice)
    while state.value() > max_kl:
        moves = [((state.value() - state.value(o.name, c)) / max(c.bytes - state.choice[o.name].bytes, 1), o.name, c)
                 for o in options for c in o.candidates if c.bytes > state.choice[o.name].bytes]
        moves = [m for m in moves if m[0] > 0]
        if not moves:
            break  # even the best mix misses it: the caller reports that
        _, name, c = max(moves, key=lambda m: m[0])
        state.set(name, c)
    for o in sorted(options, key=lambda o: -state.choice[o.name].bytes):
        for c in sorted(o.candidates, key=lambda c: c.bytes):
            if c.bytes < state.choice[o.name].bytes and state.value(o.name, c) <= max_kl:
                state.set(o.name, c)
                break
    return state.choice


def _greedy_fill(options: list[TensorOptions], choice: dict[str, Candidate], budget_bytes: int) -> dict[str, Candidate]:
    """Spend what the Lagrangian choice leaves of the budget: the upgrade with the most KL saved per byte, repeatedly."""
    choice = dict(choice)
    used = _totals(choice)[0]
    by_name = {o.name: o for o in options}
    while True:
        moves = [
            ((cur.kl - c.kl) / max(c.bytes - cur.bytes, 1), name, c)
            for name, cur in choice.items()
            for c in by_name[name].candidates
            if c.kl < cur.kl and c.bytes >= cur.bytes and used - cur.bytes + c.bytes <= budget_bytes
        ]
        if not moves:
            return choice
        _, name, c = max(moves, key=lambda m: m[0])
        used += c.bytes - choice[name].bytes
        choice[name] = c
