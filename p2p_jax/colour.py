"""CIE Lab for the reference's colorization mode: L in, ab out, RGB rebuilt from both.

As the reference's ``ColorizationDataset`` and ``ColorizationModel``
(skimage's ``rgb2lab``/``lab2rgb``: sRGB, D65 white): the model's input is
``L / 50 - 1`` and its target ``ab / 110``, both in [-1, 1]. TF ops, so the
input pipeline runs them in its graph and evaluate/translate eagerly on arrays.
"""

import numpy as np
import tensorflow as tf

L_SCALE, AB_SCALE = 50.0, 110.0  # the reference's L / 50 - 1 and ab / 110
_WHITE = (0.95047, 1.0, 1.08883)  # D65, skimage's default illuminant
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))  # skimage's xyz_from_rgb
_XYZ_TO_RGB = tuple(map(tuple, np.linalg.inv(np.asarray(_RGB_TO_XYZ)).tolist()))
_EPSILON = (6 / 29) ** 3


def rgb_to_lab(rgb: tf.Tensor) -> tf.Tensor:
  """sRGB in [0, 1] (..., 3) to CIE Lab: L in [0, 100], a and b about [-110, 110]."""
  rgb = tf.convert_to_tensor(rgb, tf.float32)
  linear = tf.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = tf.linalg.matvec(tf.constant(_RGB_TO_XYZ), linear) / tf.constant(_WHITE)
  f = tf.where(xyz > _EPSILON, tf.math.pow(tf.maximum(xyz, _EPSILON), 1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
  fx, fy, fz = tf.unstack(f, axis=-1)
  return tf.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: tf.Tensor) -> tf.Tensor:
  """CIE Lab to sRGB in [0, 1], clipped where a colour is out of gamut."""
  lab = tf.convert_to_tensor(lab, tf.float32)
  l, a, b = tf.unstack(lab, axis=-1)
  fy = (l + 16) / 116
  f = tf.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
  xyz = tf.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * tf.constant(_WHITE)
  linear = tf.clip_by_value(tf.linalg.matvec(tf.constant(_XYZ_TO_RGB), xyz), 0.0, 1.0)
  return tf.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)


def to_model(rgb: tf.Tensor):
  """``(L, ab)`` in the model's [-1, 1] units from sRGB in [0, 1]."""
  lab = rgb_to_lab(rgb)
  return lab[..., :1] / L_SCALE - 1.0, lab[..., 1:] / AB_SCALE


def to_rgb(l, ab) -> np.ndarray:
  """The RGB image, in [-1, 1], of the model's ``L`` (..., 1) and ``ab`` (..., 2) in [-1, 1]."""
  lab = tf.concat([(tf.convert_to_tensor(l, tf.float32) + 1.0) * L_SCALE,
                   tf.convert_to_tensor(ab, tf.float32) * AB_SCALE], axis=-1)
  return (lab_to_rgb(lab) * 2.0 - 1.0).numpy()
