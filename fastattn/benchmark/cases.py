"""What gets measured: benchmark cases, the presets that generate them, and the FLOP / byte conventions.

A Case is one problem size in one mode. Shapes follow FlashAttention's benchmark: a fixed number of tokens per
batch (batch = tokens // seqlen) and a fixed model width (heads = width // head_dim), so every point of a
sequence-length sweep does comparable work per token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

MODES = ("fwd", "bwd", "fwd_bwd", "decode")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PAD_FRACTION = 0.25  # the padding cases pad ~25% of the tokens


@dataclass(frozen=True)
class Case:
    mode: str            # fwd | bwd | fwd_bwd | decode
    dtype: str           # fp16 | bf16 | fp32
    batch: int
    heads: int           # query heads
    heads_kv: int        # key/value heads (< heads: GQA)
    seqlen_q: int        # 1 for decode
    seqlen_k: int        # the KV cache length for decode
    head_dim: int
    causal: bool = False
    padding: bool = False  # key padding: sequence b keeps lengths()[b] tokens, the rest are padding
    bshd: bool = False     # q, k, v, dout in (B, S, H, D) memory viewed as (B, H, S, D), as transformers passes them

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gqa(self) -> bool:
        return self.heads_kv != self.heads

    @property
    def kind(self) -> str:
        """The sweep this case belongs to (everything but the sequence length and batch)."""
        parts = [self.mode, self.dtype, f"hd{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.padding:
            parts.append("pad")
        if self.gqa:
            parts.append(f"gqa{self.heads}/{self.heads_kv}")
        if self.bshd:
            parts.append("bshd")
        return " ".join(parts)

    @property
    def label(self) -> str:
        s = f"S={self.seqlen_k}" if self.mode == "decode" else f"S={self.seqlen_q}"
        return f"{self.kind} B={self.batch} H={self.heads} {s}"

    def lengths(self) -> List[int]:
        """Valid tokens per sequence. Padding cases spread them linearly from 50% to 100% (mean 75%)."""
        if not self.padding:
            return [self.seqlen_k] * self.batch
        S, B = self.seqlen_k, self.batch
        if B == 1:
            return [max(1, round(S * (1 - PAD_FRACTION)))]
        return [max(1, round(S * (0.5 + 0.5 * b / (B - 1)))) for b in range(B)]

    def small(self) -> "Case":
        """The same kind of case at a size where a float64 reference is cheap (odd length on purpose)."""
        sq = 1 if self.mode == "decode" else 97
        return dataclasses.replace(self, batch=2 if self.padding else 1, heads=4 if self.gqa else 2,
                                   heads_kv=1 if self.gqa else 2, seqlen_q=sq, seqlen_k=97)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(kind=self.kind, flops=flops(self), bytes_kv=kv_bytes(self))
        return d


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool,
                    mode: str = "fwd") -> float:
    """FlashAttention's convention: forward 4·B·H·Sq·Sk·D (two matmuls, 2 FLOPs per multiply-add; softmax not
    counted), halved for causal when Sq == Sk; backward 2.5x forward; forward+backward 3.5x."""
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal and seqlen_q == seqlen_k:
        f /= 2
    return f * {"fwd": 1.0, "decode": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def flops(c: Case) -> float:
    """Useful FLOPs of a case. Padding cases count only the valid tokens (sum of L_b^2), so a kernel that skips
    padding (varlen) and one that computes it (a mask) are credited the same useful work."""
    if c.padding:
        return sum(attention_flops(1, c.heads, L, L, c.head_dim, c.causal, c.mode) for L in c.lengths())
    return attention_flops(c.batch, c.heads, c.seqlen_q, c.seqlen_k, c.head_dim, c.causal, c.mode)


def kv_bytes(c: Case) -> int:
    """Bytes of K and V read once: the memory floor of decode (2·B·Hkv·Sk·D·bytes per element)."""
    return 2 * c.batch * c.heads_kv * c.seqlen_k * c.head_dim * torch.empty(0, dtype=c.torch_dtype).element_size()


# ----------------------------------------------------------------------------------------------------- presets
@dataclass
class Preset:
    seqlens: List[int]
    headdims: List[int]
    dtypes: List[str]
    modes: List[str]                      # of fwd, bwd, fwd_bwd (the sweeps); decode is driven by decode_lens
    tokens: int                           # batch * seqlen per point of a sweep
    width: int                            # heads * head_dim
    causal: Tuple[bool, ...] = (False, True)
    extra_seqlens: List[int] = field(default_factory=list)  # where the padding, GQA and layout variants run
    # heads * head_dim of the layout variants (Case.bshd: one sequence, non-causal, a model's width so that rows lie
    # as far apart as in one: 4 KB of fp32 at 1024); None: no layout variants.
    bshd_width: Optional[int] = None
    decode_lens: List[int] = field(default_factory=list)
    decode_shape: Tuple[int, int, int, int] = (1, 16, 4, 128)  # batch, heads, heads_kv, head_dim
    gqa_group: int = 4
    target_s: float = 0.3                 # CPU: seconds of timed repeats per measurement
    model: bool = False                   # run the model-level benchmark too
    train_seqlens: Optional[List[int]] = None   # bwd / fwd_bwd sweeps (None: seqlens)
    train_headdims: Optional[List[int]] = None  # bwd / fwd_bwd head dims (None: headdims)
    max_seconds: Optional[float] = None   # default measurement budget (--max-seconds overrides; 0 = none)
    # Implementations this preset leaves out unless --backends names them: {name: reason} (listed in the report).
    skip: Dict[str, str] = field(default_factory=dict)
    # An explicit case list in order of importance, run in that order (not cheapest first), so a run cut short
    # keeps the cases that matter most; the sweep fields above are then only the record of what it spans.
    cases: Optional[List[Case]] = None


def sweep_case(p: Preset, mode: str, dtype: str, S: int, D: int, causal: bool, padding=False, gqa=False) -> Case:
    heads = max(1, p.width // D)
    heads_kv = max(1, heads // p.gqa_group) if gqa else heads
    if gqa and heads % heads_kv:
        heads_kv = heads
    return Case(mode=mode, dtype=dtype, batch=max(1, p.tokens // S), heads=heads, heads_kv=heads_kv,
                seqlen_q=S, seqlen_k=S, head_dim=D, causal=causal, padding=padding)


_CPU_QUICK_SKIP = {
    "flex": "left out of the CPU quick preset: compiling flex_attention for CPU takes 10-30 s per variant here "
            "(run --preset full, or name it: --backends flex)",
    "fastattn.sdpa": "left out of the CPU quick preset: the same kernel as sdpa.flash, chosen by PyTorch "
                     "(run --preset full, or name it: --backends fastattn.sdpa)",
}


_GPU_FIRST_SKIP = {
    "flex": "left out of the gpu-first preset: a cold flex_attention compile takes 10-30 s per variant, most of "
            "a first run's budget (name it: --backends flex)",
    "fastattn.sdpa": "left out of the gpu-first preset: the kernel PyTorch picks among the sdpa.* rows "
                     "(name it: --backends fastattn.sdpa)",
    "fastattn.reference": "left out of the gpu-first preset: the same computation as sdpa.math "
                          "(name it: --backends naive)",
}


def _gpu_first() -> Preset:
    """The first GPU session's cases (benchmarks/device_run.sh), most important first: the bf16 headline shapes
    (hd128 at 4k, fwd and fwd+bwd, causal or not, a decode step and a padded BERT batch), then the sweep ends and
    hd64, then fp16, then the middle points. 92 cases; a cold run measures as far as its time allows."""
    p = Preset(seqlens=[1024, 2048, 4096, 8192, 16384], headdims=[128, 64], dtypes=["bf16", "fp16"],
               modes=["fwd", "fwd_bwd"], tokens=16384, width=2048, decode_lens=[4096, 8192, 16384, 32768],
               decode_shape=(8, 32, 8, 128), skip=_GPU_FIRST_SKIP)
    out: List[Case] = []

    def sweep(dtype, D, seqlens):
        out.extend(sweep_case(p, mode, dtype, S, D, causal) for S in seqlens for mode in ("fwd", "fwd_bwd")
                   for causal in (False, True))

    def decode(dtype, lens):
        B, H, Hkv, D = p.decode_shape
        out.extend(Case(mode="decode", dtype=dtype, batch=B, heads=H, heads_kv=Hkv, seqlen_q=1, seqlen_k=S,
                        head_dim=D) for S in lens)

    def bert(dtype, mode):  # BERT-base attention: 12 heads of 64, a padded batch of 32 x 512 (50-100% valid)
        out.append(Case(mode=mode, dtype=dtype, batch=32, heads=12, heads_kv=12, seqlen_q=512, seqlen_k=512,
                        head_dim=64, padding=True))

    sweep("bf16", 128, [4096])
    decode("bf16", [8192])
    bert("bf16", "fwd_bwd")
    sweep("bf16", 128, [1024, 16384])
    sweep("bf16", 64, [4096, 1024, 16384])
    decode("bf16", [32768, 4096])
    bert("bf16", "fwd")
    for D in (128, 64):
        sweep("fp16", D, [4096, 1024, 16384])
    decode("fp16", [8192, 32768, 4096])
    bert("fp16", "fwd_bwd")
    bert("fp16", "fwd")
    for dtype in ("bf16", "fp16"):
        for D in (128, 64):
            sweep(dtype, D, [2048, 8192])
        decode(dtype, [16384])
    p.cases = list(dict.fromkeys(out))
    return p


_TINY = dict(seqlens=[64, 128], headdims=[32], modes=["fwd", "fwd_bwd"], tokens=128, width=64, extra_seqlens=[64],
             decode_lens=[128], decode_shape=(1, 4, 2, 32), gqa_group=2, target_s=0.005)

PRESETS: Dict[str, Dict[str, Preset]] = {
    "cpu": {
        # a smoke test (tests/test_benchmark.py), not a measurement; flex's CPU compiles would take most of it
        "tiny": Preset(dtypes=["fp32"], skip={"flex": _CPU_QUICK_SKIP["flex"].replace("quick", "tiny")}, **_TINY),
        # Sized for 2 busy cores: under 3 minutes at a load average of ~8 (other jobs), with max_seconds as a guard.
        # bf16 too: on CPUs with AMX or AVX512-BF16 it is the fast dtype, and the one a drop-in must not slow down.
        "quick": Preset(seqlens=[128, 512, 1024], headdims=[64, 128], dtypes=["fp32", "bf16"],
                        modes=["fwd", "fwd_bwd"], tokens=1024, width=256, extra_seqlens=[512],
                        decode_lens=[1024, 4096], decode_shape=(1, 16, 4, 128), target_s=0.2, skip=_CPU_QUICK_SKIP,
                        train_seqlens=[128, 512], train_headdims=[64], max_seconds=180, bshd_width=1024),
        "full": Preset(seqlens=[128, 256, 512, 1024, 2048, 4096], headdims=[32, 64, 128, 256],
                       dtypes=["fp32", "bf16"], modes=["fwd", "bwd", "fwd_bwd"], tokens=4096, width=512,
                       extra_seqlens=[512, 2048], decode_lens=[1024, 2048, 4096, 8192], target_s=0.5, model=True,
                       bshd_width=1024),
    },
    "cuda": {
        "tiny": Preset(dtypes=["bf16"], **_TINY),
        "quick": Preset(seqlens=[512, 1024, 2048, 4096, 8192, 16384], headdims=[64, 128], dtypes=["bf16"],
                        modes=["fwd", "fwd_bwd"], tokens=16384, width=2048, extra_seqlens=[4096],
                        decode_lens=[1024, 4096, 16384, 32768], decode_shape=(8, 32, 8, 128), model=True,
                        max_seconds=240),
        "full": Preset(seqlens=[512, 1024, 2048, 4096, 8192, 16384], headdims=[32, 64, 128, 256],
                       dtypes=["bf16", "fp16"], modes=["fwd", "bwd", "fwd_bwd"], tokens=16384, width=2048,
                       extra_seqlens=[2048, 8192], decode_lens=[1024, 2048, 4096, 8192, 16384, 32768],
                       decode_shape=(8, 32, 8, 128), model=True),
        "gpu-first": _gpu_first(),
    },
}


def preset_for(name: str, device: str) -> Preset:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if name not in PRESETS[kind]:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS[kind])}")
    return dataclasses.replace(PRESETS[kind][name])


def generate(p: Preset, modes: Optional[List[str]] = None) -> List[Case]:
    """Every case of a preset, per mode: the main sweeps with padding and GQA variants at extra_seqlens (or the
    preset's explicit list, in its order)."""
    if p.cases is not None:
        return [c for c in p.cases if not modes or c.mode in modes]
    modes = list(modes or p.modes + (["decode"] if p.decode_lens else []))
    # Order: forward sweeps, decode, then the training modes, so a run cut short by --max-seconds keeps the most.
    modes.sort(key=lambda m: MODES.index(m) if m != "decode" else 0.5)
    cases: List[Case] = []
    for mode in modes:
        if mode == "decode":
            B, H, Hkv, D = p.decode_shape
            cases += [Case(mode="decode", dtype=dtype, batch=B, heads=H, heads_kv=Hkv, seqlen_q=1, seqlen_k=S,
                           head_dim=D) for dtype in p.dtypes for S in p.decode_lens]
            continue
        train = mode in ("bwd", "fwd_bwd")
        seqlens = (p.train_seqlens or p.seqlens) if train else p.seqlens
        headdims = (p.train_headdims or p.headdims) if train else p.headdims
        extra = [S for S in p.extra_seqlens if S in seqlens] or seqlens[len(seqlens) // 2:][:1]
        for dtype in p.dtypes:
            for D in headdims:
                for causal in p.causal:
                    cases += [sweep_case(p, mode, dtype, S, D, causal) for S in seqlens]
                for S in extra:
                    if False in p.causal:  # padding is a BERT-style (bidirectional) case
                        cases.append(sweep_case(p, mode, dtype, S, D, False, padding=True))
                    if True in p.causal:   # GQA is a decoder-style (causal) case
                        cases.append(sweep_case(p, mode, dtype, S, D, True, gqa=True))
                    if p.bshd_width and False in p.causal:
                        H = max(1, p.bshd_width // D)
                        cases.append(Case(mode=mode, dtype=dtype, batch=1, heads=H, heads_kv=H, seqlen_q=S,
                                          seqlen_k=S, head_dim=D, bshd=True))
    return list(dict.fromkeys(cases))
