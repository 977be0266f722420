"""The ops that multiply a weight: one `WeightRule` per (op, weight input) in `RULES`.

A rule says how the operand maps to the canonical `W[out, K]` (a `Layout`, or why this form is
not supported), how to get the activation X whose rows multiply W's rows for calibrated methods
(an `Activation`, or why it cannot be captured), and where the op keeps a bias. Ops that hold
weights in a form nothing can prune yet are listed with their reason, so the report says why
their weights were left alone instead of passing over them in silence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.layout import Layout
from onnxprune.quantized import nbits_blocks
from onnxprune.statistics import conv_rows, conv_transpose_rows, previous_states, sequence_rows
from onnxprune.weight_chain import Step, constant_array, op_name, to_dtype

Rows = Callable[..., np.ndarray]  # one array per `Activation.values` entry → rows [groups, tokens, K]


@dataclass(frozen=True)
class Activation:
    # The graph values X is computed from: one input of the node, or (recurrent layers) the node's
    # hidden states Y with its initial state and sequence lengths where those are computed.
    values: tuple[ir.Value, ...]
    form: str  # how they become rows; consumers reading the same values in the same form share statistics
    rows: Rows  # their arrays → rows [groups, tokens, K], columns in canonical K order


@dataclass
class Consumer:
    node: ir.Node
    activations: tuple[str, ...] = ()  # the tensors X is computed from (none when it cannot be captured)
    form: str = "rows"
    rows: Rows | None = None
    # Inside a branch of a main-graph If: (that If, the branch attribute). Calibration reads X
    # through extra outputs of the If, empty on the samples that take the other branch.
    branch: tuple[ir.Node, str] | None = None

    @property
    def stat_key(self) -> tuple[str, ...]:
        return *self.fetched, self.form

    @property
    def main_node(self) -> ir.Node:
        """The main-graph node that runs this consumer: itself, or the If holding it."""
        return self.node if self.branch is None else self.branch[0]

    @property
    def fetched(self) -> tuple[str, ...]:
        """The main-graph names calibration reads `activations` under."""
        if self.branch is None:
            return self.activations
        return tuple(f"{name}@{self.branch[0].name}/{self.branch[1]}" for name in self.activations)


@dataclass(frozen=True)
class WeightRule:
    op: str  # op_type; `domain.op_type` outside the default domain
    weight_input: int
    layout: Callable[[ir.Node, tuple[int, ...]], Layout | str]
    activation: Callable[[ir.Node, Layout], Activation | str]
    bias_input: int | None = None  # the node's own per-output bias operand
    bias_after: bool = False  # a bias is an Add right after the node (outputs on the last axis)
    # integer operands the node dequantizes itself (MatMulInteger's zero point): a last chain step
    operand_step: Callable[[ir.Node, tuple[int, ...], np.dtype], Step | str] | None = None
    default_reason: str | None = None  # why the default selection leaves this operand alone (--include takes it)


def rule_for(node: ir.Node, index: int) -> WeightRule | None:
    return _BY_USE.get((op_name(node), index))


def _refused(reason: str):
    return lambda node, *_: reason


def _flat_rows(x: np.ndarray) -> np.ndarray:
    """One row per position of the leading axes, as a single group."""
    return x.reshape(1, -1, x.shape[-1])


def _input_rows(index: int, transpose_last: bool = False):
    """X = input `index`, one row per position of its leading axes (swapped last two if asked)."""
    def activation(node: ir.Node, layout: Layout) -> Activation:
        if transpose_last:
            return Activation((node.inputs[index],), "swap_last", lambda x: _flat_rows(np.swapaxes(x, -1, -2)))
        return Activation((node.inputs[index],), "rows", _flat_rows)
    return activation


def _matrix(kind: str):
    def layout(node: ir.Node, shape) -> Layout | str:
        if len(shape) != 2:
            return f"{len(shape)}-D weight operand (a batched product of {list(shape)}): only matrices are pruned"
        return Layout(kind, shape)
    return layout


def _matmul_left_layout(node: ir.Node, shape) -> Layout | str:
    if constant_array(node.inputs[1]) is not None:
        return "both operands are constants"
    return _matrix("nk")(node, shape)


def _gemm_b_layout(node: ir.Node, shape) -> Layout | str:
    return _matrix("nk" if node.attributes.get_int("transB", 0) else "kn")(node, shape)


def _gemm_a_layout(node: ir.Node, shape) -> Layout | str:
    if constant_array(node.inputs[1]) is not None:
        return "both operands are constants"
    return _matrix("kn" if node.attributes.get_int("transA", 0) else "nk")(node, shape)


def _gemm_x_for_b(node: ir.Node, layout: Layout) -> Activation:
    return _input_rows(0, transpose_last=bool(node.attributes.get_int("transA", 0)))(node, layout)


def _gemm_x_for_a(node: ir.Node, layout: Layout) -> Activation:
    """Y = W·B: the rows of X are B's columns (B's rows when transB)."""
    return _input_rows(1, transpose_last=not node.attributes.get_int("transB", 0))(node, layout)


def _conv_layout(kind: str):
    def layout(node: ir.Node, shape) -> Layout | str:
        if len(shape) < 3:
            return f"{len(shape)}-D convolution weight"
        return Layout(kind, shape, groups=node.attributes.get_int("group", 1))
    return layout


def _patches(im2col: Callable[[np.ndarray, ir.Node], np.ndarray]):
    """im2col of a Conv / ConvTranspose input (statistics.py); accumulators are shared only by
    convolutions with the same kernel and attributes."""
    def activation(node: ir.Node, layout: Layout) -> Activation:
        attributes = ";".join(f"{name}={a.value}" for name, a in sorted(node.attributes.items()))
        return Activation((node.inputs[0],), f"{node.op_type}:{layout.shape[2:]}:{attributes}",
                          lambda x: im2col(x, node))
    return activation


# ------------------------------------------------------------------------------ Einsum


def _einsum_terms(node: ir.Node) -> tuple[list[str], str] | None:
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "->" not in equation:  # implicit output: the labels seen once, in alphabetical order
        letters = inputs.replace(",", "").replace(".", "")
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return (terms, output) if len(terms) == 2 else None


def _einsum_axes(node: ir.Node, weight_index: int) -> tuple[str, str, str] | str:
    """(weight term, output labels, reduction labels) or why the weight is not a plain matrix factor."""
    parsed = _einsum_terms(node)
    if parsed is None:
        return "Einsum with other than two operands"
    (first, second), output = parsed
    term, other = (first, second) if weight_index == 0 else (second, first)
    if "." in term or len(set(term)) != len(term):
        return f"Einsum weight term {term!r} has an ellipsis or a repeated label"
    out = "".join(c for c in term if c in output and c not in other)
    k = "".join(c for c in term if c in other and c not in output)
    batch = [c for c in term if c in other and c in output]
    if batch:
        return f"Einsum weight axis {batch[0]!r} is also a batch axis of {node.attributes.get_string('equation')!r}"
    if len(out) + len(k) != len(term) or not out or not k:
        return f"Einsum weight term {term!r} has no output or no reduction axis"
    return term, out, k


def _einsum_layout(weight_index: int):
    def layout(node: ir.Node, shape) -> Layout | str:
        axes = _einsum_axes(node, weight_index)
        if isinstance(axes, str):
            return axes
        term, out, k = axes
        if len(shape) != len(term):
            return f"Einsum term {term!r} does not match the weight's rank {len(shape)}"
        return Layout("einsum", shape, out_axes=tuple(term.index(c) for c in out),
                      k_axes=tuple(term.index(c) for c in k))
    return layout


def _einsum_activation(weight_index: int):
    def activation(node: ir.Node, layout: Layout) -> Activation | str:
        (first, second), output = _einsum_terms(node)
        term, other = (first, second) if weight_index == 0 else (second, first)
        k = "".join(term[a] for a in layout.k_axes)
        if any(c not in output and c not in term for c in other.replace(".", "")) or \
                len(set(other.replace(".", ""))) != len(other.replace(".", "")):
            return f"Einsum activation term {other!r} is summed or repeated on its own"

        def rows(x: np.ndarray) -> np.ndarray:
            head, ellipsis, tail = other.partition("...")
            labels = list(head) + ["."] * (x.ndim - len(head) - len(tail) if ellipsis else 0) + list(tail)
            reduced = [labels.index(c) for c in k]
            kept = [i for i in range(x.ndim) if i not in reduced]
            return x.transpose(kept + reduced).reshape(1, -1, layout.in_features)

        return Activation((node.inputs[1 - weight_index],), f"einsum:{other}:{k}", rows)
    return activation


# --------------------------------------------------------------------- recurrent (ONNX LSTM/GRU/RNN)


def _recurrent_layout(node: ir.Node, shape) -> Layout | str:
    return Layout("recurrent", shape) if len(shape) == 3 else f"{len(shape)}-D recurrent weight"


_REVERSED = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}  # per direction


def _operands(node: ir.Node, indices: tuple[int, ...]):
    """The node's optional inputs at `indices` as calibration gets them: (the computed ones, to be
    fetched; a function of their arrays giving every operand, constants read here, absent ones None)."""
    plan = []
    for index in indices:
        value = node.inputs[index] if len(node.inputs) > index else None
        fixed = constant_array(value)
        plan.append((value if value is not None and fixed is None else None, fixed))
    fetched = tuple(value for value, _ in plan if value is not None)

    def arrays(computed: tuple[np.ndarray, ...]) -> list[np.ndarray | None]:
        given = iter(computed)
        return [next(given) if value is not None else fixed for value, fixed in plan]

    return fetched, arrays


def _sequence_rows(node: ir.Node, layout: Layout) -> Activation:
    """W multiplies every step of the input sequence that runs (both directions read the same X)."""
    fetched, operands = _operands(node, (4,))  # sequence_lens
    if not fetched and operands(())[0] is None:  # every step runs: X's rows, as any other reader's
        return _input_rows(0)(node, layout)
    batch_first = node.attributes.get_int("layout", 0) == 1

    def rows(x: np.ndarray, *computed: np.ndarray) -> np.ndarray:
        return sequence_rows(x, *operands(computed), batch_first)

    return Activation((node.inputs[0], *fetched), f"sequence:{int(batch_first)}", rows)


def _hidden_rows(node: ir.Node, layout: Layout) -> Activation | str:
    """R multiplies each step's previous hidden state: initial_h (zero when absent) at a sequence's
    first step, else the node's own output Y one step before (after, in the reverse direction).
    A bidirectional layer's directions are two groups (R[d] sees direction d's states)."""
    if op_name(node) == "GRU" and not node.attributes.get_int("linear_before_reset", 0):
        return ("recurrent weight R of a GRU with linear_before_reset=0: its candidate gate multiplies "
                "r ⊙ h, which the graph does not output")
    hidden = node.outputs[0] if node.outputs else None
    if hidden is None or not hidden.name:
        return "recurrent weight R: the layer does not output its hidden states Y"
    reversed_ = _REVERSED.get(node.attributes.get_string("direction", "forward"))
    if reversed_ is None:
        return f"recurrent layer with direction {node.attributes.get_string('direction')!r}"
    batch_first = node.attributes.get_int("layout", 0) == 1
    fetched, operands = _operands(node, (5, 4))  # initial_h, sequence_lens

    def rows(y: np.ndarray, *computed: np.ndarray) -> np.ndarray:
        initial, lengths = operands(computed)
        return previous_states(y, initial, lengths, reversed_, batch_first)

    return Activation((hidden, *fetched), f"previous_hidden:{int(batch_first)}:{reversed_}", rows)


# ------------------------------------------------------------------ onnxruntime contrib ops


def _fused_matmul_layout(node: ir.Node, shape) -> Layout | str:
    if node.attributes.get_int("transBatchA", 0) or node.attributes.get_int("transBatchB", 0):
        return "FusedMatMul with transBatchA/transBatchB"
    return _matrix("nk" if node.attributes.get_int("transB", 0) else "kn")(node, shape)


def _fused_matmul_rows(node: ir.Node, layout: Layout) -> Activation:
    return _input_rows(0, transpose_last=bool(node.attributes.get_int("transA", 0)))(node, layout)


# ------------------------------------------------------------------ integer ops (own zero point)


def _zero_point_step(zero_point_input: int, axis: int):
    """The weight as the integer op reads it, minus its zero point (per tensor, or per output
    channel along `axis`); written back as codes, a zeroed weight is the zero point."""
    def step(node: ir.Node, shape, dtype) -> Step | str:
        given = len(node.inputs) > zero_point_input and node.inputs[zero_point_input] is not None
        zero_point = constant_array(node.inputs[zero_point_input]) if given else np.zeros((), dtype)
        if zero_point is None:
            return "the weight's zero point is computed"
        zero = zero_point.astype(np.float64).reshape(() if zero_point.size == 1 else
                                                    [-1 if i == axis % len(shape) else 1 for i in range(len(shape))])
        return Step("zero_point", node, ("zero_point", zero_point.tobytes()), shape, np.dtype(np.float32),
                    lambda x: (x.astype(np.float64) - zero).astype(np.float32), lambda y: to_dtype(y + zero, dtype))
    return step


def _integer_rows(zero_point_input: int, rows_of: Callable[[ir.Node, Layout], Activation | str]):
    """The activation of an integer op, with its zero point subtracted (its scale is one factor
    for all of K, which no method's choice depends on)."""
    def activation(node: ir.Node, layout: Layout) -> Activation | str:
        inner = rows_of(node, layout)
        if isinstance(inner, str):
            return inner
        given = len(node.inputs) > zero_point_input and node.inputs[zero_point_input] is not None
        zero_point = constant_array(node.inputs[zero_point_input]) if given else np.zeros(())
        if zero_point is None or zero_point.size != 1:
            return "the activation's zero point is computed or not per tensor"
        offset = float(zero_point.reshape(()))
        return Activation(inner.values, f"{inner.form}-{offset}", lambda x: inner.rows(x.astype(np.float32) - offset))
    return activation


def _nbits_step(node: ir.Node, shape, dtype) -> Step | str:
    """MatMulNBits' packed codes as the float W [N, K] it multiplies; written back, every block is
    re-quantized on its own scale and zero point, so a zeroed weight is its block's zero point."""
    blocks = nbits_blocks(node)
    if isinstance(blocks, str):
        return f"MatMulNBits: {blocks}"
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return "MatMulNBits with g_idx (act-order): blocks are not contiguous in K"
    if blocks.scale is None or not np.issubdtype(blocks.zero_point.dtype, np.integer):
        return "MatMulNBits with computed scales or float zero points"
    n, k, zero = blocks.n, blocks.k, blocks.zero_point[:, :, None]
    scale = blocks.scale[:, :, None].astype(np.float64)
    top = (1 << blocks.bits) - 1

    def forward(packed: np.ndarray) -> np.ndarray:
        return ((blocks.unpack(packed) - zero) * scale).reshape(n, -1)[:, :k].astype(blocks.scale.dtype)

    def inverse(weight: np.ndarray) -> np.ndarray:
        padded = np.zeros((n, blocks.blocks * blocks.block))
        padded[:, :k] = weight
        safe = np.where(scale == 0, 1.0, scale)
        codes = np.where(scale == 0, zero, np.rint(padded.reshape(n, blocks.blocks, -1) / safe) + zero)
        return blocks.pack(np.clip(codes, 0, top)).reshape(shape)

    key = ("MatMulNBits", blocks.bits, blocks.block, n, k, *(v.name if v is not None else "" for v in node.inputs[2:4]))
    return Step("MatMulNBits", node, key, (n, k), blocks.scale.dtype, forward, inverse)


# Measured on silero VAD 16k (benchmarks/silero_running_state.py, 50%, a 64 s stream in which each
# model carries its own state): pruning R as well as the rest multiplies the state's relative error
# by 2.8-6x (wanda 0.22 -> 0.92, sparsegpt 0.08 -> 0.48, mama 0.09 -> 0.25) for 32,768 more zeros.
_FEEDBACK = ("recurrent weight R: its error feeds back through the hidden state at every step and "
             "every call of a stream (--include it to prune it)")

RULES = [
    WeightRule("MatMul", 1, _matrix("kn"), _input_rows(0), bias_after=True),
    WeightRule("MatMul", 0, _matmul_left_layout, _input_rows(1, transpose_last=True)),  # Y = W @ X
    WeightRule("Gemm", 1, _gemm_b_layout, _gemm_x_for_b, bias_input=2),
    WeightRule("Gemm", 0, _gemm_a_layout, _gemm_x_for_a),
    WeightRule("Conv", 1, _conv_layout("conv"), _patches(conv_rows), bias_input=2),
    WeightRule("ConvTranspose", 1, _conv_layout("convT"), _patches(conv_transpose_rows), bias_input=2),
    WeightRule("Einsum", 0, _einsum_layout(0), _einsum_activation(0)),
    WeightRule("Einsum", 1, _einsum_layout(1), _einsum_activation(1)),
    *(WeightRule(op, 1, _recurrent_layout, _sequence_rows) for op in ("LSTM", "GRU", "RNN")),
    *(WeightRule(op, 2, _recurrent_layout, _hidden_rows, default_reason=_FEEDBACK) for op in ("LSTM", "GRU", "RNN")),
    # onnxruntime's fused self-attention: one packed [hidden, q+k+v] weight, bias [q+k+v]
    WeightRule("com.microsoft.Attention", 1, _matrix("kn"), _input_rows(0), bias_input=2),
    WeightRule("com.microsoft.FusedMatMul", 1, _fused_matmul_layout, _fused_matmul_rows, bias_after=True),
    WeightRule("MatMulInteger", 1, _matrix("kn"), _integer_rows(2, _input_rows(0)),
               operand_step=_zero_point_step(3, axis=1)),
    WeightRule("ConvInteger", 1, _conv_layout("conv"), _refused("calibration of ConvInteger is not supported"),
               operand_step=_zero_point_step(3, axis=0)),
    # 4-bit (2/8-bit) blockwise LLM weights: W [N, K] decoded and re-encoded by the operand step
    WeightRule("com.microsoft.MatMulNBits", 1, _matrix("nk"), _input_rows(0), bias_input=5, operand_step=_nbits_step),
    # weights held in forms no pass can rewrite yet: listed, with the reason
    WeightRule("QLinearMatMul", 3, _refused("QLinearMatMul weight: requantized ops are not pruned"), _refused("")),
    WeightRule("QLinearConv", 3, _refused("QLinearConv weight: requantized ops are not pruned"), _refused("")),
    WeightRule("com.microsoft.QAttention", 1, _refused("QAttention weight: quantized attention is not pruned"),
               _refused("")),
    *(WeightRule(f"com.microsoft.DynamicQuantize{op}", index, _refused(
        f"DynamicQuantize{op} weight: quantized recurrent layers are not pruned"), _refused(""))
      for op in ("LSTM",) for index in (1, 2)),
]
_BY_USE = {(rule.op, rule.weight_input): rule for rule in RULES}
