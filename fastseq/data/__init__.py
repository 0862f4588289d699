"""Data shared by fastseq's models: text files, corpora, tokenizers, shards and batches.

Modules, bottom up (each imports only those above it, and :mod:`fastseq.fileio`):

* :mod:`fastseq.data.lines`: text files line by line (plain or gzip, UTF-8 errors naming the
  file and line), whole or streamed, and bounded random samples of them;
* :mod:`fastseq.data.corpus`: parallel corpora on disk (``load_corpus``), the embedded Multi30k;
* :mod:`fastseq.data.tokenizer`: sentencepiece ``Tokenizer``, ``train_tokenizer`` and its cache,
  the special ids (pad=0, unk=1, bos=2, eos=3);
* :mod:`fastseq.data.prepared`: prepared-data directories reused only with the same settings;
* :mod:`fastseq.data.shards`: ``preprocess`` a parallel corpus into token-id shards,
  ``ShardedCorpus`` to read them;
* :mod:`fastseq.data.batching`: ``Batch``, ``collate``, token-budget packing,
  ``TokenBatchSampler`` (in memory) and ``StreamingBatches`` (from shards).

Nothing here depends on a model or on :mod:`fastseq.training`. The ``multi30k/`` folder is
package data (the corpus files), not a module.
"""
