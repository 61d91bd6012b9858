"""The paper's and the reference's pix2pix settings (facades, 256 px, batch 1)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # Data: "pix2pix/<name>" (TFDS), a folder in the pix2pix layout, or "synthetic".
  config.dataset = "pix2pix/facades"
  config.data_dir = ""  # TFDS data dir and synthetic cache; "" = the library default.
  config.verify_checksums = True  # Check a paper dataset's archive before building it.
  config.train_split = "train"
  config.eval_split = "test"
  config.direction = "AtoB"
  config.preprocess = "resize_and_crop"  # resize_and_crop | crop | scale_width | none
  config.load_size = 286
  config.crop_size = 256
  config.no_flip = False
  config.cache = False
  config.skip_bad_files = False
  config.batch_size = 1
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.generator = "unet"  # unet | resnet
  config.model.num_downs = 8  # 8: unet_256, 7: unet_128
  config.model.n_blocks = 9  # resnet_9blocks | resnet_6blocks
  config.model.ngf = 64
  config.model.ndf = 64
  config.model.n_layers_d = 3  # 0: PixelGAN, 1: 16x16, 3: 70x70, 5: 286x286 ImageGAN
  config.model.norm = "batch"  # batch | instance | none
  config.model.use_dropout = True
  # pmap only: batch norm over the whole batch instead of each device's share.
  # experiments.train (jit over a device mesh) always normalises over the global batch.
  config.model.sync_batch_stats = False
  config.model.dtype = "float32"  # compute dtype; parameters and losses stay float32
  # Formulations (same parameters; "auto" picks per backend as measured in
  # BENCHMARKS.md): convs auto | xla | matmul, transposed convs auto | conv_transpose | matmul.
  config.model.conv_impl = "auto"
  config.model.upconv_impl = "auto"

  config.loss = ml_collections.ConfigDict()
  config.loss.gan_mode = "vanilla"  # vanilla | lsgan | hinge
  config.loss.lambda_l1 = 100.0

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4
  config.optim.b1 = 0.5
  config.optim.b2 = 0.999
  config.optim.n_epochs = 100  # epochs at the initial rate
  config.optim.n_epochs_decay = 100  # epochs of linear decay to zero

  config.num_epochs = config.optim.get_ref("n_epochs") + config.optim.get_ref("n_epochs_decay")
  config.num_train_steps = -1  # > 0 overrides num_epochs
  # Steps in one epoch of the training split; experiments.train fills it in.
  config.steps_per_epoch = -1

  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.sample_every_steps = 1000
  config.keep_checkpoints = 3
  config.num_sample_images = 4
  return config
