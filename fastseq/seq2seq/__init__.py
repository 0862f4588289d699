"""Attention sequence-to-sequence model on the fused GRU/LSTM kernels.

* :mod:`fastseq.seq2seq.model`: ``Architecture`` (a config's ``model:`` section),
  ``ModelConfig``, ``Seq2Seq``, ``masked_cross_entropy``;
* :mod:`fastseq.seq2seq.search`: greedy search, beam search, sampling;
* :mod:`fastseq.seq2seq.translate`: ``Translator`` (a checkpoint and its tokenizers);
* :mod:`fastseq.seq2seq.eager`: the same decoder on eager torch.nn operations (the baseline);
* :mod:`fastseq.seq2seq.metrics`: sacreBLEU and chrF;
* :mod:`fastseq.seq2seq.task`: ``Seq2SeqConfig``, ``prepare_data``, ``Seq2SeqTask`` and
  ``train``: the seq2seq part of training on :mod:`fastseq.data` and :mod:`fastseq.training`.
"""
