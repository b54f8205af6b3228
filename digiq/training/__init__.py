"""The training toolkit every trainer shares (train-critic, finetune-vlm, train-bc, extract-policy).

One place for what a trainer needs besides its model and loss:

* :mod:`digiq.training.accelerator`: the one place accelerate is configured;
* :mod:`digiq.training.output`: the output-folder rule (refuse a used folder unless ``--resume`` or
  ``overwrite=true``) and the completion marker;
* :mod:`digiq.training.checkpoint`: one checkpoint layout (``checkpoints/step-N/``: weights, optimizer,
  scheduler, RNG and data position as safetensors + JSON, no pickles) and bitwise ``--resume``;
* :mod:`digiq.training.schedule`: one learning-rate schedule (warm-up, then constant / linear / cosine);
* :mod:`digiq.training.data_order`: the deterministic per-epoch shuffle a resumed run replays;
* :mod:`digiq.training.policy_loop`: the generative-policy training loop of train-bc and extract-policy;
* :mod:`digiq.training.critic_learner`: the critic as a learner (twin Q/V heads, EMA targets, Adam) and its
  pure objectives (TD, MC, target pairing, dueling, no-op backup); :mod:`digiq.training.critic_data` stages
  train-critic's tensors and samples its batches, :mod:`digiq.training.critic_metrics` scores a critic on
  held-out rows (exact Q* on simulated data);
* :mod:`digiq.training.memory`: the real-size (7B) models on the meta device and a per-GPU memory estimate.

Stages import this package; it imports ``data``, ``models``, ``utils`` and (for the critic's exact-Q*
validation) ``sim`` only, never a stage.
"""
