"""Training shared by every fastseq model: the loop, its faults, checkpoints and logs.

A model plugs in with a :class:`~fastseq.training.task.Task` (its data, model,
loss and evaluation) and a :class:`~fastseq.training.config.TrainConfig`
subclass (its config fields, its model's settings nested as ``model``);
:func:`fastseq.training.trainer.train` runs it. Modules, bottom up:

* :mod:`fastseq.training.schedule`: learning-rate warm-up, decay and plateau factor;
* :mod:`fastseq.training.precision`: fp32 / bf16 / fp16 autocast and the GradScaler;
* :mod:`fastseq.training.distributed`: the device, torchrun process groups (gloo/NCCL), collectives;
* :mod:`fastseq.training.state`: ``TrainState``, the run's position (saved in ``last.pt``);
* :mod:`fastseq.training.faults`: non-finite updates (skip/stop), SIGINT/SIGTERM,
  ``TrainingError``, ``TrainingInterrupted``;
* :mod:`fastseq.training.config`: ``TrainConfig``, nested sections, dotted keys;
* :mod:`fastseq.training.checkpoint`: atomic checkpoints with a digest, ``last.prev.pt``
  fallback for ``--resume``, RNG states;
* :mod:`fastseq.training.evaluation`: when to evaluate/save, best score, early stopping,
  best-K checkpoint retention;
* :mod:`fastseq.training.runlog`: CSV logs and the curves PNG;
* :mod:`fastseq.training.task`: the ``Task`` interface and the ``Runtime`` it gets;
* :mod:`fastseq.training.trainer`: ``Trainer`` and ``train(task, resume)``.

Nothing here imports a model package (:mod:`fastseq.seq2seq`, ...).
"""
