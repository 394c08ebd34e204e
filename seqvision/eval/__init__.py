"""Fine-tuning and evaluation, one subpackage per task, each with the same public names.

Every task subpackage offers ``load_config`` (a YAML file or mapping + ``--set`` overrides, checked),
``prepare`` (build and check everything before training: the job), ``run`` (train a prepared job on
the shared loop of ``seqvision.engine``), ``finetune`` (the two in one), ``evaluate`` and
``write_evaluation``:

* :mod:`seqvision.eval.em` - EM neuron segmentation: affinity targets and loss, fine-tuning,
  sliding-window inference (``segment``), watershed and agglomeration, VOI / ARAND, the demo
  (docs/EM.md).
* :mod:`seqvision.eval.video` - video recognition: clip classifiers (LRCN, LightNet video) on
  decord clips, multi-clip evaluation (docs/VIDEO.md).
* :mod:`seqvision.eval.captioning` - image and video captioning: the vocabulary, COCO metrics
  (docs/CAPTIONING.md).
* :mod:`seqvision.eval.classification` - image classification with timm's data pipeline, and the
  classification tools the video pipeline shares (docs/CLASSIFICATION.md).

The datasets they read live in :mod:`seqvision.data`. Import a task as a module,
``from seqvision.eval import video`` then ``video.finetune(...)``: the subpackages are not imported
here, so each pulls in only the extras its task needs.
"""
