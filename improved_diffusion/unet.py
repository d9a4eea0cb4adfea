"""The improved-DDPM UNet: timestep-conditioned residual blocks with self-attention at chosen resolutions.

Architecture as in Nichol & Dhariwal 2021 (improved-diffusion). Additions for MRI: the model accepts
any spatial size (e.g. 640x368 fastMRI slices) by padding to a multiple of 2^(levels-1) and cropping back,
and attention uses ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient kernels).
With ``attention_token_budget`` set, attention on a feature map much larger than at the nominal image size
runs within tiles of the nominal size (docs/engine.md, "Attention on large images").
"""

from abc import abstractmethod
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import avg_pool_nd, checkpoint, conv_nd, linear, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to x (B, C, ...) given the embedding emb (B, E)."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    For 3-D signals only the inner two dimensions are upsampled.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample: expected {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or average pooling (inner dims only for 3-D)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample: expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding.

    Args:
        channels: input channels.
        emb_channels: timestep-embedding channels.
        dropout: dropout rate before the last convolution.
        out_channels: output channels (default: ``channels``).
        use_conv: with a channel change, use a 3x3 (instead of 1x1) convolution on the skip path.
        use_scale_shift_norm: condition by h = norm(h) * (1 + scale) + shift (FiLM) instead of adding emb.
        dims: signal dimensionality.
        use_checkpoint: recompute activations in the backward pass to save memory.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            # Zero-initialized: every residual block starts as the identity.
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, ...), emb (B, E) -> (B, out_channels, ...)."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm.forward_film(h, scale, shift))  # the FiLM inside the GroupNorm pass
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, optionally within tiles above a token budget.

    The qkv projection keeps upstream's channel layout (per head: q, k, v), so upstream checkpoints load.

    Args:
        channels: input and output channels.
        num_heads: attention heads (``channels`` must be divisible by it).
        use_checkpoint: recompute activations in the backward pass to save memory.
        max_tokens: attend over all positions while there are at most this many (None: always). A 2-D
            feature map with more positions is split into a grid of near-equal tiles, each no larger than
            ``window`` x ``window``, and every position attends only to the positions of its tile. The
            normalization and the 1x1 projections still see the whole map (they are per position).
        window: the largest tile side, the side of this level's feature map at the nominal image size.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_checkpoint: bool = False,
        max_tokens: Optional[int] = None,
        window: int = 0,
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(
                f"AttentionBlock: channels ({channels}) must be divisible by num_heads ({num_heads})"
            )
        if max_tokens is not None and (max_tokens < 1 or window < 1):
            raise ValueError(
                f"AttentionBlock: max_tokens ({max_tokens}) and window ({window}) must be positive"
            )
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.max_tokens = max_tokens
        self.window = window
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def extra_repr(self) -> str:
        if self.max_tokens is None:
            return "global"
        return f"global up to {self.max_tokens} tokens, else tiles of at most {self.window}x{self.window}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *spatial) -> same shape."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        length = x_flat.shape[-1]
        qkv = self.qkv(self.norm(x_flat))  # (B, 3C, T)
        # (B, heads, 3 * ch, T): per head q, k, v stacked along the channels, as upstream.
        qkv = qkv.reshape(b, self.num_heads, -1, length)
        if self.max_tokens is not None and length > self.max_tokens and len(spatial) == 2:
            h = self._tiled_attention(qkv.reshape(*qkv.shape[:3], *spatial))
        else:
            h = _attention(qkv)
        h = self.proj_out(h.reshape(b, c, length))
        return (x_flat + h).reshape(b, c, *spatial)

    def _tiled_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention within tiles: qkv (B, heads, 3 * ch, H, W) -> (B, heads, ch, H * W)."""
        height, width = qkv.shape[-2:]
        rows = []
        for band in qkv.split(_tile_sizes(height, self.window), dim=-2):
            tiles = []
            for tile in band.split(_tile_sizes(width, self.window), dim=-1):
                th, tw = tile.shape[-2:]
                tiles.append(
                    _attention(tile.reshape(*tile.shape[:3], th * tw)).reshape(*tile.shape[:2], -1, th, tw)
                )
            rows.append(torch.cat(tiles, dim=-1))
        out = torch.cat(rows, dim=-2)
        return out.reshape(*out.shape[:3], height * width)


def _attention(qkv: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each head: qkv (N, heads, 3 * ch, T) -> (N, heads, ch, T)."""
    # SDPA wants (N, heads, T, ch); its default scale 1/sqrt(ch) equals upstream's. One contiguous copy:
    # with unit stride along ch the CPU uses the fused (flash) kernel instead of the math fallback, which
    # materializes the T x T weights (about 1.5x faster forward + backward at T = 256).
    q, k, v = qkv.transpose(-1, -2).contiguous().chunk(3, dim=-1)
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)


def _tile_sizes(n: int, window: int) -> List[int]:
    """Split ``n`` positions into the fewest near-equal parts of at most ``window`` (larger parts first)."""
    parts = -(-n // window)
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding.

    Args:
        in_channels: input channels (2 for complex MRI images as real/imaginary).
        model_channels: base channel count.
        out_channels: output channels (2 * in_channels with a learned variance).
        num_res_blocks: residual blocks per resolution level.
        attention_resolutions: downsampling factors (1, 2, 4, ...) at which to use attention.
        dropout: dropout probability.
        channel_mult: channel multiplier per level; len(channel_mult) - 1 downsamplings.
        conv_resample: use learned convolutions for up/downsampling.
        dims: 1-D, 2-D or 3-D signals.
        num_classes: if set, the model is class-conditional with that many classes.
        use_checkpoint: gradient checkpointing to save memory.
        num_heads: attention heads in the encoder and middle.
        num_heads_upsample: attention heads in the decoder (-1: same as num_heads).
        use_scale_shift_norm: FiLM-like conditioning in the residual blocks.
        attention_token_budget: 0 (default): every attention block attends over its whole feature map, as
            upstream. Otherwise (2-D only, needs ``image_size``): a block whose feature map has more than
            ``attention_token_budget * (image_size // ds) ** 2`` positions attends within tiles of at most
            ``image_size // ds`` squared (see :class:`AttentionBlock`), so on large images attention costs
            linear instead of quadratic time and sees the context it was trained with.
        image_size: the nominal (training) side, with which the budget and the tile side are computed.

    Input of any spatial size is padded (reflect, see :meth:`forward`) to a multiple of
    ``2 ** (len(channel_mult) - 1)`` and the output is cropped back, so output spatial size == input's.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        attention_token_budget: float = 0.0,
        image_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if not channel_mult:
            raise ValueError("UNetModel: channel_mult must have at least one level")
        if num_res_blocks < 1:
            raise ValueError(f"UNetModel: num_res_blocks must be >= 1, got {num_res_blocks}")
        if attention_token_budget < 0:
            raise ValueError(f"UNetModel: attention_token_budget must be >= 0, got {attention_token_budget}")
        if attention_token_budget and (dims != 2 or not image_size or image_size < 1):
            raise ValueError(
                "UNetModel: attention_token_budget needs dims=2 and the nominal image_size "
                f"(got dims={dims}, image_size={image_size})"
            )

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        self.attention_token_budget = attention_token_budget
        self.image_size = image_size
        # Spatial sizes must be divisible by this for the skip connections to line up.
        self.size_multiple = 2 ** (len(self.channel_mult) - 1)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def attention(ch: int, heads: int, ds: int) -> AttentionBlock:
            if not attention_token_budget:
                return AttentionBlock(ch, num_heads=heads, use_checkpoint=use_checkpoint)
            window = max(1, image_size // ds)  # this level's side at the nominal size
            return AttentionBlock(
                ch,
                num_heads=heads,
                use_checkpoint=use_checkpoint,
                max_tokens=max(1, int(attention_token_budget * window**2)),
                window=window,
            )

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads, ds))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads, ds),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample, ds))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )

    def convert_to_fp16(self) -> None:
        """Cast the torso (input, middle and output blocks) to float16, as upstream's fp16 training."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(_convert_module_to(torch.float16))

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(_convert_module_to(torch.float32))

    @property
    def inner_dtype(self) -> torch.dtype:
        """The dtype of the torso of the model."""
        return next(self.input_blocks.parameters()).dtype

    def _pad_amounts(self, spatial: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
        m = self.size_multiple
        pads = []
        for n in spatial:
            total = (-n) % m
            pads.append((total // 2, total - total // 2))  # symmetric: the image centre stays centred
        return tuple(pads)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Apply the model.

        Args:
            x: (B, in_channels, *spatial) input of any spatial size.
            timesteps: (B,) timesteps (a scalar is broadcast to the batch).
            y: (B,) class labels, required if and only if the model is class-conditional.

        Returns:
            (B, out_channels, *spatial) output.

        Spatial sizes that are not a multiple of ``2 ** (len(channel_mult) - 1)`` are padded symmetrically
        with reflection and the output is cropped back. Reflection (not zeros) because x_t at most noise
        levels is dominated by Gaussian noise: a zero band would be out of distribution for the network,
        while reflected content has the right statistics. Zero padding is the fallback when a side is
        too small to reflect (fewer pixels than the pad).
        """
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNetModel: expected x of shape (B, {self.in_channels}, {'...' if self.dims > 1 else 'L'}) "
                f"with {self.dims} spatial dims, got {tuple(x.shape)}"
            )
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "UNetModel: pass y if and only if the model is class-conditional (num_classes set)"
            )
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(
                f"UNetModel: timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}"
            )

        spatial = tuple(x.shape[2:])
        pads = self._pad_amounts(spatial)
        padded = any(p for pair in pads for p in pair)
        if padded:
            flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants last dim first
            can_reflect = all(max(pair) < n for pair, n in zip(pads, spatial))
            x_in = F.pad(x, flat, mode="reflect" if can_reflect else "constant")
        else:
            x_in = x

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"UNetModel: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        skips = []
        h = x_in.type(self.inner_dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.out(h.type(x.dtype))

        if padded:
            index = [slice(None), slice(None)] + [slice(lo, lo + n) for (lo, _), n in zip(pads, spatial)]
            h = h[tuple(index)]
        return h


def _convert_module_to(dtype: torch.dtype):
    def convert(module: nn.Module) -> None:
        # Convolutions only, as upstream: the timestep-embedding linears stay float32.
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)

    return convert
