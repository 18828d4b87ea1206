"""Recurrent sequence models: an RNN/LSTM/GRU trunk and one of three heads.

The hidden state is an explicit input and output of `forward`, exactly as in the
exported ONNX graph: the caller decides whether it starts at zeros or carries on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

CELLS = ("rnn", "lstm", "gru")
HEADS = ("lm", "tagger", "classifier")

State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each (L, B, H)


@dataclass
class ModelConfig:
    cell: str = "lstm"
    head: str = "lm"
    input_kind: str = "tokens"  # "tokens" (ids, embedded) or "features" (real vectors)
    vocab_size: int = 98  # token inputs: size of the input vocabulary
    feature_dim: int = 8  # feature inputs: width of each step's vector
    embed_dim: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0  # between stacked layers, training only
    classes: int = 98  # width of the head's output (vocabulary for lm, labels otherwise)

    def to_dict(self) -> dict:
        return asdict(self)


class SequenceModel(nn.Module):
    """tokens (B, T) or features (B, T, D) plus state -> logits (B, T, C) and new state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.cell not in CELLS or config.head not in HEADS:
            raise ValueError(f"cell must be one of {CELLS} and head one of {HEADS}")
        self.config = config
        if config.input_kind == "tokens":
            self.embed: nn.Embedding | None = nn.Embedding(config.vocab_size, config.embed_dim)
            in_dim = config.embed_dim
        elif config.input_kind == "features":
            self.embed = None
            in_dim = config.feature_dim
        else:
            raise ValueError(f"unknown input kind {config.input_kind!r}")
        rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        extra = {"nonlinearity": "tanh"} if config.cell == "rnn" else {}
        self.rnn = rnn_cls(
            in_dim,
            config.hidden,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
            **extra,
        )
        self.head = nn.Linear(config.hidden, config.classes)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.config.cell == "lstm" else ("h",)

    def initial_state(self, batch: int) -> State:
        shape = (self.config.layers, batch, self.config.hidden)
        device = self.head.weight.device
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if self.embed is not None:
            x = self.embed(x)  # (B, T, E)
        if state is None:
            state = self.initial_state(x.shape[0])
        rnn_state = state if self.config.cell == "lstm" else state[0]
        y, new = self.rnn(x, rnn_state)  # (B, T, H)
        new_state: State = tuple(new) if self.config.cell == "lstm" else (new,)
        return self.head(y), new_state  # (B, T, C)


def detach(state: State) -> State:
    return tuple(s.detach() for s in state)
