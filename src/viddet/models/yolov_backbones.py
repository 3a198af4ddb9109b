"""YOLOV++'s transformer backbones (Swin-T, Swin-B, FocalNet-L) built from ``timm`` modules, and the
neck that takes their features, as the official YOLOV code builds them (github.com/YuHengsss/YOLOV,
``exps/yolov++/v++_{SwinTiny,SwinBaseX,FocalLarge}_decoupleReg.py``: ``yolox/models/yolo_pafpn.py``
``YOLOPAFPN_Swin`` / ``YOLOPAFPN_focal`` over ``swin_transfomer.SwinTransformer`` / ``focal.FocalNet``,
the detection versions of both, with a LayerNorm on each of the three outputs, strides 8 / 16 / 32).
Written from those semantics; ``timm`` (an optional dependency: ``pip install "viddet[timm]"``)
provides the layers.

How far timm matches the official modules (checked against the official code at 576 x 576):

* FocalNet-L: timm's ``FocalNet`` stages compute the official features (to float rounding: timm
  runs the official Linear layers as 1 x 1 convolutions). Its keys differ by a rename and a reshape
  (below).
* Swin-B (window 12): timm's ``SwinTransformer`` stages compute the official features, bit for bit on
  the 144 / 72 / 36 grids, to float rounding on the 18 x 18 one. Keys: a rename.
* Swin-T (window 7): timm's ``SwinTransformerBlock`` does not. It shifts the map cyclically *before*
  zero-padding it to a multiple of the window, the official block pads first and shifts the padded
  map, and the shifted-window attention mask (the same in both, built on the padded map) then
  groups different tokens whenever the map is not a multiple of the window: at 576 every Swin-T
  stage (144, 72, 36, 18 vs 7). :class:`PadFirstSwinBlock` is the official block order over timm's
  ``WindowAttention`` and ``Mlp`` (same keys); Swin-T uses it, with timm's patch embedding and
  patch merging.

State dicts keep the official layout (:class:`TimmBody` translates on ``load_state_dict`` and back
on ``state_dict``): a released ``{"model": state_dict}`` loads unchanged and a viddet checkpoint is an
official one. The renames (official -> timm): each stage's patch merging moves from the end of
stage i (``layers.i.downsample``) to the start of stage i + 1; Swin's ``relative_position_index``
buffers (persistent in the official code, recomputed by timm) are read into timm's buffers as the
official model reads them, and written back; FocalNet's ``gamma_1 / gamma_2`` become
``ls1.gamma / ls2.gamma``, its post-norms ``norm1 / norm2`` become ``norm1_post / norm2_post``, and
its Linear weights (out, in) the 1 x 1 conv weights (out, in, 1, 1) of ``modulation.f``,
``modulation.proj``, ``mlp.fc1`` and ``mlp.fc2``.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from viddet.errors import VidDetError
from viddet.models.yolox import PAFPN, BaseConv, CSPLayer

INPUT_SIZE = 576


@dataclass(frozen=True)
class TransformerSpec:
    """One official transformer YOLOV++ model (its exp file's ``get_model``).

    ``embed_dim``, ``depths``, ``num_heads``, ``window``: the backbone (FocalNet: ``window`` is the
    first focal kernel, 4 focal levels); ``neck_out``: the neck's ``out_channels`` (also the head's
    ``in_channels``) before ``width``; ``depth``, ``width``: the neck / head multipliers;
    ``minimal_limit``: the head's; ``drop_path``: the backbone's stochastic depth (training only).
    """
    family: str
    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window: int
    neck_out: Tuple[int, int, int]
    depth: float
    width: float
    minimal_limit: int
    drop_path: float

    @property
    def features(self) -> Tuple[int, int, int]:
        """Channels of the three outputs (stages 1..3)."""
        return tuple(self.embed_dim * 2 ** i for i in (1, 2, 3))


TRANSFORMERS: Dict[str, TransformerSpec] = {
    'swin_tiny': TransformerSpec('swin', 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, (192, 384, 768), 1.0, 1.0, 50, 0.2),
    'swin_base': TransformerSpec('swin', 128, (2, 2, 18, 2), (4, 8, 16, 32), 12, (256, 512, 1024), 1.33, 1.25, 50,
                                 0.2),
    'focal_large': TransformerSpec('focal', 192, (2, 2, 18, 2), (), 3, (384, 768, 1536), 1.0, 1.0, 36, 0.3),
}
"""The official YOLOV++ transformer models: ``v++_SwinTiny_decoupleReg.py``, ``v++_SwinBaseX_decoupleReg.py``
(the neck and head at the X multipliers), ``v++_FocalLarge_decoupleReg.py``."""


def _timm(name: str):
    try:
        import timm.layers
        import timm.models.focalnet
        import timm.models.swin_transformer
    except ImportError:
        raise VidDetError(f'the {name} backbone needs timm: pip install "viddet[timm]"') from None
    return timm


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device=None) -> torch.Tensor:
    """The official shifted-window attention mask of a padded (hp, wp) map: tokens of the nine
    regions cut at ``-window`` and ``-shift`` on each axis do not attend to one another (-100).

    Returns: (number of windows, window², window²), 0 or -100, float32.
    """
    img = torch.zeros(1, hp, wp, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (h, w) in enumerate(itertools.product(cuts, cuts)):
        img[:, h, w, :] = n
    win = img.view(1, hp // window, window, wp // window, window, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, window ** 2)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def pad_first_attention(y: torch.Tensor, attn: nn.Module, window: int, shift: int) -> torch.Tensor:
    """The official shifted-window attention of a normalised map ``y`` (B, H, W, C), any H, W: zero
    padding to a multiple of ``window``, cyclic shift of the padded map by ``shift`` (0: none), ``attn``
    (timm ``WindowAttention``) on the windows with :func:`shifted_window_mask`, the reverse, crop."""
    _, h, w, c = y.shape
    ws, s = window, shift
    y = F.pad(y, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    hp, wp = y.shape[1:3]
    mask = shifted_window_mask(hp, wp, ws, s, y.device) if s else None
    y = torch.roll(y, (-s, -s), (1, 2)) if s else y
    win = y.view(-1, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    y = attn(win, mask=mask).view(-1, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    y = y.reshape(-1, hp, wp, c)
    if s:
        y = torch.roll(y, (s, s), (1, 2))
    return y[:, :h, :w, :]


class PadFirstSwinBlock(nn.Module):
    """A Swin block in the official order (Swin for detection): LayerNorm, :func:`pad_first_attention`
    (padding, then shift), residual; LayerNorm, MLP, residual (stochastic depth ``drop_path`` on both
    in train mode). Layers (keys ``norm1``, ``attn``, ``norm2``, ``mlp``): timm ``WindowAttention`` / ``Mlp``.

    Shapes: (B, H, W, C) -> (B, H, W, C), any H, W.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, drop_path: float = 0.0):
        super().__init__()
        timm = _timm('swin_tiny')
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = timm.models.swin_transformer.WindowAttention(dim, num_heads, window_size=window)
        self.drop_path = timm.layers.DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = timm.layers.Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(pad_first_attention(self.norm1(x), self.attn, self.window, self.shift))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PadFirstSwinStage(nn.Module):
    """timm's stage layout (``downsample`` = timm ``PatchMerging`` at the start, none in stage 0;
    ``blocks``) with :class:`PadFirstSwinBlock` blocks, shift window // 2 on odd blocks. NHWC."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window: int, drop_path):
        super().__init__()
        timm = _timm('swin_tiny')
        self.downsample = timm.models.swin_transformer.PatchMerging(dim, out_dim) if dim != out_dim else nn.Identity()
        self.blocks = nn.Sequential(*[PadFirstSwinBlock(out_dim, num_heads, window, window // 2 if i % 2 else 0,
                                                        drop_path[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def timm_swin_matches(size: int, window: int) -> bool:
    """Whether timm's ``SwinTransformerBlock`` (shift, then pad) computes the official block (pad,
    then shift) on a ``size`` x ``size`` map: on each axis the padding p = (-size) mod window is 0,
    or equals the shift s = window // 2 with p + s >= window, so that the padded rows and the rows
    the shift wraps around fall into the same two mask regions of the last window, swapped (Swin-B
    at 18 x 18, window 12). Otherwise (Swin-T: 144, 72, 36, 18 with window 7) the last window's
    middle mask region holds zero padding in the official block and wrapped-around rows in timm's.
    """
    pad, shift = (-size) % window, window // 2
    return size > window and (pad == 0 or (pad == shift and pad + shift >= window))


def _drop_rates(spec: TransformerSpec):
    rates = torch.linspace(0, spec.drop_path, sum(spec.depths)).tolist()
    return [rates[sum(spec.depths[:i]):sum(spec.depths[:i + 1])] for i in range(len(spec.depths))]


def _load_official(module, state, prefix, *_):
    module.from_official(state, prefix)


def _save_official(module, state, prefix, _meta):
    module.to_official(state, prefix)


class TimmBody(nn.Module):
    """A transformer backbone: ``patch_embed``, four timm-layout ``layers`` (stage i > 0 starts with
    its patch merging) and LayerNorms ``norm1..norm3`` on the outputs of stages 1..3 (the official
    ``out_indices=(1, 2, 3)``). Loads and saves the official state-dict layout (module docstring).

    Shapes: (B, 3, 576, 576) -> (B, 2E, 72, 72), (B, 4E, 36, 36), (B, 8E, 18, 18), E = ``embed_dim``.
    """

    channels_last: ClassVar[bool] = True
    """Whether the stages run on (B, H, W, C) tensors (Swin) or (B, C, H, W) (FocalNet)."""

    def __init__(self, patch_embed: nn.Module, layers: nn.Module, spec: TransformerSpec):
        super().__init__()
        self.patch_embed = patch_embed
        self.layers = layers
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c) for c in spec.features)
        self.register_load_state_dict_pre_hook(_load_official)
        self.register_state_dict_post_hook(_save_official)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = self.run_stage(stage, x)
            if i:
                y = x if self.channels_last else x.permute(0, 2, 3, 1)
                outs.append(getattr(self, f'norm{i}')(y).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One stage of :meth:`forward` (here: the stage itself)."""
        return stage(x)

    # ------------------------------------------------------------------ the official layout
    @staticmethod
    def own_key(key: str) -> str:
        """The name in this module of the official tensor ``key`` (relative to the backbone)."""
        return re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)

    @staticmethod
    def official_key(key: str) -> str:
        """The official name of this module's tensor ``key``."""
        return re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', key)

    def own_value(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def official_value(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def from_official(self, state: dict, prefix: str) -> None:
        """Renames the official tensors under ``prefix`` in ``state`` (in place) to this module's;
        a ``relative_position_index`` is copied into timm's buffer (int64, as the official
        ``load_state_dict`` casts it) and removed.

        Raises:
            VidDetError: a relative_position_index of another window size.
        """
        for key, value in [(k, state.pop(k)) for k in list(state) if k.startswith(prefix)]:
            rel = key[len(prefix):]
            if rel.endswith('.relative_position_index'):
                buf = self.get_buffer(rel)
                if tuple(buf.shape) != tuple(value.shape):
                    raise VidDetError(f'{prefix}{rel}: shape {tuple(value.shape)}, the model has {tuple(buf.shape)}')
                with torch.no_grad():
                    buf.copy_(value)
                continue
            own = self.own_key(rel)
            state[prefix + own] = self.own_value(own, value)

    def to_official(self, state: dict, prefix: str) -> None:
        """Renames this module's tensors under ``prefix`` in ``state`` (in place, order kept) to the
        official names, with each ``relative_position_index`` after its bias table."""
        for key, value in [(k, state.pop(k)) for k in list(state) if k.startswith(prefix)]:
            rel = key[len(prefix):]
            state[prefix + self.official_key(rel)] = self.official_value(rel, value)
            if rel.endswith('.relative_position_bias_table'):
                index = rel[:-len('relative_position_bias_table')] + 'relative_position_index'
                state[prefix + self.official_key(index)] = self.get_buffer(index).detach().clone()


class SwinBody(TimmBody):
    """Swin (official ``swin_transfomer.SwinTransformer``, ``ape=False``, ``patch_norm=True``): timm's
    ``SwinTransformer`` patch embedding and stages where they match the official ones at 576 x 576
    (window 12: Swin-B), :class:`PadFirstSwinStage` where they do not (window 7: Swin-T); any side
    divisible by 32 (multi-scale training: :meth:`run_stage`)."""

    def __init__(self, spec: TransformerSpec):
        timm = _timm('Swin')
        net = timm.models.swin_transformer.SwinTransformer(
            img_size=INPUT_SIZE, embed_dim=spec.embed_dim, depths=spec.depths, num_heads=spec.num_heads,
            window_size=spec.window, num_classes=0, drop_path_rate=spec.drop_path, strict_img_size=False)
        layers = net.layers
        if not all(timm_swin_matches(INPUT_SIZE // 4 // 2 ** i, spec.window) for i in range(len(spec.depths))):
            dims = [spec.embed_dim * 2 ** i for i in range(len(spec.depths))]
            layers = nn.Sequential(*[PadFirstSwinStage(dims[max(i - 1, 0)], dims[i], d, spec.num_heads[i],
                                                       spec.window, rates)
                                     for i, (d, rates) in enumerate(zip(spec.depths, _drop_rates(spec)))])
        super().__init__(net.patch_embed, layers, spec)
        self.window = spec.window

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A timm stage whose blocks compute the official ones on the merged map (:func:`timm_swin_matches`:
        Swin-B at 576) runs as it is; otherwise its blocks' layers run in the official order
        (:func:`pad_first_attention`, shift window // 2 on odd blocks), e.g. in multi-scale training."""
        if isinstance(stage, PadFirstSwinStage):
            return stage(x)
        x = stage.downsample(x)
        if all(timm_swin_matches(n, self.window) for n in x.shape[1:3]):
            return stage.blocks(x)
        for i, blk in enumerate(stage.blocks):
            x = x + blk.drop_path1(pad_first_attention(blk.norm1(x), blk.attn, self.window, self.window // 2 * (i % 2)))
            x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
        return x


class FocalBody(TimmBody):
    """FocalNet (official ``focal.FocalNet``: ``use_conv_embed``, ``use_postln``, ``use_layerscale``,
    no ``normalize_modulator``, ``use_postln_in_modulation`` off) as timm's ``FocalNet`` stem
    (``patch_embed``: 7 x 7 stride-4 conv + LayerNorm) and stages (3 x 3 stride-2 conv merging), NCHW."""

    channels_last = False
    LINEAR_AS_CONV = ('modulation.f.weight', 'modulation.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight')
    RENAMES = ((r'\.gamma_1$', '.ls1.gamma'), (r'\.gamma_2$', '.ls2.gamma'),
               (r'(blocks\.\d+)\.norm1\.', r'\1.norm1_post.'), (r'(blocks\.\d+)\.norm2\.', r'\1.norm2_post.'))

    def __init__(self, spec: TransformerSpec):
        timm = _timm('FocalNet')
        net = timm.models.focalnet.FocalNet(
            embed_dim=spec.embed_dim, depths=spec.depths, focal_levels=(4,) * 4, focal_windows=(spec.window,) * 4,
            use_overlap_down=True, use_post_norm=True, use_post_norm_in_modulation=False,
            normalize_modulator=False, layerscale_value=1e-4, num_classes=0, drop_path_rate=spec.drop_path)
        super().__init__(net.stem, net.layers, spec)

    @staticmethod
    def own_key(key):
        key = TimmBody.own_key(key)
        for official, own in FocalBody.RENAMES:
            key = re.sub(official, own, key)
        return key

    @staticmethod
    def official_key(key):
        key = TimmBody.official_key(key)
        key = re.sub(r'\.ls([12])\.gamma$', r'.gamma_\1', key)
        return re.sub(r'(blocks\.\d+)\.norm([12])_post\.', r'\1.norm\2.', key)

    def own_value(self, key, value):
        return value.reshape(*value.shape, 1, 1) if key.endswith(self.LINEAR_AS_CONV) and value.dim() == 2 else value

    def official_value(self, key, value):
        return value.flatten(1) if key.endswith(self.LINEAR_AS_CONV) and value.dim() == 4 else value


class TransformerPAFPN(PAFPN):
    """The official ``YOLOPAFPN_Swin`` / ``YOLOPAFPN_focal``: a transformer ``backbone`` and YOLOX's
    path-aggregation FPN (the forward of :class:`viddet.models.yolox.PAFPN`), whose top-down
    concatenations take the backbone's channels as they are. ``depth`` and ``width`` scale the FPN
    only. Keys: ``backbone.*`` (:class:`TimmBody`), ``lateral_conv0``, ``C3_p4``, ... as YOLOX's.

    Shapes: (B, 3, 576, 576) -> (B, o0, 72, 72), (B, o1, 36, 36), (B, o2, 18, 18), o = ``neck_out`` · width.
    """

    def __init__(self, body: TimmBody, features, out_channels, depth: float, width: float):
        nn.Module.__init__(self)   # PAFPN.__init__ builds a CSPDarknet: only the layout and forward are shared
        c0, c1, c2 = features
        o0, o1, o2 = (int(c * width) for c in out_channels)
        n = round(3 * depth)
        self.backbone = body
        self.lateral_conv0 = BaseConv(c2, o1, 1)
        self.C3_p4 = CSPLayer(c1 + o1, o1, n, False)
        self.reduce_conv1 = BaseConv(o1, o0, 1)
        self.C3_p3 = CSPLayer(c0 + o0, o0, n, False)
        self.bu_conv2 = BaseConv(o0, o0, 3, 2)
        self.C3_n3 = CSPLayer(2 * o0, o1, n, False)
        self.bu_conv1 = BaseConv(o1, o1, 3, 2)
        self.C3_n4 = CSPLayer(2 * o1, o2, n, False)


def transformer_pafpn(name: str) -> TransformerPAFPN:
    """The backbone + neck of the official YOLOV++ model ``name`` (a key of :data:`TRANSFORMERS`).

    Raises:
        VidDetError: timm is not installed.
    """
    spec = TRANSFORMERS[name]
    body = SwinBody(spec) if spec.family == 'swin' else FocalBody(spec)
    return TransformerPAFPN(body, spec.features, spec.neck_out, spec.depth, spec.width)


def transformer_of_state(state) -> str:
    """The transformer model of a YOLOV++ state dict (official layout): Swin or FocalNet by its
    layers, then the patch embedding's channels and the depth of stage 2.

    Raises:
        VidDetError: no ``backbone.backbone.patch_embed``, or a transformer of no known model.
    """
    embed = state.get('backbone.backbone.patch_embed.proj.weight')
    if embed is None:
        raise VidDetError('not a transformer YOLOV++ checkpoint: no backbone.backbone.patch_embed.proj.weight')
    family = 'swin' if any(k.endswith('.relative_position_bias_table') for k in state) else 'focal'
    blocks = {int(m.group(1)) for k in state if (m := re.match(r'backbone\.backbone\.layers\.2\.blocks\.(\d+)\.', k))}
    for name, spec in TRANSFORMERS.items():
        if (spec.family, spec.embed_dim, spec.depths[2]) == (family, embed.shape[0], len(blocks)):
            return name
    raise VidDetError(f'a {family} backbone with {embed.shape[0]} channels and {len(blocks)} blocks in stage 2 '
                      f'is none of {", ".join(TRANSFORMERS)}')
