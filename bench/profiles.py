"""Parameter profiles: lists of tensor shapes that look like real models, plus synthetic ones.

A profile builds `Case`s: one list of parameter shapes at one dtype. No torchvision or
transformers dependency: the shapes are written out by hand from the architectures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

M = 1_000_000


@dataclass
class Case:
    name: str                       # unique, e.g. "resnet50/fp32"
    profile: str                    # the profile it belongs to, e.g. "resnet50"
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    note: str = ""
    # for the size sweep: x coordinate of the plots
    sweep_size: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


# -- model shapes ---------------------------------------------------------------------------
def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's resnet50 (25,557,032 parameters), in
    `model.parameters()` order: conv weights (no bias), BatchNorm weight and bias, fc."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (out, planes, 1, 1), (out,), (out,)]
            if b == 0:  # downsample: 1x1 conv + BatchNorm
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(num_classes, 2048), (num_classes,)]
    return shapes


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257,
                n_ctx: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2's parameter tensors (HF GPT2LMHeadModel, lm_head tied to wte): with the defaults,
    GPT-2 small, 148 tensors, 124,439,808 parameters."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,),                       # ln_1
                   (d, 3 * d), (3 * d,),             # attn.c_attn
                   (d, d), (d,),                     # attn.c_proj
                   (d,), (d,),                       # ln_2
                   (d, 4 * d), (4 * d,),             # mlp.c_fc
                   (4 * d, d), (d,)]                 # mlp.c_proj
    shapes += [(d,), (d,)]                           # ln_f
    return shapes


def _fmt(n: int) -> str:
    if n >= 1_000_000_000 and n % 1_000_000_000 == 0:
        return f"{n // 1_000_000_000}B"
    if n >= M and n % M == 0:
        return f"{n // M}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}K"
    return str(n)


# -- profiles -------------------------------------------------------------------------------
# Each builder: (device_type, quick) -> list[Case]
def huge(device_type: str, quick: bool) -> list[Case]:
    if device_type == "cuda":
        n, each = (4, 64 * M) if quick else (4, 256 * M)
    else:
        n, each = (2, 8 * M) if quick else (4, 16 * M)
    shapes = [(each,)] * n
    note = f"{n} tensors of {_fmt(each)} elements"
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    if device_type != "cuda":  # bf16 is covered by resnet50/gpt2; keeps the CPU run short
        dtypes = dtypes[:1]
    return [Case(f"huge/{dt}", "huge", shapes, dtype, note) for dt, dtype in dtypes]


def resnet50(device_type: str, quick: bool) -> list[Case]:
    shapes = resnet50_shapes()
    note = "torchvision resnet50 parameter shapes (161 tensors, 25.6M)"
    dtypes = (("fp32", torch.float32),) if quick else (("fp32", torch.float32),
                                                        ("bf16", torch.bfloat16))
    return [Case(f"resnet50/{dt}", "resnet50", shapes, dtype, note) for dt, dtype in dtypes]


def gpt2(device_type: str, quick: bool) -> list[Case]:
    if device_type == "cuda" and not quick:
        kw, note = {}, "GPT-2 small (148 tensors, 124M, wte tied)"
    elif device_type == "cuda" or not quick:
        kw, note = dict(d=384), "GPT-2 small layout scaled to d_model=384 (148 tensors)"
    else:
        kw, note = dict(n_layer=6, d=256, vocab=16384, n_ctx=512), \
            "GPT-2 layout scaled to 6 layers, d_model=256, vocab 16384 (76 tensors)"
    shapes = gpt2_shapes(**kw)
    return [Case(f"gpt2/{dt}", "gpt2", shapes, dtype, note)
            for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))]


# Steady state: with eps = 0.5, beta1 <= 0.5, so every b <= 2^-25 after 25 steps (a few
# seconds of warm-up for ResNet-50 on 2 CPU cores) and the step elides b (docs/design.md).
STEADY = {"adai_options": {"eps": 0.5}, "warmup": 26, "steady": True}


def steady(device_type: str, quick: bool) -> list[Case]:
    shapes = resnet50_shapes()
    note = ("resnet50 shapes at steady state: our Adai with eps 0.5 and 26 warm-up steps, "
            "every beta1_prod done")
    dtypes = (("fp32", torch.float32),) if quick else (("fp32", torch.float32),
                                                        ("bf16", torch.bfloat16))
    return [Case(f"resnet50-steady/{dt}", "steady", shapes, dtype, note, meta=dict(STEADY))
            for dt, dtype in dtypes]


def clip(device_type: str, quick: bool) -> list[Case]:
    """Every contender clips the gradient norm to 1: ours inside the step (max_grad_norm),
    the others with clip_grad_norm_ first."""
    note = ("resnet50 shapes at steady state, gradient norm clipped to 1 (ours: max_grad_norm; "
            "the others: clip_grad_norm_ + step)")
    return [Case("resnet50-steady-clip/fp32", "clip", resnet50_shapes(), torch.float32, note,
                 meta={**STEADY, "clip": 1.0})]


def mixed(device_type: str, quick: bool) -> list[Case]:
    """bf16 parameters with our two mixed-precision options (the others run plain bf16)."""
    shapes = resnet50_shapes()
    runs = (("bf16-master", {"master_weights": True}, "fp32 master weights"),
            ("bf16-sr", {"stochastic_rounding": True}, "stochastic rounding"))
    return [Case(f"resnet50/{name}", "mixed", shapes, torch.bfloat16,
                 f"resnet50 shapes, bf16 parameters, ours with {what}",
                 meta={"adai_options": options}) for name, options, what in runs]


def tiny(device_type: str, quick: bool) -> list[Case]:
    n = 1000
    shapes = [(4096,)] * n
    return [Case("tiny/fp32", "tiny", shapes, torch.float32, f"{n} tensors of 4096 elements")]


def sweep(device_type: str, quick: bool) -> list[Case]:
    if device_type == "cuda":
        sizes = [M, 4 * M, 16 * M, 64 * M] if quick else \
            [M, 4 * M, 16 * M, 64 * M, 256 * M, 1024 * M]
    else:
        sizes = [M, 4 * M, 16 * M] if quick else [M, 2 * M, 5 * M, 10 * M, 20 * M, 50 * M]
    return [Case(f"sweep/fp32/{_fmt(n)}", "sweep", [(n,)], torch.float32,
                 f"one tensor of {_fmt(n)} elements", sweep_size=n) for n in sizes]


def micro(device_type: str, quick: bool) -> list[Case]:
    """A minuscule profile for the smoke test (not part of the default list)."""
    return [Case("micro/fp32", "micro", [(1000,), (10, 10), (7,)], torch.float32, "3 tensors"),
            Case("micro/bf16", "micro", [(1000,), (33,)], torch.bfloat16, "2 tensors"),
            Case("micro-sweep/fp32/1K", "micro-sweep", [(1000,)], torch.float32, "1K",
                 sweep_size=1000),
            Case("micro-sweep/fp32/4K", "micro-sweep", [(4000,)], torch.float32, "4K",
                 sweep_size=4000)]


def micro_steady(device_type: str, quick: bool) -> list[Case]:
    """The smoke test's steady-state and clipped cases (not part of the default list)."""
    shapes = [(1000,), (10, 10), (7,)]
    return [Case("micro-steady/fp32", "micro-steady", shapes, torch.float32, "3 tensors",
                 meta=dict(STEADY)),
            Case("micro-steady-clip/fp32", "micro-steady", shapes, torch.float32, "3 tensors",
                 meta={**STEADY, "clip": 1.0})]


PROFILES = {"huge": huge, "resnet50": resnet50, "steady": steady, "clip": clip,
            "mixed": mixed, "gpt2": gpt2, "tiny": tiny, "sweep": sweep, "micro": micro,
            "micro-steady": micro_steady}
DEFAULT_PROFILES = ("resnet50", "steady", "clip", "mixed", "huge", "gpt2", "tiny", "sweep")


def build(names, device_type: str, quick: bool) -> list[Case]:
    cases: list[Case] = []
    for name in names:
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")
        cases += PROFILES[name](device_type, quick)
    return cases
