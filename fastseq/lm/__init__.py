"""The RNN language model and text generation (character, word or subword level).

* :mod:`fastseq.lm.model`: ``LanguageModel`` (embedding, N-layer fastseq LSTM/GRU,
  output layer, weight tying), its config, the carried state;
* :mod:`fastseq.lm.generate`: ``TextGenerator``: a prompt in one call, then one
  fused step per token; temperature, top-k, top-p, greedy; streaming; stop strings;
* :mod:`fastseq.lm.task`: ``LMTrainConfig`` and ``LMTask`` for the shared trainer
  (:mod:`fastseq.training`): truncated BPTT over contiguous streams, validation in
  nats per token, bits per character and perplexity.

    fastseq train --config shakespeare-char-cpu --out runs/shakespeare
    fastseq generate runs/shakespeare/best.pt --prompt "ROMEO:" --temperature 0.8
"""
