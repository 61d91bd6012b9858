"""A transcription of the PyTorch reference's pix2pix, for parity tests (not the reference itself).

junyanz/pytorch-CycleGAN-and-pix2pix cannot be installed as a package (and its
data code needs torchvision, which does not run beside the CPU build of torch
2.13 here), so the parts the tests compare against are transcribed from it,
line by line, in PyTorch and PIL:

- ``models/networks.py``: ``get_norm_layer`` (batch, instance, none with its
  ``Identity``), the ``use_bias`` rule of every network, ``init_weights``
  ('normal'), ``get_scheduler`` (the 'linear' ``lambda_rule`` in ``LambdaLR``),
  ``UnetGenerator`` / ``UnetSkipConnectionBlock``, ``ResnetGenerator`` /
  ``ResnetBlock``, ``NLayerDiscriminator``, ``PixelDiscriminator`` and
  ``GANLoss`` (vanilla, lsgan, wgangp).
- ``models/pix2pix_model.py``: ``optimize_parameters`` with ``backward_D``
  and ``backward_G`` (``optimize_parameters`` below).
- ``train.py``: where ``update_learning_rate`` is called (``epoch_learning_rates``).
- ``data/base_dataset.py``: ``get_params``, ``get_transform`` and its
  ``__scale_width``, ``__crop``, ``__flip`` (``reference_params`` /
  ``reference_transform``; torchvision's ``Resize`` of a PIL image is PIL's
  ``resize`` with the same filter).
- ``data/aligned_dataset.py``: ``__getitem__``'s split of an A|B file
  (``split_ab``).

In-place activations included: the in-place LeakyReLU at the top of each U-Net
block rewrites the block's input, so the skip connection carries the
LeakyReLU'd activations (which the up path's ReLU, their only consumer, makes
immaterial: ReLU(LeakyReLU(x)) = ReLU(x)). ``flax_variables`` turns a torch
network's weights and running statistics into the variables of the matching
p2p_jax module.
"""

import functools
import random
import warnings
from typing import Callable, Dict, List, Sequence

import numpy as np
from PIL import Image
import torch
from torch import nn


class Identity(nn.Module):
  def forward(self, x):
    return x


def get_norm_layer(norm_type: str):
  """The reference's norm factories: affine batch norm, plain instance norm, or none."""
  if norm_type == "batch":
    return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
  if norm_type == "instance":
    return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
  if norm_type == "none":
    return lambda x: Identity()
  raise ValueError(f"the torch reference helper has norm 'batch', 'instance' or 'none', got {norm_type!r}")


def _use_bias(norm_layer) -> bool:
  # The reference's test, as written in each network's constructor.
  if isinstance(norm_layer, functools.partial):
    return norm_layer.func == nn.InstanceNorm2d
  return norm_layer == nn.InstanceNorm2d


def init_weights(net: nn.Module, gain: float = 0.02) -> None:
  """The reference's 'normal' init: conv weights N(0, gain), BN scales N(1, gain), biases 0."""
  def init_module(m):
    name = m.__class__.__name__
    if hasattr(m, "weight") and "Conv" in name:
      nn.init.normal_(m.weight.data, 0.0, gain)
      if m.bias is not None:
        nn.init.constant_(m.bias.data, 0.0)
    elif "BatchNorm2d" in name:
      nn.init.normal_(m.weight.data, 1.0, gain)
      nn.init.constant_(m.bias.data, 0.0)
  net.apply(init_module)


class UnetSkipConnectionBlock(nn.Module):
  """One U-Net level: down, the inner levels, up, then the skip concatenation."""

  def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False,
               innermost=False, norm_layer=nn.BatchNorm2d, use_dropout=False):
    super().__init__()
    self.outermost = outermost
    use_bias = _use_bias(norm_layer)
    input_nc = outer_nc if input_nc is None else input_nc
    downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
    downrelu = nn.LeakyReLU(0.2, True)
    uprelu = nn.ReLU(True)
    if outermost:
      upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
      model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
    elif innermost:
      upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
      model = [downrelu, downconv, uprelu, upconv, norm_layer(outer_nc)]
    else:
      upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
      model = [downrelu, downconv, norm_layer(inner_nc), submodule, uprelu, upconv, norm_layer(outer_nc)]
      if use_dropout:
        model.append(nn.Dropout(0.5))
    self.model = nn.Sequential(*model)

  def forward(self, x):
    if self.outermost:
      return self.model(x)
    # ``self.model`` starts with the in-place LeakyReLU, which rewrites ``x``.
    return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
  """``unet_256`` for ``num_downs=8``, built from the innermost block outwards."""

  def __init__(self, input_nc, output_nc, num_downs, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False):
    super().__init__()
    block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer=norm_layer, innermost=True)
    for _ in range(num_downs - 5):
      block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer,
                                      use_dropout=use_dropout)
    block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
    block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
    block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
    self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True,
                                         norm_layer=norm_layer)

  def forward(self, x):
    return self.model(x)


class ResnetBlock(nn.Module):
  """Reflection-padded conv-norm-ReLU-conv-norm with an identity shortcut."""

  def __init__(self, dim, norm_layer, use_dropout, use_bias):
    super().__init__()
    block = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias),
             norm_layer(dim), nn.ReLU(True)]
    if use_dropout:
      block.append(nn.Dropout(0.5))
    block += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias),
              norm_layer(dim)]
    self.conv_block = nn.Sequential(*block)

  def forward(self, x):
    return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
  """``resnet_9blocks`` / ``resnet_6blocks``: two downsamplings, residual blocks, two upsamplings."""

  def __init__(self, input_nc, output_nc, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False, n_blocks=6):
    super().__init__()
    use_bias = _use_bias(norm_layer)
    model = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
             norm_layer(ngf), nn.ReLU(True)]
    for i in range(2):
      mult = 2 ** i
      model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2), nn.ReLU(True)]
    model += [ResnetBlock(ngf * 4, norm_layer, use_dropout, use_bias) for _ in range(n_blocks)]
    for i in range(2):
      mult = 2 ** (2 - i)
      model += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1,
                                   output_padding=1, bias=use_bias),
                norm_layer(ngf * mult // 2), nn.ReLU(True)]
    model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
    self.model = nn.Sequential(*model)

  def forward(self, x):
    return self.model(x)


class NLayerDiscriminator(nn.Module):
  """The PatchGAN; ``n_layers=3`` is the 70x70 one."""

  def __init__(self, input_nc, ndf=64, n_layers=3, norm_layer=nn.BatchNorm2d):
    super().__init__()
    use_bias = _use_bias(norm_layer)
    sequence = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
      prev, mult = mult, min(2 ** n, 8)
      sequence += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                   norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers, 8)
    sequence += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
                 norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
    sequence += [nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1)]
    self.model = nn.Sequential(*sequence)

  def forward(self, x):
    return self.model(x)


class PixelDiscriminator(nn.Module):
  """The 1x1 PixelGAN."""

  def __init__(self, input_nc, ndf=64, norm_layer=nn.BatchNorm2d):
    super().__init__()
    use_bias = _use_bias(norm_layer)
    self.net = nn.Sequential(
        nn.Conv2d(input_nc, ndf, kernel_size=1, stride=1, padding=0), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf, ndf * 2, kernel_size=1, stride=1, padding=0, bias=use_bias), norm_layer(ndf * 2),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 2, 1, kernel_size=1, stride=1, padding=0, bias=use_bias))

  def forward(self, x):
    return self.net(x)


class GANLoss(nn.Module):
  """The reference's GAN objective on logits: ``vanilla`` (BCE with logits), ``lsgan`` (MSE), ``wgangp``."""

  def __init__(self, gan_mode, target_real_label=1.0, target_fake_label=0.0):
    super().__init__()
    self.register_buffer("real_label", torch.tensor(target_real_label))
    self.register_buffer("fake_label", torch.tensor(target_fake_label))
    self.gan_mode = gan_mode
    losses = {"lsgan": nn.MSELoss, "vanilla": nn.BCEWithLogitsLoss, "wgangp": lambda: None}
    if gan_mode not in losses:
      raise ValueError(f"the torch reference helper has gan_mode 'vanilla', 'lsgan' or 'wgangp', got {gan_mode!r}")
    self.loss = losses[gan_mode]()

  def forward(self, prediction, target_is_real):
    if self.gan_mode == "wgangp":
      return -prediction.mean() if target_is_real else prediction.mean()
    target = self.real_label if target_is_real else self.fake_label
    return self.loss(prediction, target.expand_as(prediction))


def set_requires_grad(net: nn.Module, requires_grad: bool) -> None:
  for param in net.parameters():
    param.requires_grad = requires_grad


def optimize_parameters(net_g, net_d, optimizer_g, optimizer_d, criterion_gan, real_a, real_b,
                        lambda_l1: float = 100.0) -> Dict[str, float]:
  """One iteration of ``Pix2PixModel.optimize_parameters`` (``pool_size=0``).

  G's forward once; D's update on the detached fake pair, then the real pair,
  loss halved; G's update on GAN + ``lambda_l1`` * L1 through the updated D.
  Returns the reference's losses, ``g_l1`` already weighted as it logs it.
  """
  fake_b = net_g(real_a)

  set_requires_grad(net_d, True)
  optimizer_d.zero_grad()
  pred_fake = net_d(torch.cat((real_a, fake_b), 1).detach())
  loss_d_fake = criterion_gan(pred_fake, False)
  pred_real = net_d(torch.cat((real_a, real_b), 1))
  loss_d_real = criterion_gan(pred_real, True)
  loss_d = (loss_d_fake + loss_d_real) * 0.5
  loss_d.backward()
  optimizer_d.step()

  set_requires_grad(net_d, False)
  optimizer_g.zero_grad()
  pred_fake = net_d(torch.cat((real_a, fake_b), 1))
  loss_g_gan = criterion_gan(pred_fake, True)
  loss_g_l1 = nn.functional.l1_loss(fake_b, real_b) * lambda_l1
  loss_g = loss_g_gan + loss_g_l1
  loss_g.backward()
  optimizer_g.step()
  return dict(d_real=loss_d_real.item(), d_fake=loss_d_fake.item(), d_loss=loss_d.item(),
              g_gan=loss_g_gan.item(), g_l1=loss_g_l1.item(), g_loss=loss_g.item())


def linear_scheduler(optimizer, n_epochs: int, n_epochs_decay: int, epoch_count: int = 1):
  """``get_scheduler`` for ``lr_policy='linear'``: ``LambdaLR`` with the reference's ``lambda_rule``."""
  def lambda_rule(epoch):
    return 1.0 - max(0, epoch + epoch_count - n_epochs) / float(n_epochs_decay + 1)
  return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda_rule)


def epoch_learning_rates(lr: float, n_epochs: int, n_epochs_decay: int, update: str) -> List[float]:
  """The rate each epoch runs at when ``train.py`` calls ``update_learning_rate`` at its ``update``.

  Drives a real optimizer and ``LambdaLR`` in the reference's call order:
  ``"start_of_epoch"`` as its train.py does now, ``"end_of_epoch"`` as it did
  before 2020. Each epoch's rate is read where its iterations would run.
  """
  optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
  scheduler = linear_scheduler(optimizer, n_epochs, n_epochs_decay)
  rates = []
  with warnings.catch_warnings():
    # Stepping the scheduler before the first optimizer step, as the reference
    # does at the start of its first epoch, makes torch warn.
    warnings.simplefilter("ignore", UserWarning)
    for _ in range(1, n_epochs + n_epochs_decay + 1):
      if update == "start_of_epoch":
        scheduler.step()
      rates.append(optimizer.param_groups[0]["lr"])  # The epoch's iterations run here.
      optimizer.step()
      if update == "end_of_epoch":
        scheduler.step()
  return rates


def split_ab(ab: Image.Image):
  """``aligned_dataset.__getitem__``: A is the left half, B the rest (the odd column included)."""
  w, h = ab.size
  w2 = int(w / 2)
  return ab.crop((0, 0, w2, h)), ab.crop((w2, 0, w, h))


def reference_params(preprocess: str, load_size: int, crop_size: int, size, rng: random.Random):
  """``base_dataset.get_params``: the crop position and the flip, drawn as the reference draws them."""
  w, h = size
  new_h, new_w = h, w
  if preprocess == "resize_and_crop":
    new_h = new_w = load_size
  elif preprocess == "scale_width_and_crop":
    new_w = load_size
    new_h = load_size * h // w
  x = rng.randint(0, np.maximum(0, new_w - crop_size))
  y = rng.randint(0, np.maximum(0, new_h - crop_size))
  flip = rng.random() > 0.5
  return {"crop_pos": (x, y), "flip": flip}


def reference_transform(img: Image.Image, params, preprocess: str, load_size: int, crop_size: int,
                        no_flip: bool = False) -> np.ndarray:
  """``base_dataset.get_transform`` with ``params``: resize, crop, flip, then [-1, 1] (HWC float32)."""
  if "resize" in preprocess:
    img = img.resize((load_size, load_size), Image.BICUBIC)
  elif "scale_width" in preprocess:
    ow, oh = img.size
    if not (ow == load_size and oh >= crop_size):
      img = img.resize((load_size, int(max(load_size * oh / ow, crop_size))), Image.BICUBIC)
  if "crop" in preprocess:
    ow, oh = img.size
    x1, y1 = params["crop_pos"]
    if ow > crop_size or oh > crop_size:
      img = img.crop((x1, y1, x1 + crop_size, y1 + crop_size))
  if not no_flip and params["flip"]:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(img, np.float32) / 127.5 - 1.0


class GivenDropout(nn.Module):
  """A stand-in for ``nn.Dropout(0.5)`` that applies a mask set from outside (already scaled by 1/0.5)."""

  def __init__(self):
    super().__init__()
    self.mask = None

  def forward(self, x):
    return x * self.mask


def give_dropout_masks(net: nn.Module) -> List[GivenDropout]:
  """Replaces ``net``'s ``nn.Dropout`` modules by ``GivenDropout``s; returns them in forward order.

  For the U-Net, ``modules()`` order is forward order: each block's dropout
  comes after its submodule's.
  """
  dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
  parents = {id(child): (module, name) for module in net.modules() for name, child in module.named_children()}
  given = []
  for dropout in dropouts:
    module, name = parents[id(dropout)]
    given.append(GivenDropout())
    setattr(module, name, given[-1])
  return given


# Names of p2p_jax's layers in the order the torch reference runs them (which is
# the order of ``nn.Module.modules()`` for these networks): every conv and norm.

def unet_layer_names(num_downs: int) -> List[str]:
  inner = range(1, num_downs - 1)
  down = ["down_0"] + [f"{kind}_{i}" for i in inner for kind in ("down", "down_norm")]
  up = [f"{kind}_{i}" for i in reversed(range(1, num_downs)) for kind in ("up", "up_norm")]
  return down + [f"down_{num_downs - 1}"] + up + ["up_0"]


def resnet_layer_names(n_blocks: int) -> List[str]:
  names = ["stem", "stem_norm", "down_0", "down_norm_0", "down_1", "down_norm_1"]
  names += [f"block_{b}_{kind}_{i}" for b in range(n_blocks) for i in range(2) for kind in ("conv", "norm")]
  return names + ["up_0", "up_norm_0", "up_1", "up_norm_1", "head"]


def patch_layer_names(n_layers: int) -> List[str]:
  depth = max(n_layers, 1)  # The PixelGAN has one normed conv in the middle, like n_layers=1.
  normed = [f"{kind}_{i}" for i in range(1, depth + 1) for kind in ("conv", "norm")]
  return ["conv_0"] + normed + [f"conv_{depth + 1}"]


_LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d)


def _numpy(tensor: torch.Tensor, *axes: int) -> np.ndarray:
  return tensor.detach().cpu().numpy().transpose(axes or None).copy()


def flax_variables(net: nn.Module, names: Sequence[str],
                   tensor: Callable[[torch.Tensor], torch.Tensor] = lambda param: param) -> Dict[str, dict]:
  """``net``'s weights and running statistics as p2p_jax variables.

  The torch layers pair with ``names`` in order. Conv2d weights
  ``(out, in, kh, kw)`` become HWIO kernels, ConvTranspose2d weights
  ``(in, out, kh, kw)`` become ``(in, kh, kw, out)``, and a BatchNorm2d becomes
  the ``bn`` child of the named ``Norm``. Instance norm holds no variables.
  ``tensor`` maps each parameter to what is laid out in its place (e.g. its
  Adam moment: ``lambda p: optimizer.state[p]["exp_avg"]``).
  """
  torch_layers = [m for m in net.modules() if isinstance(m, _LAYER_TYPES)]
  if len(torch_layers) != len(names):
    raise ValueError(f"{type(net).__name__} has {len(torch_layers)} conv and norm layers, "
                     f"but {len(names)} names were given: {list(names)}")
  params, batch_stats = {}, {}
  for name, layer in zip(names, torch_layers):
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
      axes = (2, 3, 1, 0) if isinstance(layer, nn.Conv2d) else (0, 2, 3, 1)
      params[name] = {"kernel": _numpy(tensor(layer.weight), *axes)}
      if layer.bias is not None:
        params[name]["bias"] = _numpy(tensor(layer.bias))
    elif isinstance(layer, nn.BatchNorm2d):
      params[name] = {"bn": {"scale": _numpy(tensor(layer.weight)), "bias": _numpy(tensor(layer.bias))}}
      batch_stats[name] = {"bn": {"mean": _numpy(layer.running_mean), "var": _numpy(layer.running_var)}}
  return {"params": params, "batch_stats": batch_stats}
