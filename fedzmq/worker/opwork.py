"""How much slower than the cost model's default some aten calls run, measured: a table, per call and
dtype class, of multipliers for ``cost._Counter``'s count of a call's work.

The default count (``cost``) is one unit (0.5 ns) per element read and ``OUTPUT_WORK`` per element
written, or torch's flop formula for a matmul or convolution. It holds for ordinary elementwise float32
ops, and undercounts calls whose kernels are scalar loops, convert half floats, or do a lot per
element they write: a sweep of every allowlisted op, loss and layer over float16, bfloat16, float32,
float64 and integer dtypes, with reductions over every dim, broadcasting, transposed operands and
value variants (2^22 elements, one torch thread, as a daemon runs; CPU time per thread, the slowest of
two or three runs) found 672 of 1,969 cases slower than predicted, up to 67 times: float16
``binary_cross_entropy`` reduced to one value at 30 ns an element (2^27 elements held a torch thread 8 s
under a 1 s limit), ``argmax`` down a column at 13 ns, ``softmax`` over rows of two at 63 ns, a 1x1
convolution over a million tiny images at 67 ns. With these multipliers, every case of the sweep is
predicted at least 1.25 times its slowest measurement.

A row is ``(aten overload packet, dtype class): (reads, writes, flops)``: the multipliers of the
call's reads (``element_work`` of its operands), of its writes (``OUTPUT_WORK`` per element made, or
per row normalized for ``_softmax`` and ``_log_softmax``) and of its flop formula's work; a call not
listed counts ``(1, 1, 1)``, the default. The comment names the case each row rests on and its
measured seconds. The constants are this machine's (an AVX-512 Xeon); they are conservative, not exact,
and a table keyed by op charges an op's ordinary shapes what its slowest measured shape costs (argmax
along rows runs at 2.5 ns an element and is charged about 8.5).
"""

from __future__ import annotations

from typing import Any

import torch

_ATEN = torch.ops.aten

#: the multipliers of a call not in ``OP_WORK``
DEFAULT_WORK = (1.0, 1.0, 1.0)

OP_WORK: dict[tuple[Any, str], tuple[float, float, float]] = {
    (_ATEN._log_softmax, "f32"): (8, 8, 1),  # log_softmax f32 (1048576, 4) dim=1: 0.0514 s
    (_ATEN._log_softmax, "f64"): (69, 3.5, 1),  # cross_entropy f64 (2097152,2) idx sum label_smoothing=0.1...: 0.2555 s
    (_ATEN._log_softmax, "half"): (10, 10, 1),  # log_softmax bf16 (2097152, 2) dim=0: 0.0296 s
    (_ATEN._softmax, "f32"): (10, 14, 1),  # softmax f32 (2097152, 2) dim=0: 0.0300 s
    (_ATEN._softmax, "f64"): (25, 12, 1),  # softmax f64 (2048, 2048) dim=0: 0.0553 s
    (_ATEN._softmax, "half"): (150, 1, 1),  # softmax f16 (2097152, 2) dim=0: 0.2642 s
    (_ATEN._to_copy, "f32"): (1, 1.5, 1),  # long f32 (4194304,): 0.0173 s
    (_ATEN._to_copy, "half"): (1, 1.5, 1),  # long f16 (4194304,): 0.0162 s
    (_ATEN.addmm, "f32"): (1, 2, 1),  # Linear f32 (1048576,4)->4: 0.0120 s
    (_ATEN.addmm, "f64"): (1, 1.5, 1),  # linear f64 (4194304,1) W(1,1) b: 0.0202 s
    (_ATEN.addmm, "half"): (1, 5, 1),  # linear f16 (4194304,1) W(1,1) b: 0.0583 s
    (_ATEN.add, "f32"): (2, 1, 1),  # add i64+f32 (4194304,) x (4194304,) mixed: 0.0189 s
    (_ATEN.add, "f64"): (5, 1, 1),  # add i8+f64 (4194304,) x (4194304,) mixed: 0.0272 s
    (_ATEN.add, "half"): (1.5, 1, 1),  # add f16 transposed (2048, 2048).t() x contiguous: 0.0646 s
    (_ATEN.add, "int"): (1.5, 1, 1),  # add i64 bcast (2048,1) x (1,2048): 0.0123 s
    (_ATEN.amax, "f32"): (9, 1, 1),  # amax f32 (2097152, 2) dim=0: 0.0139 s
    (_ATEN.amax, "f64"): (13, 1, 1),  # amax f64 (2097152, 2) dim=0: 0.0207 s
    (_ATEN.amax, "half"): (10, 1, 1),  # amax f16 (2097152, 2) dim=0: 0.0167 s
    (_ATEN.amax, "int"): (5, 2, 1),  # amax i64 (2097152, 2) dim=0: 0.0076 s
    (_ATEN.amin, "f32"): (7, 1, 1),  # amin f32 (2097152, 2) dim=0: 0.0111 s
    (_ATEN.amin, "f64"): (13, 1, 1),  # amin f64 (2097152, 2) dim=0: 0.0210 s
    (_ATEN.amin, "half"): (11, 1, 1),  # amin f16 (2097152, 2) dim=0: 0.0175 s
    (_ATEN.amin, "int"): (20, 22, 1),  # amin i64 (524288, 2, 4) dim=1: 0.1806 s
    (_ATEN.argmax, "f32"): (17, 34, 1),  # argmax f32 (2048, 2048) dim=0: 0.0284 s
    (_ATEN.argmax, "f64"): (19, 28, 1),  # argmax f64 (2048, 2048) dim=0: 0.0318 s
    (_ATEN.argmax, "half"): (30, 23, 1),  # argmax bf16 (2048, 2048) dim=0: 0.0499 s
    (_ATEN.argmax, "int"): (20, 24, 1),  # argmax i64 (2048, 2048) dim=0: 0.0326 s
    (_ATEN.argmin, "f32"): (18, 26, 1),  # argmin f32 (524288, 2, 4) dim=1: 0.2016 s
    (_ATEN.argmin, "f64"): (18, 26, 1),  # argmin f64 (524288, 2, 4) dim=1: 0.2030 s
    (_ATEN.argmin, "half"): (39, 19, 1),  # argmin f16 (2048, 2048) dim=0: 0.0643 s
    (_ATEN.argmin, "int"): (19, 21, 1),  # argmin i32 (2048, 2048) dim=0: 0.0320 s
    (_ATEN.bernoulli_, "f32"): (1, 1, 1),
    (_ATEN.bernoulli_, "f64"): (1, 1, 1),
    (_ATEN.bernoulli_, "half"): (1, 1, 1),
    (_ATEN.binary_cross_entropy_with_logits, "f32"): (7, 1, 1),  # binary_cross_entropy_with_logits f32 (20...: 0.0228 s
    (_ATEN.binary_cross_entropy_with_logits, "f64"): (31, 1, 1),  # binary_cross_entropy_with_logits f64 (2...: 0.1033 s
    (_ATEN.binary_cross_entropy_with_logits, "half"): (12, 1, 1),  # binary_cross_entropy_with_logits bf16 ...: 0.0373 s
    (_ATEN.binary_cross_entropy, "f32"): (19, 1, 1),  # binary_cross_entropy f32 (4194304,) mean: 0.0634 s
    (_ATEN.binary_cross_entropy, "f64"): (26, 1, 1),  # binary_cross_entropy f64 (4194304,) mean: 0.0843 s
    (_ATEN.binary_cross_entropy, "half"): (75, 1, 1),  # binary_cross_entropy f16 (4194304,) mean: 0.2502 s
    (_ATEN.bmm, "f32"): (2, 1, 2),  # matmul f32 bmm (2097152,1,2)@(2097152,2,1): 0.0121 s
    (_ATEN.bmm, "f64"): (7, 1, 1.5),  # matmul f64 bmm (4194304,1,1)@(4194304,1,1): 0.0340 s
    (_ATEN.bmm, "half"): (36, 25, 1),  # matmul f16 bmm (4194304,1,1)@(4194304,1,1): 0.4427 s
    (_ATEN.cat, "int"): (1, 5, 1),  # cat i64 1024 x (4096,1) dim=1: 0.0640 s
    (_ATEN.convolution, "f32"): (1, 21, 1),  # Conv1d f32 (1048576,1,4) 1->1 k1 (many): 0.2815 s
    (_ATEN.div, "f32"): (4, 1, 1),  # truediv i64 (4194304,) x (4194304,): 0.0268 s
    (_ATEN.div, "f64"): (5, 1, 1),  # truediv i8+f64 (4194304,) x (4194304,) mixed: 0.0270 s
    (_ATEN.dot, "f64"): (1.5, 1, 1),  # matmul f64 dot (4194304,)@(4194304,): 0.0044 s
    (_ATEN.dot, "half"): (22, 1, 1),  # matmul bf16 dot (4194304,)@(4194304,): 0.0736 s
    (_ATEN.dot, "int"): (2, 1, 1),  # matmul i64 dot (4194304,)@(4194304,): 0.0066 s
    (_ATEN.elu, "f64"): (1, 2, 1),  # ELU f64 (4194304,): 0.0232 s
    (_ATEN.eq, "f64"): (2, 1, 1),  # eq i8+f64 (4194304,) x (4194304,) mixed: 0.0201 s
    (_ATEN.exp, "f32"): (1, 4, 1),  # exp i64 (4194304,): 0.0510 s
    (_ATEN.floor_divide, "f32"): (3, 1, 1),  # floordiv f32 transposed (2048, 2048).t() x contiguous: 0.1378 s
    (_ATEN.floor_divide, "f64"): (10, 2, 1),  # floordiv i8+f64 (4194304,) x (4194304,) mixed: 0.0573 s
    (_ATEN.floor_divide, "half"): (3.5, 1.5, 1),  # floordiv f16 transposed (2048, 2048).t() x contiguous: 0.1597 s
    (_ATEN.floor_divide, "int"): (1.5, 2.5, 1),  # floordiv i64 (4194304,) x (4194304,): 0.0343 s
    (_ATEN.gelu, "f64"): (1, 2.5, 1),  # gelu f64 (4194304,) values=big(x60): 0.0339 s
    (_ATEN.ge, "f64"): (2, 1, 1),  # ge i8+f64 (4194304,) x (4194304,) mixed: 0.0187 s
    (_ATEN.gt, "f64"): (1.5, 1, 1),  # gt i8+f64 (4194304,) x (4194304,) mixed: 0.0176 s
    (_ATEN.index, "f32"): (1, 2.5, 1),  # getitem f32 (4194304,)[randperm int64 index]: 0.0656 s
    (_ATEN.index, "half"): (1, 1.5, 1),  # getitem f16 (4194304,)[randperm int64 index]: 0.0353 s
    (_ATEN.index, "int"): (1, 5, 1),  # getitem i64 (4194304,)[randperm int64 index]: 0.1237 s
    (_ATEN.le, "f64"): (2, 1, 1),  # le i8+f64 (4194304,) x (4194304,) mixed: 0.0194 s
    (_ATEN.log, "f32"): (1, 5, 1),  # log bool (4194304,): 0.0556 s
    (_ATEN.log, "f64"): (1, 5, 1),  # log f64 (4194304,) values=big(x60): 0.0557 s
    (_ATEN.lt, "f64"): (1.5, 1, 1),  # lt i8+f64 (4194304,) x (4194304,) mixed: 0.0171 s
    (_ATEN.max, "f32"): (20, 1, 1),  # max f32 (2048, 2048) dim=0: 0.0324 s
    (_ATEN.max, "f64"): (22, 1, 1),  # max f64 (2048, 2048) dim=0: 0.0359 s
    (_ATEN.max, "half"): (18, 1, 1),  # max bf16 (2048, 2048) dim=0: 0.0302 s
    (_ATEN.max, "int"): (20, 1, 1),  # max i32 (2048, 2048) dim=0: 0.0328 s
    (_ATEN.mean, "f32"): (1.5, 2, 1),  # mean i8 (4194304,) dtype=f32: 0.0021 s
    (_ATEN.mean, "f64"): (11, 2.5, 1),  # mean f32 (2048, 2048) dim=0 dtype=f64: 0.0172 s
    (_ATEN.mean, "half"): (12, 1, 1),  # mean f16 (4194304,) dtype=f64: 0.0196 s
    (_ATEN.min, "f32"): (18, 1, 1),  # min f32 (2048, 2048) dim=0: 0.0298 s
    (_ATEN.min, "f64"): (20, 1, 1),  # min f64 (2048, 2048) dim=0: 0.0335 s
    (_ATEN.min, "half"): (18, 1, 1),  # min bf16 (2048, 2048) dim=0: 0.0290 s
    (_ATEN.min, "int"): (21, 2.5, 1),  # min i64 (2048, 2048) dim=0: 0.0349 s
    (_ATEN.mm, "f32"): (3.5, 1, 1),  # matmul f32 (1,4194304)@(4194304,1): 0.0112 s
    (_ATEN.mm, "f64"): (3.5, 1.5, 1),  # matmul f64 (1,4194304)@(4194304,1): 0.0103 s
    (_ATEN.mm, "half"): (23, 1.5, 1),  # matmul bf16 (1,4194304)@(4194304,1): 0.0758 s
    (_ATEN.mm, "int"): (129, 1, 1),  # matmul i64 (1,4194304)@(4194304,1): 0.4307 s
    (_ATEN.mse_loss, "f32"): (1.5, 1, 1),  # mse_loss f32 (4194304,) sum: 0.0046 s
    (_ATEN.mse_loss, "f64"): (7, 1, 1),  # mse_loss f64 (4194304,) sum: 0.0210 s
    (_ATEN.mse_loss, "half"): (2, 1, 1),  # mse_loss f16 (4194304,) mean: 0.0056 s
    (_ATEN.mul, "f32"): (1.5, 2, 1),  # Dropout f32 (4194304,) train: 0.0509 s
    (_ATEN.mul, "f64"): (15, 1, 1),  # Dropout f64 (4194304,) train: 0.0731 s
    (_ATEN.mul, "half"): (1, 5, 1),  # Dropout bf16 (4194304,) train: 0.0537 s
    (_ATEN.mul, "int"): (1.5, 1.5, 1),  # mul i64 transposed (2048, 2048).t() x contiguous: 0.0578 s
    (_ATEN.mv, "f64"): (1.5, 1, 1),  # matmul f64 mv (2048,2048)@(2048,): 0.0019 s
    (_ATEN.mv, "half"): (1.5, 1, 1),  # matmul f16 mv (2048,2048)@(2048,): 0.0020 s
    (_ATEN.mv, "int"): (3.5, 1, 1),  # matmul i64 mv (2048,2048)@(2048,): 0.0055 s
    (_ATEN.native_batch_norm, "f32"): (1, 3, 1),  # BatchNorm1d f32 (2097152,2) train: 0.0365 s
    (_ATEN.native_group_norm, "f32"): (1, 2.5, 1),  # GroupNorm f32 (2097152,2) groups 1: 0.0577 s
    (_ATEN.native_layer_norm, "f32"): (1, 2, 1),  # LayerNorm f32 (2097152,2) norm 2: 0.0491 s
    (_ATEN.ne, "f64"): (1.5, 1, 1),  # ne i8+f64 (4194304,) x (4194304,) mixed: 0.0174 s
    (_ATEN.nll_loss2d_forward, "f32"): (4, 1, 1),  # nll_loss f32 (1048576, 2, 2) idx target mean: 0.0094 s
    (_ATEN.nll_loss2d_forward, "f64"): (5, 1.5, 1),  # nll_loss f64 (1048576, 2, 2) idx target mean: 0.0102 s
    (_ATEN.nll_loss2d_forward, "half"): (11, 1, 1),  # nll_loss f16 (1048576, 2, 2) idx target mean: 0.0254 s
    (_ATEN.nll_loss_forward, "f32"): (5, 1, 1),  # nll_loss f32 (4194304,1) idx 1 class mean: 0.0142 s
    (_ATEN.nll_loss_forward, "f64"): (4, 1, 1),  # nll_loss f64 (4194304,1) idx 1 class sum: 0.0126 s
    (_ATEN.nll_loss_forward, "half"): (16, 1, 1),  # nll_loss f16 (4194304,1) idx 1 class mean: 0.0521 s
    (_ATEN.pow, "f32"): (5, 1, 1),  # pow i64+f32 i64(4194304,) ** f32 2.5 tensor: 0.0276 s
    (_ATEN.pow, "f64"): (9, 1.5, 1),  # pow f64 (4194304,) ** 2.5: 0.0333 s
    (_ATEN.pow, "half"): (2, 1, 1),  # pow f16 transposed (2048, 2048).t() x contiguous: 0.0840 s
    (_ATEN.remainder, "f32"): (6, 1, 1),  # mod i64+f32 (4194304,) x (4194304,) mixed: 0.0306 s
    (_ATEN.remainder, "f64"): (13, 1.5, 1),  # mod f64 scalar 7 / (4194304,): 0.0375 s
    (_ATEN.remainder, "half"): (3, 1, 1),  # mod f16 transposed (2048, 2048).t() x contiguous: 0.1374 s
    (_ATEN.remainder, "int"): (1, 3, 1),  # mod i64 (4194304,) x scalar 3: 0.0393 s
    (_ATEN.sigmoid, "f32"): (1, 1.5, 1),  # sigmoid i64 (4194304,): 0.0177 s
    (_ATEN.sigmoid, "f64"): (1, 1.5, 1),  # Sigmoid f64 (4194304,): 0.0185 s
    (_ATEN.sqrt, "f32"): (1, 3, 1),  # sqrt f32 (4194304,) values=big(x60): 0.0419 s
    (_ATEN.sqrt, "f64"): (1, 5, 1),  # sqrt f64 (4194304,) values=big(x60): 0.0576 s
    (_ATEN.stack, "int"): (1, 5, 1),  # stack i64 1024 x (4096,) dim=1: 0.0605 s
    (_ATEN.sub, "f32"): (1.5, 1, 1),  # sub i64+f32 (4194304,) x (4194304,) mixed: 0.0184 s
    (_ATEN.sub, "f64"): (18, 1, 1),  # l1_loss f64 (4194304,) none: 0.0857 s
    (_ATEN.sub, "half"): (1.5, 1, 1),  # sub f16 transposed (2048, 2048).t() x contiguous: 0.0612 s
    (_ATEN.sub, "int"): (1.5, 1, 1),  # sub i64 bcast (2048,1) x (1,2048): 0.0126 s
    (_ATEN.sum, "f32"): (2.5, 1.5, 1),  # sum i8 (2048, 2048) dim=0 dtype=f32: 0.0042 s
    (_ATEN.sum, "f64"): (10, 5, 1),  # sum f32 (2048, 2048) dim=0 dtype=f64: 0.0159 s
    (_ATEN.sum, "half"): (13, 1, 1),  # sum f16 (2048, 2048) dim=0 dtype=f64: 0.0210 s
    (_ATEN.sum, "int"): (12, 1.5, 1),  # sum i16 (2097152, 2) dim=0: 0.0194 s
    (_ATEN.tanh, "f32"): (1, 1.5, 1),  # tanh i64 (4194304,): 0.0158 s
    (_ATEN.tanh, "f64"): (1, 2, 1),  # tanh f64 (4194304,) values=nan: 0.0265 s
}


def dtype_classes(operands: list[torch.Tensor], made: list[torch.Tensor]) -> set[str]:
    """The dtype classes of a call's tensors (operands of more than one element, and outputs): ``"half"``
    (float16, bfloat16), ``"f64"``, ``"f32"`` (other floats), ``"int"`` (integers and bools)."""
    tensors = [t for t in operands if t.numel() > 1] + made or operands
    return {_CLASS.get(t.dtype) or ("f32" if t.is_floating_point() else "int") for t in tensors}


_CLASS = {torch.float16: "half", torch.bfloat16: "half", torch.float64: "f64"}


def op_work(op: Any, operands: list[torch.Tensor], made: list[torch.Tensor],
            innermost: bool = False) -> tuple[float, float, float]:
    """The multipliers of a call's reads, writes and flops: for a call over several dtype classes, the
    largest of each (``mod`` of a float16 tensor by a float64 one computes in float64, with float64's
    cost, and was counted at float16's: a red team's ran 8-14 times what it was sized); ``DEFAULT_WORK``
    when none is listed. ``innermost``: a normalization (softmax) over the innermost dim, where half
    floats run as float32 does (0.8 ns an element over rows of 2,048; their row of ``OP_WORK``, 63 ns an
    element, is a strided dim's: it refused an honest float16 softmax over 1,000 logits a row)."""
    classes = dtype_classes(operands, made)
    if innermost and "half" in classes:
        classes = (classes - {"half"}) | {"f32"}
    rows = [OP_WORK[(op, c)] for c in classes if (op, c) in OP_WORK]
    if not rows:
        return DEFAULT_WORK
    if len(rows) == 1:
        return rows[0]
    return (max(r[0] for r in rows), max(r[1] for r in rows), max(r[2] for r in rows))


__all__ = ["DEFAULT_WORK", "OP_WORK", "dtype_classes", "op_work"]
