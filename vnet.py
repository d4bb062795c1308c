"""VNet of Milletari, Navab and Ahmadi (2016), "V-Net: Fully Convolutional Neural Networks for
Volumetric Medical Image Segmentation", as one small module per stage.

Input (N, in_channels, D, H, W) float32, every spatial side divisible by 16 (four 2x downsamplings).
Output (N, num_classes, D, H, W) logits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VNetConfig:
    in_channels: int = 1  # CT intensity only
    num_classes: int = 5  # background, liver, right kidney, left kidney, spleen
    base_width: int = 16  # channels of the input stage; doubled at every down stage (paper: 16)
    kernel_size: int = 5  # side of the residual convolutions (paper: 5x5x5)
    # Convolutions per stage, as in the authors' Caffe release (MONAI's VNet too); the paper's figure
    # draws (2, 3, 3), 3 and (3, 3, 2, 1), which would make 63 M parameters.
    down_depths: tuple[int, ...] = (1, 2, 3)  # the three down stages above the bottom, shallowest first
    bottom_depth: int = 2  # convolutions at 1/16 resolution
    up_depths: tuple[int, ...] = (2, 2, 1, 1)  # the four up stages, deepest first
    norm: str = "batch"  # "batch", "instance", "group" or "none"
    activation: str = "prelu"  # "prelu" (paper), "relu", "leakyrelu" or "elu"
    dropout: float = 0.0  # 3D dropout probability in the two deepest stages (paper: none stated)
    # "conv": the Caffe release's head, a kernel_size convolution down to one channel per class,
    # norm, activation, then 1x1x1 (MONAI's too); "linear": the paper's figure, a 1x1x1 convolution
    # straight from the last stage. The conv head squeezes everything through a rectified
    # 5-channel bottleneck, which makes small organs appear late in short CPU runs.
    head: str = "conv"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["down_depths"] = list(self.down_depths)
        d["up_depths"] = list(self.up_depths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VNet config keys {sorted(unknown)}")
        d = dict(d)
        for key in ("down_depths", "up_depths"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


PRESETS: dict[str, VNetConfig] = {
    # The paper's network: 5x5x5 kernels, widths 16..256, about 45.6 M parameters.
    "vnet": VNetConfig(),
    # Same topology at half the width and 3x3x3 kernels, for CPUs: about 2.6 M parameters, a
    # training step 3x cheaper than "medium" (0.33 against 1.0 s at 48^3, batch 2, 2 cores). On
    # fresh phantom patches both learn about as much per step, so in a fixed CPU time the cheaper
    # step wins (bench/RESULTS.md, "Learning per step"). ELU, not leaky ReLU: with leaky ReLU it
    # learned a kidney on a fixed batch in hundreds of steps instead of tens.
    "small": VNetConfig(base_width=8, kernel_size=3, activation="elu", head="linear"),
    # Twice the width of "small": about 10.5 M parameters.
    "medium": VNetConfig(base_width=16, kernel_size=3, activation="elu", head="linear"),
}


# Weight gradients on a CPU. oneDNN computes a 3D convolution's weight gradient far below its forward
# rate where the feature maps are small or the output has few channels (the deep stages, the 5-class
# head): at 128-256 channels on 2^3-4^3 voxels it takes 4-6x as long as the same sum written as a
# convolution of the input by the output gradient, with batch and channels swapped. Which route wins
# depends on the CPU, not only on the shapes: the size rule below, measured on an AMD host, costs an
# Intel Xeon host 15 % of its training step (bench/RESULTS.md, "Training speed"). So by default each
# convolution shape is timed both ways once, on the running CPU, and the faster route kept. Timings
# vary from run to run, so under torch.use_deterministic_algorithms (train.py --deterministic) the
# fixed rule decides instead: a resumed run must take the routes the interrupted one took.
WGRAD_ROUTE = "auto"  # "auto": time both routes once per shape; "rule": the size rule below, always
SWAPPED_WGRAD_MAX_VOXELS = 24**3  # rule: per sample and channel; smaller maps use the swapped weight gradient
SWAPPED_WGRAD_MAX_OUT = 8  # rule: and so do outputs with fewer channels than this, at any size
FEW_OUT_CHANNELS = 8  # CPU float32: convolutions with fewer outputs (the 5-class head) split their depth taps
TINY_MAP_VOXELS = 8  # CPU float32 training: maps of at most this many voxels a sample (the 2^3 bottom) use one GEMM
WGRAD_TIMING_REPEATS = 2  # auto: timed passes per route after one warm-up; the fastest pass counts
_wgrad_choice: dict[tuple, bool] = {}  # auto: (shape, dtype, layout, layer, threads) -> swapped is faster


def _swapped_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, padding: tuple[int, int, int],
                         channels_last: bool) -> torch.Tensor:
    """The weight gradient (O, I, kD, kH, kW) of a stride-1 zero-padded conv3d as one convolution of the
    padded input by the output gradient, batch and channels swapped, put in the weight's layout."""
    pd, ph, pw = padding
    padded = F.pad(x, (pw, pw, ph, ph, pd, pd)).transpose(0, 1)
    return F.conv3d(padded, grad_out.transpose(0, 1)).transpose(0, 1).contiguous(
        memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


class _SwappedWeightGradConv3d(torch.autograd.Function):
    """conv3d(x, weight, bias, stride 1, zero padding) whose weight gradient is
    conv3d(pad(x) with batch and channels swapped, grad_output with batch and channels swapped):
    grad_w[o, i, k] = sum over n and p of grad_out[n, o, p] * x_padded[n, i, p + k], the same sum
    as oneDNN's, in another order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv3d_input(x.shape, weight, grad_out, padding=ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_w = _swapped_weight_grad(x, grad_out, ctx.padding,
                                          weight.is_contiguous(memory_format=torch.channels_last_3d))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


def _swapped_route_is_faster(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> bool:
    """Whether the swapped weight gradient beats oneDNN's for a convolution (weight (O, I, kD, kH, kW),
    zero padding) on input x (N, C, D, H, W),
    timed on this CPU the first time the shape is seen: the weight gradient alone each way (the
    input's gradient is the same call in both), on x's own values and an all-ones output gradient,
    so no random number is drawn and the run's random stream is untouched."""
    key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last_3d),
           tuple(weight.shape), padding, torch.get_num_threads())
    if key not in _wgrad_choice:
        with torch.no_grad():
            xs, w = x.detach(), weight.detach()
            grad_out = torch.ones_like(F.conv3d(xs, w, padding=padding))
            # Each route as the backward runs it: the swapped one with its padding and its copy back into
            # the weight's layout, which for the deep layers' large weights is a sizeable share of that route.
            channels_last = w.is_contiguous(memory_format=torch.channels_last_3d)
            routes = {
                False: lambda: torch.ops.aten.convolution_backward(
                    grad_out, xs, w, None, [1, 1, 1], list(padding), [1, 1, 1], False, [0, 0, 0], 1,
                    [False, True, False]),
                True: lambda: _swapped_weight_grad(xs, grad_out, padding, channels_last),
            }
            best = {}
            for swapped, route in routes.items():
                times = []
                for _ in range(WGRAD_TIMING_REPEATS + 1):
                    start = time.perf_counter()
                    route()
                    times.append(time.perf_counter() - start)
                best[swapped] = min(times[1:])
        _wgrad_choice[key] = best[True] < best[False]
    return _wgrad_choice[key]


def _reachable_taps(weight: torch.Tensor, padding: tuple[int, int, int],
                    spatial: torch.Size) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A "same" convolution's kernel (O, I, kD, kH, kW; odd sides, padding side // 2) cut to the taps
    that can meet a voxel of a (D, H, W) map, and the padding that goes with it: on a map thinner than
    the kernel's reach (a 2^3 bottom stage under 5^3 kernels) the outer taps only ever multiply the
    zero padding, so the result and every gradient are the same, for a fraction of the arithmetic."""
    index = [slice(None), slice(None)]
    cut = []
    for side, k, p in zip(spatial, weight.shape[2:], padding):
        reach = min(p, side - 1) if k % 2 and p == k // 2 else p
        index.append(slice(p - reach, k - (p - reach)))
        cut.append(reach)
    if tuple(cut) == tuple(padding):
        return weight, padding
    return _CutTaps.apply(weight, tuple(index)), tuple(cut)


class _CutTaps(torch.autograd.Function):
    """weight[index] whose backward writes the gradient into one zeroed tensor of the weight's shape.
    Autograd's own chain of three slices allocates and fills a full-size gradient per slice, which for
    a 256-channel 5^3 kernel costs about what cutting the taps saves."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: tuple) -> torch.Tensor:
        ctx.shape, ctx.index = weight.shape, index
        return weight[index].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros(ctx.shape)
        full[ctx.index] = grad
        return full, None


def _depth_split_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        padding: tuple[int, int, int]) -> torch.Tensor:
    """conv3d(x, weight, bias, stride 1, zero padding) for a few output channels, as one convolution
    whose output channels are the O outputs times the kD depth taps, (1, kH, kW) kernel, then the kD
    depth-shifted slices summed. oneDNN vectorises over output channels: O = 5 (the 5-class head)
    fills a third of its vectors, O x kD = 25 fills most of two (0.30 -> 0.21 s forward and backward
    for a 32 -> 5 channel 5^3 head on 2 x 32^3, one thread). The same sum in another order; the depth
    padding is never convolved (its taps add zeros), which saves a padded copy and kD - 1 slices' work."""
    out, _, kd = weight.shape[:3]
    pd, ph, pw = padding
    taps = weight.permute(2, 0, 1, 3, 4).reshape(kd * out, weight.shape[1], 1, *weight.shape[3:])
    z = F.conv3d(x, taps, padding=(0, ph, pw))
    # Depth padding is left out rather than convolved: tap d of output slice t meets input slice t + d - pd,
    # and the slices it would meet in the padding add exact zeros. Summed from zero in tap order, as before.
    depth = x.shape[2] + 2 * pd - kd + 1
    y = z.new_zeros((z.shape[0], out, depth, *z.shape[3:]))
    for d in range(kd):
        shift = d - pd
        lo, hi = max(0, -shift), min(depth, x.shape[2] - shift)
        if hi > lo:
            y[:, :, lo:hi] += z[:, d * out:(d + 1) * out, lo + shift:hi + shift]
    return y if bias is None else y + bias.view(1, -1, 1, 1, 1)


def _tiny_map_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int, int]) -> torch.Tensor:
    """conv3d(x, weight, bias, stride 1, zero padding) of a map of a few voxels (N, I, D, H, W) as one
    matrix product: each output voxel's receptive field at the kernel's full size, gathered from the
    padded map (the taps that fall on padding gather zeros), times the weight viewed as
    (O, I * kD * kH * kW). Cutting the kernel to its reachable taps (_reachable_taps) would copy the
    weight every step and fill a zeroed full-size gradient; here the weight is a view and its gradient
    comes out of one matrix product at full size. Returns (N, O, D', H', W'), contiguous."""
    n = x.shape[0]
    kd, kh, kw = weight.shape[2:]
    pd, ph, pw = padding
    cols = F.pad(x, (pw, pw, ph, ph, pd, pd)).unfold(2, kd, 1).unfold(3, kh, 1).unfold(4, kw, 1)
    grid = cols.shape[2:5]
    cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(n * grid.numel(), -1)
    w = weight.reshape(weight.shape[0], -1).t()
    y = cols @ w if bias is None else torch.addmm(bias, cols, w)
    return y.view(n, *grid, -1).permute(0, 4, 1, 2, 3).contiguous()


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters, same function, the same values up to the order of float sums).
    With stride 1 and zero padding it drops kernel taps that can only meet the padding
    (_reachable_taps), except when training on a CPU in float32 on a map of at most TINY_MAP_VOXELS
    voxels, which takes one matrix product (_tiny_map_conv3d). On a CPU in float32 a convolution with
    fewer than FEW_OUT_CHANNELS outputs takes _depth_split_conv3d, and when training the others take
    the swapped weight gradient of _SwappedWeightGradConv3d where that is the faster one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dim() == 5 and self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return super().forward(x)
        # Under CPU autocast (bf16) the routes below would meet bf16 gradients and float32 weights.
        cpu_float32 = (x.device.type == "cpu" and x.dtype == torch.float32
                       and not torch.is_autocast_enabled("cpu"))
        if cpu_float32 and torch.is_grad_enabled() and x.shape[2:].numel() <= TINY_MAP_VOXELS:
            return _tiny_map_conv3d(x, self.weight, self.bias, tuple(self.padding))
        weight, padding = _reachable_taps(self.weight, tuple(self.padding), x.shape[2:])
        if cpu_float32 and self.out_channels < FEW_OUT_CHANNELS and weight.shape[2] > 1:
            return _depth_split_conv3d(x, weight, self.bias, padding)
        if cpu_float32 and torch.is_grad_enabled() and self.weight.requires_grad:
            if WGRAD_ROUTE == "rule" or torch.are_deterministic_algorithms_enabled():
                swapped = (x.shape[2] * x.shape[3] * x.shape[4] <= SWAPPED_WGRAD_MAX_VOXELS
                           or self.out_channels < SWAPPED_WGRAD_MAX_OUT)
            else:
                swapped = _swapped_route_is_faster(x, weight, padding)
            if swapped:
                return _SwappedWeightGradConv3d.apply(x, weight, self.bias, padding)
        return F.conv3d(x, weight, self.bias, padding=padding)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use batch, instance, group or none")


def _act(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "elu":
        return nn.ELU(inplace=True)
    raise ValueError(f"unknown activation {kind!r}: use prelu, relu, leakyrelu or elu")


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, cfg: VNetConfig, kernel: int | None = None, stride: int = 1):
        k = cfg.kernel_size if kernel is None else kernel
        super().__init__(
            Conv3d(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0, bias=cfg.norm == "none"),
            _norm(cfg.norm, cout),
            _act(cfg.activation, cout),
        )


class ResidualConvs(nn.Module):
    """depth x (convolution, norm, activation) at fixed width, added to the stage's input, then one
    more activation: the paper's residual stage."""

    def __init__(self, channels: int, depth: int, cfg: VNetConfig, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.convs = nn.Sequential(*[ConvNormAct(channels, channels, cfg) for _ in range(depth)])
        self.act = _act(cfg.activation, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(self.drop(x))
        if torch.is_grad_enabled() or y is x or y.dtype != x.dtype:
            return self.act(y + x)
        # Inference keeps no graph, so the sum can go into y instead of a new full-size map: the same
        # values, one allocation fewer per stage (bench_infer's peak memory 1.98 -> 1.67 GiB).
        return self.act(y.add_(x))


class InputStage(nn.Module):
    """One full-resolution convolution to base_width channels; the input, repeated across those
    channels, is the residual, as in the paper."""

    def __init__(self, cfg: VNetConfig):
        super().__init__()
        if cfg.base_width % cfg.in_channels:
            raise ValueError(f"base_width {cfg.base_width} must be a multiple of in_channels {cfg.in_channels}")
        self.repeat = cfg.base_width // cfg.in_channels
        self.conv = nn.Sequential(
            Conv3d(cfg.in_channels, cfg.base_width, cfg.kernel_size, padding=cfg.kernel_size // 2,
                   bias=cfg.norm == "none"),
            _norm(cfg.norm, cfg.base_width),
        )
        self.act = _act(cfg.activation, cfg.base_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        # Under autocast the convolution gives bf16/fp16 while x stays float32: adding x as it is
        # would promote the whole full-resolution stage, and the skip it feeds, to float32. A
        # one-channel input broadcasts across the channels: the paper's repeated input, without the copy.
        x = (x if x.shape[1] == 1 else x.repeat(1, self.repeat, 1, 1, 1)).to(y.dtype)
        if torch.is_grad_enabled():
            return self.act(y + x)
        return self.act(y.add_(x))


class DownStage(nn.Module):
    """2x2x2 stride-2 convolution that doubles the channels, then residual convolutions."""

    def __init__(self, cin: int, depth: int, cfg: VNetConfig, dropout: float = 0.0):
        super().__init__()
        self.down = ConvNormAct(cin, 2 * cin, cfg, kernel=2, stride=2)
        self.block = ResidualConvs(2 * cin, depth, cfg, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


class UpStage(nn.Module):
    """2x2x2 transposed convolution to the skip's resolution (cout channels), concatenation with the
    skip features, residual convolutions back to cout + skip channels."""

    def __init__(self, cin: int, cout: int, skip: int, depth: int, cfg: VNetConfig, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose3d(cin, cout, 2, stride=2),
            _norm(cfg.norm, cout),
            _act(cfg.activation, cout),
        )
        self.block = ResidualConvs(cout + skip, depth, cfg, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class OutputStage(nn.Module):
    """Logits per class: a 1x1x1 convolution, preceded by a convolution to one channel per class
    with head="conv"."""

    def __init__(self, cin: int, cfg: VNetConfig):
        super().__init__()
        if cfg.head not in ("conv", "linear"):
            raise ValueError(f"unknown head {cfg.head!r}: use conv or linear")
        self.conv = ConvNormAct(cin, cfg.num_classes, cfg) if cfg.head == "conv" else nn.Identity()
        self.head = nn.Conv3d(cfg.num_classes if cfg.head == "conv" else cin, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class VNet(nn.Module):
    def __init__(self, cfg: VNetConfig | None = None):
        super().__init__()
        cfg = cfg or VNetConfig()
        if len(cfg.down_depths) != 3 or len(cfg.up_depths) != 4:
            raise ValueError("VNet has 3 down stages above the bottom and 4 up stages: "
                             "down_depths needs 3 entries, up_depths 4")
        self.cfg = cfg
        w = cfg.base_width
        d1, d2, d3 = cfg.down_depths
        u3, u2, u1, u0 = cfg.up_depths
        deep = cfg.dropout
        self.input = InputStage(cfg)                            # w,   1/1
        self.down1 = DownStage(w, d1, cfg)                      # 2w,  1/2
        self.down2 = DownStage(2 * w, d2, cfg)                  # 4w,  1/4
        self.down3 = DownStage(4 * w, d3, cfg, deep)            # 8w,  1/8
        self.bottom = DownStage(8 * w, cfg.bottom_depth, cfg, deep)  # 16w, 1/16
        self.up3 = UpStage(16 * w, 8 * w, 8 * w, u3, cfg, deep)  # 16w, 1/8
        self.up2 = UpStage(16 * w, 4 * w, 4 * w, u2, cfg)         # 8w,  1/4
        self.up1 = UpStage(8 * w, 2 * w, 2 * w, u1, cfg)          # 4w,  1/2
        self.up0 = UpStage(4 * w, w, w, u0, cfg)                  # 2w,  1/1
        self.output = OutputStage(2 * w, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, D, H, W) -> (N, num_classes, D, H, W) logits; D, H, W divisible by 16."""
        check_input_shape(x.shape, self.cfg.in_channels)
        s0 = self.input(x)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        s3 = self.down3(s2)
        b = self.bottom(s3)
        x = self.up3(b, s3)
        x = self.up2(x, s2)
        x = self.up1(x, s1)
        x = self.up0(x, s0)
        return self.output(x)


def check_input_shape(shape: torch.Size | tuple[int, ...], in_channels: int) -> None:
    if len(shape) != 5 or shape[1] != in_channels:
        raise ValueError(f"VNet expects input (N, {in_channels}, D, H, W); got {tuple(shape)}")
    bad = [s for s in shape[2:] if s % 16]
    if bad:
        fixed = tuple(-(-s // 16) * 16 for s in shape[2:])
        raise ValueError(f"VNet input sides must be divisible by 16; got {tuple(shape[2:])}: "
                         f"pad to {fixed} (the sliding window in utils.py does this)")


def build_vnet(preset_or_cfg: str | VNetConfig | dict = "vnet", **overrides) -> VNet:
    """A VNet from a preset name ("vnet", "small"), a VNetConfig or its dict, with field overrides."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_cfg!r}: choose from {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_cfg]
    elif isinstance(preset_or_cfg, dict):
        cfg = VNetConfig.from_dict(preset_or_cfg)
    else:
        cfg = preset_or_cfg
    if overrides:
        cfg = VNetConfig.from_dict({**cfg.to_dict(), **overrides})
    return VNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
