"""
machinery/ -- what the scripts need and a learner may skip on first reading. The paper is in the
six files at the repository's root; nothing here is Soft Mixture Denoising.

  checkpoint  a model on disk and a training run's folder: resume, atomic saves, the lock, stops
  cli         flags and their one-line checks, output paths, threads, DDP set-up, CUDA defaults
  data        datasets, training batches, images and .npz files out
  inception   the FID network (a port of the TF Inception) and its weights
  pretrained  DDPM's published weights in diffusers' format
  gmm         a Gaussian mixture's exact answers (toy.py scores against them)
  loop        the small experiments' training loop (toy.py)
  bench       speed: vanilla and SMD side by side    (python -m machinery.bench)
  gpu_check   the whole GPU path in one command      (python -m machinery.gpu_check --out DIR)
"""
