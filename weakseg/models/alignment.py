"""Where a feature cell sits on the input: the backbone's cell offset, measured when it is built.

Feature cell ``i`` of a backbone with reduction ``s`` is centred on input pixel ``s·i + o``.
The offset ``o`` comes from the padding: TF "same" padding (the ``tf_`` timm models) pads a
stride-2 convolution of an even input at the bottom/right only, which moves every later
cell by half the layer's input stride (``tf_efficientnet_lite0``: 1 + 2 + 4 + 8 = 15 px at
output stride 16), while symmetric padding leaves it at 0. Nothing in a timm model states
it, so :func:`measure_cell_offset` measures it.

The probe follows the architecture, not the weights (the receptive-field centre of Araujo
et al., Distill 2019): every odd kernel is replaced, functionally (the module is not
touched), by one tap at its window centre (even kernels and their windows average), max
pools by their window centre, BatchNorm by the identity and biases by 0, and the input is a
small positive constant, so every activation stays in its linear part. The input gradient
of one central feature cell then lies on the pixels its centre paths start from; its
centre of mass is that cell's centre, exactly and with no spread to truncate at the border.
Why not the pretrained weights' effective receptive field: for one cell it is not a
property of the model. Measured on ``tf_efficientnet_lite0`` at output stride 16, its
centre of mass moved from -26 to +12 px with the probe input (noise, constant, size),
while the architecture's centre is the same for any weights, follows from the
checkpoint's config alone, and so also holds for a checkpoint read without its
pretrained weights or a backbone fine-tuned after the probe.

Input sizes are multiples of the output stride wherever the code feeds the network
(training crops, inference batches): the probe uses one too, because "same" padding
depends on the parity of every layer's input. Models with global mixing (attention,
fixed input sizes) give no usable probe; the offset is then 0, with a warning.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.layers import pad_same
from timm.layers.pool2d_same import MaxPool2dSame
from torch import nn
from torch.func import functional_call

__all__ = ["measure_cell_offset"]

_logger = logging.getLogger(__name__)

PROBE_LEVEL = 1e-4  # input value: small enough that ReLU6-like clamps and residual sums stay linear


def _spatial(kh: int, kw: int) -> torch.Tensor:
    """One tap at the window centre of an odd kernel; an even side has none, so it averages."""
    ky = torch.zeros(kh)
    kx = torch.zeros(kw)
    for k, n in ((ky, kh), (kx, kw)):
        if n % 2:
            k[n // 2] = 1.0
        else:
            k.fill_(1.0 / n)
    return ky[:, None] * kx[None, :]


def _probe_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Centre-tap kernels over positive channel weights, unit scales, zero biases, identity BatchNorm.

    The channel weights are positive and seeded-random rather than equal, so a LayerNorm over
    channels does not zero the probe.
    """
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            out[name] = torch.zeros(p.shape)
        elif p.dim() > 1:
            mix = (torch.rand(p.shape[:2], generator=gen) + 0.5) / p.shape[1]
            spatial = _spatial(*p.shape[2:]) if p.dim() == 4 else torch.ones(())
            out[name] = mix.reshape(*p.shape[:2], *([1] * (p.dim() - 2))) * spatial
        else:
            out[name] = torch.ones(p.shape)
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            out[name] = torch.zeros(b.shape)
        elif name.endswith("running_var"):
            out[name] = torch.ones(b.shape)
    return out


def _centre_tap_pool(module: nn.MaxPool2d, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """A max pool's window centre instead of its maximum: a constant input gives ties, and a tie
    sends the gradient to the window's first element, which would read as a shifted centre."""
    x = args[0]
    k, s, d = (_pair(module.kernel_size), _pair(module.stride), _pair(module.dilation))
    if isinstance(module, MaxPool2dSame):
        x, padding = pad_same(x, k, s, d, value=0.0), (0, 0)
    else:
        padding = _pair(module.padding)
    weight = _spatial(*k).to(x)[None, None].repeat(x.shape[1], 1, 1, 1)
    y = F.conv2d(x, weight, stride=s, padding=padding, dilation=d, groups=x.shape[1])
    y = y[..., : out.shape[-2], : out.shape[-1]]  # ceil_mode: one more window at the end, left at 0
    return F.pad(y, (0, out.shape[-1] - y.shape[-1], 0, out.shape[-2] - y.shape[-2]))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _features(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    pools = [m for m in module.modules() if isinstance(m, nn.MaxPool2d)]
    hooks = [m.register_forward_hook(_centre_tap_pool) for m in pools]
    try:
        out = functional_call(module, params, (x,))
    finally:
        for h in hooks:
            h.remove()
    return out[-1] if isinstance(out, list | tuple) else out


def measure_cell_offset(module: nn.Module, stride: int, cells: int = 8) -> tuple[float, float]:
    """``(dy, dx)`` in input pixels: feature cell ``i`` is centred on pixel ``stride·i + d``.

    ``module`` maps an image ``[1, 3, H, W]`` to features (or a list of them: the last is
    used) with reduction ``stride``. A ``cells x cells`` feature map is probed at its central
    cell; the module's train/eval mode is restored.
    """
    side = cells * stride
    device = next(iter(module.parameters()), torch.empty(0)).device
    params = {k: v.to(device) for k, v in _probe_params(module).items()}
    was_training = module.training
    module.eval()
    try:
        x = torch.full((1, 3, side, side), PROBE_LEVEL, device=device, requires_grad=True)
        with torch.enable_grad():
            features = _features(module, params, x)
            cy, cx = features.shape[-2] // 2, features.shape[-1] // 2
            (grad,) = torch.autograd.grad(features[0, :, cy, cx].sum(), x)
        weight = grad[0].abs().sum(0).double().cpu()
    except (RuntimeError, AssertionError, ValueError) as err:  # e.g. a model with a fixed input size
        weight, reason = None, f"{type(err).__name__}: {err}"
    finally:
        module.train(was_training)
    if weight is not None:
        reason = "no gradient reaches the input"
    if weight is None or not torch.isfinite(weight).all() or float(weight.sum()) <= 0:
        _logger.warning("no receptive-field probe for %s (%s); assuming cell i is centred on pixel %d·i",
                        type(module).__name__, reason, stride)
        return 0.0, 0.0
    pixels = torch.arange(side, dtype=torch.float64)
    wy, wx = weight.sum(1), weight.sum(0)
    dy = float((wy * pixels).sum() / wy.sum()) - cy * stride
    dx = float((wx * pixels).sum() / wx.sum()) - cx * stride
    return round(dy, 2), round(dx, 2)
