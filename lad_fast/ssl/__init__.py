"""Self-supervised pretraining of the segmenter's U-Net on real + synthetic volumes, and few-label
fine-tuning: the downstream task Lad's synthetic data is for.

* :mod:`lad_fast.ssl.objectives`: rotation prediction and masked-volume inpainting (pure functions);
* :mod:`lad_fast.ssl.network`: the pretraining network (the segmenter's U-Net plus a rotation head) and
  the transfer of its weights into a fresh segmenter;
* :mod:`lad_fast.ssl.data`: the pretraining pool, real prepared cases mixed with generated folders;
* :mod:`lad_fast.ssl.settings`: the method's settings and the training budgets per preset;
* :mod:`lad_fast.ssl.stats`: the benchmark's per-seed case draws, paired bootstrap intervals and the
  fraction of an oracle's gain an arm recovers (pure functions).

Training itself (:mod:`lad_fast.train.ssl`) uses the shared loop, like every trained model.
"""
