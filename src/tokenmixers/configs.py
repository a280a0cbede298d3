"""The model zoo as data: typed configs of every built-in model, importable without torch.

A unified model is a :class:`ModelCfg`, a frozen dataclass holding every architecture argument of
:class:`tokenmixers.UnifiedNet` (timm's ``ByoModelCfg`` style). A :class:`Family` is one mixer's
configs at the four scales. The published architectures that do not fit the unified backbone have
their own configs (:class:`DWNetCfg`, :class:`STViTCfg`), listed in :data:`PUBLISHED`.
:mod:`tokenmixers.zoo` registers everything here in timm; this module imports nothing heavy, so the
command line lists the zoo instantly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

SCALES = ("micro", "tiny", "small", "base")
# the mixers that ship with tokenmixers (their modules register them; listed here so that the command line
# can name them without importing torch)
BUILTIN_MIXERS = (
    "dcnv3", "dwconv", "dyn_dwconv", "focal", "gated_cnn", "halo", "idyn_dwconv", "pool", "sra", "ss2d", "stvit",
    "swin", "twins",
)
BLOCK_STYLES = ("transformer", "convnext")
POS_EMBEDS = (None, "absolute", "conv")


def _tuple(value: Any) -> Any:
    """Lists (e.g. from JSON or YAML) to tuples, so configs compare and hash by value."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class ArchCfg:
    """What every typed architecture config offers: ``replace`` and ``to_dict``."""

    def _tuples(self, *names: str) -> None:
        """Store list-valued fields as tuples (frozen configs compare and hash by value)."""
        for name in names:
            object.__setattr__(self, name, _tuple(getattr(self, name)))

    def _check_stages(self, *names: str) -> None:
        """``dims`` and the named per-stage fields must have one entry per stage."""
        n = len(self.depths)  # type: ignore[attr-defined]
        if len(self.dims) != n:  # type: ignore[attr-defined]
            raise ValueError(f"depths has {n} stages but dims has {len(self.dims)}")  # type: ignore[attr-defined]
        for name in names:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but the model has {n} stages")

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed; unknown fields raise a ``ValueError`` naming the known ones."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(
                f"unknown model argument(s) {', '.join(map(repr, unknown))}; "
                f"architecture arguments: {', '.join(f.name for f in dataclasses.fields(self))}"  # type: ignore[arg-type]
            )
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable fields (tuples become lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelCfg(ArchCfg):
    """Every architecture argument of a unified model.

    Args:
        mixer: registered mixer name (``tokenmixers.list_mixers()``).
        depths: blocks per stage.
        dims: channels per stage.
        heads: attention heads (DCNv3: groups) per stage; ``None``: ``dim // 32``.
        mixer_args: options passed to every mixer.
        stage_mixer_args: per-stage mixer options, one mapping per stage (e.g. PVT's ``sr_ratio``).
        mlp_ratios: MLP hidden ratio, one value or one per stage.
        norm_eps: eps of the block LayerNorms.
        pos_embed: ``"absolute"`` (a learned embedding, PVT) or ``"conv"`` (``x + dwconv3x3(x)``,
            Twins/STViT) before the block(s) named by ``pos_embed_blocks``; ``None``: none.
        pos_embed_blocks: index of the block in each stage that gets the position encoding, or
            ``"all"`` (PVT: 0; Twins: 1, i.e. after the first block; STViT: all).
        pos_embed_residual: the position encoding is added to the block's input, so it also flows
            through the residual path (classification); ``False``: only to the mixer's input (the
            official PVT detection backbone).
        layer_scale_init: initial layer-scale value (``0``/``None`` disables layer scale).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        head_hidden_ratio: width of the head's 1x1 projection relative to the last stage (``0``:
            no projection, BatchNorm and GELU).
        norm_after_pool: LayerNorm after global pooling (Table VI, B).
        stage_norms: LayerNorm after each stage (``False``: Table VI, C).
        block_style: ``"transformer"`` or ``"convnext"`` (Table VI, D).
    """

    mixer: str
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    heads: Optional[tuple[int, ...]] = None
    mixer_args: Mapping[str, Any] = field(default_factory=dict)
    stage_mixer_args: Optional[tuple[Mapping[str, Any], ...]] = None
    mlp_ratios: Union[float, tuple[float, ...]] = 4.0
    norm_eps: float = 1e-5
    pos_embed: Optional[str] = None
    pos_embed_blocks: Union[int, str] = 0
    pos_embed_residual: bool = True
    layer_scale_init: Optional[float] = 1e-6
    drop_path_rate: float = 0.0
    head_hidden_ratio: float = 1.5
    norm_after_pool: bool = False
    stage_norms: bool = True
    block_style: str = "transformer"

    def __post_init__(self) -> None:
        self._tuples("depths", "dims", "heads", "stage_mixer_args", "mlp_ratios")
        object.__setattr__(self, "mixer_args", dict(self.mixer_args))
        self._check_stages("heads", "stage_mixer_args", "mlp_ratios")
        if self.block_style not in BLOCK_STYLES:
            raise ValueError(f"unknown block_style {self.block_style!r}; accepted: {', '.join(BLOCK_STYLES)}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; accepted: {', '.join(map(repr, POS_EMBEDS))}")
        if not (self.pos_embed_blocks == "all" or isinstance(self.pos_embed_blocks, int)):
            raise ValueError(f"pos_embed_blocks must be a block index or 'all', got {self.pos_embed_blocks!r}")


@dataclass(frozen=True)
class Family:
    """One mixer's models at the four scales: ``unified_<name>_<scale>``."""

    name: str
    configs: Mapping[str, ModelCfg]
    source: str = ""
    paper_top1: Mapping[str, float] = field(default_factory=dict)
    recipe: str = "transformer"  # the paper's training recipe for the family: transformer or cnn

    def model_names(self) -> list[str]:
        """The registered names of the family's models."""
        return [f"unified_{self.name}_{scale}" for scale in self.configs]


# The HaloNet / Swin skeleton of the paper (Table IV budgets); the default for new mixers.
SKELETON: dict[str, dict[str, Any]] = {
    "micro": dict(depths=(2, 2, 9, 2), dims=(32, 64, 128, 256), heads=(1, 2, 4, 8), drop_path_rate=0.0),
    "tiny": dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), drop_path_rate=0.5),
}


def family(
    name: str,
    mixer: str,
    scales: Optional[Mapping[str, Mapping[str, Any]]] = None,
    *,
    source: str = "",
    paper_top1: Optional[Mapping[str, float]] = None,
    recipe: str = "transformer",
    **common: Any,
) -> Family:
    """A family from per-scale arguments over arguments common to all scales (default: the skeleton)."""
    if recipe not in ("transformer", "cnn"):
        raise ValueError(f"recipe must be 'transformer' or 'cnn', got {recipe!r}")
    scales = SKELETON if scales is None else scales
    base = ModelCfg(mixer, (1,), (1,))
    configs = {scale: base.replace(**{**common, **args}) for scale, args in scales.items()}
    return Family(name, configs, source, dict(paper_top1 or {}), recipe)


# -- the 20 models of the paper (official depths, widths, heads and drop-path rates) -------------------

_PAPER = "Hu et al., Demystify Transformers & Convolutions in Modern Image Deep Networks (TPAMI 2025)"
_SR = ({"sr_ratio": 8}, {"sr_ratio": 4}, {"sr_ratio": 2}, {"sr_ratio": 1})

PAPER_FAMILIES: tuple[Family, ...] = (
    family(
        "halo", "halo",
        source="HaloNet (Vaswani et al., CVPR 2021), unified in " + _PAPER,
        paper_top1=dict(micro=75.8, tiny=83.0, small=84.0, base=84.6),
        norm_eps=1e-5,
    ),
    family(
        "pvt", "sra",
        {
            "micro": dict(depths=(2, 2, 3, 2), dims=(32, 64, 160, 256), drop_path_rate=0.0),
            "tiny": dict(depths=(3, 4, 9, 3), dims=(64, 128, 320, 512), drop_path_rate=0.1),
            "small": dict(depths=(3, 4, 21, 3), dims=(64, 128, 320, 512), drop_path_rate=0.3),
            "base": dict(depths=(3, 8, 45, 3), dims=(64, 128, 320, 512), drop_path_rate=0.5, mlp_ratios=(4, 4, 4, 4)),
        },
        source="PVT (Wang et al., ICCV 2021), unified in " + _PAPER,
        paper_top1=dict(micro=72.8, tiny=82.1, small=83.2, base=83.4),
        heads=(1, 2, 5, 8),
        mlp_ratios=(8, 8, 4, 4),
        stage_mixer_args=_SR,
        pos_embed="absolute",
        norm_eps=1e-5,
    ),
    family(
        "swin", "swin",
        source="Swin Transformer (Liu et al., ICCV 2021), unified in " + _PAPER,
        paper_top1=dict(micro=74.4, tiny=82.3, small=83.3, base=83.7),
        norm_eps=1e-6,
    ),
    family(
        "convnext", "dwconv",
        {
            "micro": dict(depths=(3, 3, 8, 3), dims=(32, 64, 128, 256), drop_path_rate=0.0),
            "tiny": dict(depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), drop_path_rate=0.1),
            "small": dict(depths=(2, 2, 24, 2), dims=(96, 192, 384, 768), drop_path_rate=0.4),
            "base": dict(depths=(2, 2, 24, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
        },
        source="ConvNeXt (Liu et al., CVPR 2022) / DWNet 7x7 depth-wise conv, unified in " + _PAPER,
        paper_top1=dict(micro=75.1, tiny=82.2, small=83.1, base=83.7),
        recipe="cnn",
        norm_eps=1e-6,
    ),
    family(
        "dcn_v3", "dcnv3",
        {
            "micro": dict(depths=(2, 2, 9, 2), dims=(32, 64, 128, 256), heads=(2, 4, 8, 16), drop_path_rate=0.0),
            "tiny": dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512), heads=(4, 8, 16, 32), drop_path_rate=0.1),
            "small": dict(depths=(4, 4, 21, 4), dims=(80, 160, 320, 640), heads=(5, 10, 20, 40), drop_path_rate=0.3),
            "base": dict(depths=(4, 4, 21, 4), dims=(112, 224, 448, 896), heads=(7, 14, 28, 56), drop_path_rate=0.5),
        },
        source="DCNv3 / InternImage (Wang et al., CVPR 2023), unified in " + _PAPER,
        paper_top1=dict(micro=75.3, tiny=83.3, small=84.1, base=84.5),
        recipe="cnn",
        norm_eps=1e-5,
    ),
)

# The paper's budgets: per scale, the (min, max) of the five models above in parameters and in MACs at 224x224
# (the paper's convention, tokenmixers.costs.count_macs(...)["macs_paper"]). tokenmixers.fit places any mixer
# inside them; tests/test_fit.py measures the five models and checks these numbers.
BUDGETS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "micro": ((4302692, 4454056), (573022304, 651950720)),
    "tiny": ((29933272, 31912360), (4554528512, 5006678400)),
    "small": ((50082280, 54393640), (7327818752, 9402848640)),
    "base": ((91566312, 97465192), (12728361984, 16641126912)),
}

# -- the related systems' mixers at the paper's budgets ------------------------------------------------
# Depths and widths were chosen so that every model lands within +-3% of the DWConv model's
# parameters (4.44M / 31.9M / 54.4M / 95.9M) and +-10% of its MACs at 224 (0.65 / 5.00 / 9.39 /
# 16.62 G, all products counted); `tokenmixers bench 'unified_*'` prints both, the tests assert them.

RELATED_FAMILIES: tuple[Family, ...] = (
    # DWNet's dynamic depth-wise conv. The kernel generator predicts C*49 values from C/r features; with
    # DWNet's r = 4 it alone holds 12.5*C^2 parameters per block (DWNet-T doubles to 51M), so r = 16 here,
    # and depth moves from stage 4 (most parameters, no extra MACs) to stages 1-2 to keep the MACs.
    family(
        "dyn_dwconv", "dyn_dwconv",
        {  # params / MACs vs DWConv: -0.3% / -4.3%, -2.0% / +0.3%, +1.2% / -2.7%, +1.3% / -2.7%
            "micro": dict(depths=(4, 3, 7, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
            "tiny": dict(depths=(2, 4, 8, 1), dims=(96, 192, 384, 768), drop_path_rate=0.1),
            "small": dict(depths=(4, 4, 20, 1), dims=(96, 192, 384, 768), drop_path_rate=0.4),
            "base": dict(depths=(4, 4, 20, 1), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
        },
        source="DWNet dynamic depth-wise conv (Han et al., ICLR 2022), homogeneous",
        recipe="cnn",
        mixer_args={"reduction": 16},
        norm_eps=1e-6,
    ),
    # DWNet's inhomogeneous dynamic depth-wise conv: per-pixel 7x7 kernels, one per group of 16 channels
    # (DWNet uses 32 groups; 16-channel groups, as DCNv3's, fit the micro budget).
    family(
        "idyn_dwconv", "idyn_dwconv",
        {  # +1.6% / -2.1%, +2.4% / +0.8%, -1.0% / -2.3%, -0.7% / -1.9%
            "micro": dict(depths=(3, 3, 7, 3), dims=(32, 64, 128, 256), heads=(2, 4, 8, 16), drop_path_rate=0.0),
            "tiny": dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768), heads=(6, 12, 24, 48), drop_path_rate=0.1),
            "small": dict(depths=(2, 2, 21, 2), dims=(96, 192, 384, 768), heads=(6, 12, 24, 48), drop_path_rate=0.4),
            "base": dict(depths=(2, 2, 21, 2), dims=(128, 256, 512, 1024), heads=(8, 16, 32, 64), drop_path_rate=0.5),
        },
        source="DWNet inhomogeneous dynamic depth-wise conv (Han et al., ICLR 2022)",
        recipe="cnn",
        norm_eps=1e-6,
    ),
    # Twins-SVT: LSA (7x7 windows) on even blocks, GSA (sr 8/4/2/1) on odd blocks, and the conditional
    # position encoding after the first block of each stage; every stage has an even depth.
    family(
        "twins", "twins",
        {  # +2.9% / +0.1%, -0.3% / -4.0%, -1.9% / -4.3%, -1.7% / -4.7%
            "micro": dict(depths=(2, 2, 8, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
            "tiny": dict(depths=(2, 4, 4, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
            "small": dict(depths=(4, 4, 14, 2), dims=(96, 192, 384, 768), drop_path_rate=0.3),
            "base": dict(depths=(4, 4, 14, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
        },
        source="Twins-SVT (Chu et al., NeurIPS 2021)",
        stage_mixer_args=_SR,
        pos_embed="conv",
        pos_embed_blocks=1,
        norm_eps=1e-6,
    ),
    # STViT: super tokens of 8x8 / 4x4 cells in stages 1-2, global attention in stages 3-4, and the
    # convolutional position encoding before every block.
    family(
        "stvit", "stvit",
        {  # -1.1% / +8.3%, +0.7% / +0.3%, -1.7% / +1.6%, -1.5% / +0.3%
            "micro": dict(depths=(2, 2, 9, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
            "tiny": dict(depths=(3, 3, 6, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
            "small": dict(depths=(3, 3, 18, 2), dims=(96, 192, 384, 768), drop_path_rate=0.3),
            "base": dict(depths=(3, 3, 18, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
        },
        source="STViT super-token attention (Huang et al., CVPR 2023)",
        stage_mixer_args=({"cell_size": 8}, {"cell_size": 4}, {"cell_size": 1}, {"cell_size": 1}),
        pos_embed="conv",
        pos_embed_blocks="all",
        norm_eps=1e-6,
    ),
)

# -- mixers published after the paper, placed at its budgets by tokenmixers.fit ---------------------------
# Each started from the paper's Halo/Swin skeleton of the scale; the fitter changed as few knobs as it could
# (depths first, then the mixer's declared options) to land inside the envelope of the paper's five models
# (configs.BUDGETS). The comments say what it changed; tests/test_fit.py runs the fit again and checks them.

AFTER_PAPER_FAMILIES: tuple[Family, ...] = (
    family(
        "pool", "pool",
        {
            "micro": dict(SKELETON["micro"], depths=(4, 4, 9, 4)),  # outer depths +2
            "tiny": dict(SKELETON["tiny"], depths=(2, 2, 13, 2)),  # stage 3: 13
            "small": dict(SKELETON["small"], depths=(5, 5, 18, 5)),  # outer depths +3
            "base": dict(SKELETON["base"], depths=(5, 5, 18, 5)),  # outer depths +3
        },
        source="PoolFormer / MetaFormer baseline (Yu et al., CVPR 2022)",
        recipe="cnn",
        norm_eps=1e-6,
    ),
    family(
        "focal", "focal",
        {
            "micro": dict(SKELETON["micro"], depths=(2, 2, 8, 2), mixer_args={"focal_window": 5}),
            "tiny": SKELETON["tiny"],  # the skeleton is inside
            "small": SKELETON["small"],
            "base": SKELETON["base"],
        },
        source="FocalNet focal modulation (Yang et al., NeurIPS 2022)",
        norm_eps=1e-6,
    ),
    family(
        "ss2d", "ss2d",
        {
            "micro": dict(SKELETON["micro"], depths=(2, 2, 5, 2), mixer_args={"d_state": 1}),
            "tiny": dict(SKELETON["tiny"], mixer_args={"ssm_ratio": 1.0}),
            "small": dict(SKELETON["small"], depths=(2, 2, 11, 2)),
            "base": dict(SKELETON["base"], depths=(2, 2, 12, 2)),
        },
        source="VMamba 2-D selective scan, SS2D (Liu et al., NeurIPS 2024)",
        norm_eps=1e-6,
    ),
    family(
        "gated_cnn", "gated_cnn",
        {
            "micro": dict(SKELETON["micro"], depths=(2, 2, 6, 2), mixer_args={"expansion_ratio": 2.0}),
            "tiny": dict(SKELETON["tiny"], depths=(1, 1, 6, 1)),  # outer depths -1
            "small": dict(SKELETON["small"], depths=(2, 2, 11, 2)),
            "base": dict(SKELETON["base"], depths=(2, 2, 11, 2)),
        },
        source="MambaOut's Gated CNN (Yu & Wang, 2024), the convolutional control of SS2D",
        recipe="cnn",
        norm_eps=1e-6,
    ),
)

FAMILIES: tuple[Family, ...] = PAPER_FAMILIES + RELATED_FAMILIES + AFTER_PAPER_FAMILIES


def _ablations() -> dict[str, tuple[str, ModelCfg]]:
    """The paper's ablation models: name -> (family, config)."""
    small = {f.name: f.configs["small"] for f in PAPER_FAMILIES}
    out = {
        # Table VII (local attention): halo on every second block, a 1-pixel halo, and the query block
        # moved to the top-left corner of its (unchanged) key window.
        "unified_halo_small_switch": ("halo", small["halo"].replace(mixer_args={"halo_every": 2})),
        "unified_halo_small_1px": ("halo", small["halo"].replace(mixer_args={"halo_size": 1})),
        "unified_halo_small_shift": ("halo", small["halo"].replace(mixer_args={"query_offset": 0})),
    }
    # Table VI (architecture): B = LayerNorm after pooling, C = B without stage norms, D = the ConvNeXt
    # block (DWConv then without its 1x1 projections, as in ConvNeXt).
    for name, cfg in small.items():
        base = f"unified_{name}_small"
        d_args = {"mixer_args": {**cfg.mixer_args, "projections": False}} if name == "convnext" else {}
        out[f"{base}_b"] = (name, cfg.replace(norm_after_pool=True))
        out[f"{base}_c"] = (name, cfg.replace(norm_after_pool=True, stage_norms=False))
        out[f"{base}_d"] = (name, cfg.replace(block_style="convnext", **d_args))
    return out


VARIANTS: dict[str, tuple[str, ModelCfg]] = _ablations()


# -- published architectures with their own model files (tokenmixers.models) ---------------------------

SPATIAL_OPS = {"static": "dwconv", "dynamic": "dyn_dwconv", "inhomogeneous": "idyn_dwconv"}


@dataclass(frozen=True)
class DWNetCfg(ArchCfg):
    """DWNet (Han et al., ICLR 2022): the Swin-T/B skeleton with a depth-wise conv branch instead of attention.

    Args:
        depths: blocks per stage.
        dims: channels per stage (patch merging doubles them).
        spatial: the branch's spatial operator: ``"static"`` (7x7 depth-wise conv, mixer ``dwconv``),
            ``"dynamic"`` (per-sample kernels, ``dyn_dwconv``) or ``"inhomogeneous"`` (per-pixel
            kernels, ``idyn_dwconv``).
        group_channels: inhomogeneous only: channels sharing one per-pixel kernel, per stage (the
            official ``INHOMO_HEADS``; 3/6/12/24 for T give 32 kernel groups in every stage).
        kernel_size: spatial kernel size (the official ``WINDOW_SIZE``).
        reduction: width reduction of the dynamic kernel generators.
        mlp_ratio: MLP hidden ratio.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    """

    depths: tuple[int, ...] = (2, 2, 6, 2)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    spatial: str = "static"
    group_channels: Optional[tuple[int, ...]] = None
    kernel_size: int = 7
    reduction: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2

    def __post_init__(self) -> None:
        self._tuples("depths", "dims", "group_channels")
        self._check_stages("group_channels")
        if self.spatial not in SPATIAL_OPS:
            raise ValueError(f"unknown spatial {self.spatial!r}; accepted: {', '.join(SPATIAL_OPS)}")
        if self.spatial == "inhomogeneous" and self.group_channels is None:
            raise ValueError("spatial='inhomogeneous' needs group_channels (channels per kernel group, per stage)")
        if self.group_channels and any(d % g for d, g in zip(self.dims, self.group_channels)):
            raise ValueError(f"group_channels {self.group_channels} must divide dims {self.dims}")

    @property
    def mixer(self) -> str:
        """The registered mixer that computes the spatial operator."""
        return SPATIAL_OPS[self.spatial]


@dataclass(frozen=True)
class STViTCfg(ArchCfg):
    """STViT (Huang et al., CVPR 2023): conv stem, CPE + super-token attention + ConvFFN blocks, conv head.

    Args:
        depths, dims, heads: blocks, channels and attention heads per stage.
        cell_sizes: super-token cell per stage (1: global attention over all tokens).
        n_iter: association rounds.
        layer_scale_init: initial layer scale per stage (0: none).
        head_dim: width of the head's 1x1 projection.
        mlp_ratio: ConvFFN hidden ratio.
        qkv_bias: bias of the attention's qkv projection.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    """

    depths: tuple[int, ...] = (3, 5, 9, 3)
    dims: tuple[int, ...] = (64, 128, 320, 512)
    heads: tuple[int, ...] = (1, 2, 5, 8)
    cell_sizes: tuple[int, ...] = (8, 4, 1, 1)
    n_iter: int = 1
    layer_scale_init: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    head_dim: int = 1024
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        self._tuples("depths", "dims", "heads", "cell_sizes", "layer_scale_init")
        self._check_stages("heads", "cell_sizes", "layer_scale_init")

    @property
    def mixer(self) -> str:
        """The registered mixer of the blocks."""
        return "stvit"


@dataclass(frozen=True)
class Published:
    """A published architecture: its config, where it comes from and what its official weights reach."""

    cfg: Union[DWNetCfg, STViTCfg]
    family: str
    source: str
    top1: Optional[float] = None  # ImageNet-1k top-1 (224) reported for the released weights
    url: str = ""


_DWNET = "DWNet (Han et al., On the Connection between Local Attention and Dynamic Depth-wise Convolution, ICLR 2022)"
_DWNET_URL = "https://github.com/Atten4Vis/DemystifyLocalViT"
_STVIT = "STViT (Huang et al., Vision Transformer with Super Token Sampling, CVPR 2023)"
_STVIT_URL = "https://github.com/hhb072/STViT"
_DW_T = DWNetCfg()
_DW_B = DWNetCfg(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5)

# The official configs and the top-1 of the released checkpoints (the README); the inhomogeneous models
# have a config but no released checkpoint. Drop-path rates are the official training values.
PUBLISHED: dict[str, Published] = {
    "dwnet_tiny": Published(_DW_T, "dwnet", _DWNET, 81.2, _DWNET_URL),
    "dwnet_base": Published(_DW_B, "dwnet", _DWNET, 83.2, _DWNET_URL),
    "dwnet_dynamic_tiny": Published(_DW_T.replace(spatial="dynamic"), "dwnet", _DWNET, 81.8, _DWNET_URL),
    "dwnet_dynamic_base": Published(_DW_B.replace(spatial="dynamic"), "dwnet", _DWNET, 83.2, _DWNET_URL),
    "dwnet_idynamic_tiny": Published(
        _DW_T.replace(spatial="inhomogeneous", group_channels=(3, 6, 12, 24)), "dwnet", _DWNET, None, _DWNET_URL
    ),
    "dwnet_idynamic_base": Published(
        _DW_B.replace(spatial="inhomogeneous", group_channels=(4, 8, 16, 32)), "dwnet", _DWNET, None, _DWNET_URL
    ),
    "stvit_small": Published(STViTCfg(), "stvit", _STVIT, 83.6, _STVIT_URL),
    "stvit_base": Published(
        STViTCfg(depths=(4, 6, 14, 6), dims=(96, 192, 384, 512), heads=(2, 3, 6, 8),
                 layer_scale_init=(0.0, 0.0, 1e-6, 1e-6), drop_path_rate=0.4),
        "stvit", _STVIT, 84.8, _STVIT_URL,
    ),
    "stvit_large": Published(
        STViTCfg(depths=(4, 7, 19, 8), dims=(96, 192, 448, 640), heads=(2, 3, 7, 10),
                 layer_scale_init=(0.0, 0.0, 1e-6, 1e-6), drop_path_rate=0.6),
        "stvit", _STVIT, 85.3, _STVIT_URL,
    ),
}

# timm's own Twins models (Chu et al., NeurIPS 2021) with the official weights: not re-implemented here,
# listed for their reported top-1.
TIMM_TOP1: dict[str, float] = {
    "twins_pcpvt_small": 81.2, "twins_pcpvt_base": 82.7, "twins_pcpvt_large": 83.1,
    "twins_svt_small": 81.7, "twins_svt_base": 83.2, "twins_svt_large": 83.7,
}

AnyCfg = Union[ModelCfg, DWNetCfg, STViTCfg]


def builtin_models() -> dict[str, tuple[str, AnyCfg]]:
    """Every built-in model in zoo order: name -> (family, config)."""
    models: dict[str, tuple[str, AnyCfg]] = {
        n: (f.name, cfg) for f in FAMILIES for n, cfg in zip(f.model_names(), f.configs.values())
    }
    published = {name: (p.family, p.cfg) for name, p in PUBLISHED.items()}
    return {**models, **VARIANTS, **published}

