"""Drop-in autograd modules: GRU, LSTM, GRUCell, LSTMCell, AdditiveAttention; patch()/unpatch()."""
from fastseq.nn.attention import AdditiveAttention
from fastseq.nn.cell import GRUCell, LSTMCell
from fastseq.nn.patch import patch, unpatch
from fastseq.nn.rnn import GRU, LSTM

__all__ = ["AdditiveAttention", "GRU", "GRUCell", "LSTM", "LSTMCell", "patch", "unpatch"]
