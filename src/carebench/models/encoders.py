"""Unimodal encoders shared by the methods: EHR LSTM, EHR Transformer, grayscale CXR ResNet (torchvision).

Why one module: every fusion method in the benchmark needs the same few encoders, and differences between methods
should come from the fusion mechanism, not from subtly different copies of an LSTM (the reference toolkit had five
identical copies). Encoders return features; heads and fusion belong to the methods.

EHR input is ``concat(ehr, ehr_mask)`` (``ehr_input``): the mask tells the model which hourly values were observed
and which were imputed, which carries signal in ICU data (measurement frequency reflects clinical concern).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from torchvision.models.resnet import BasicBlock

from carebench.errors import UserError
from carebench.models.base import ModelConfigError, masked_mean

# Encoder hyper-parameters (and their defaults: the reference setting) shared by the methods that pair a
# Transformer EHR encoder with an ImageNet ResNet-50 (latefusion, daft, aug, inforeg). Each spreads them into its
# own default_hparams, so the keys and defaults are defined once.
TRANSFORMER_RESNET_DEFAULTS: dict[str, object] = {
    "ehr_encoder": "transformer",
    "ehr_hidden": 256,
    "ehr_layers": 1,
    "ehr_heads": 4,
    "ehr_dropout": 0.2,
    "cxr_backbone": "resnet50",
    "cxr_pretrained": "imagenet",
}
# The X-ray encoder of every fusion method's `quick` preset (small, from scratch, no download; docs/methods.md,
# "resnet_small") and of its `test` preset. Spread into each method's presets so the choice is made here once.
CXR_QUICK: dict[str, object] = {"cxr_backbone": "resnet_small", "cxr_pretrained": "none"}
CXR_TEST: dict[str, object] = {"cxr_backbone": "resnet_tiny", "cxr_pretrained": "none"}


class PretrainedWeightsError(UserError):
    """Image-encoder weights could not be obtained or do not fit the architecture."""


def ehr_input(batch: dict[str, Tensor]) -> Tensor:
    """``[B,T,2F]``: values and observation mask side by side."""
    return torch.cat([batch["ehr"], batch["ehr_mask"].to(batch["ehr"].dtype)], dim=-1)


def padding_mask(lengths: Tensor | None, steps: int) -> Tensor | None:
    """``[B,T]`` bool, True at padded steps (PyTorch's ``src_key_padding_mask`` convention), or None."""
    if lengths is None:
        return None
    positions = torch.arange(steps, device=lengths.device)
    return positions[None, :] >= lengths[:, None]


def pool_steps(h: Tensor, pad: Tensor | None) -> Tensor:
    """Mean over time of ``h [B,T,D]`` using only the valid steps (``pad`` True at padded steps, as
    ``padding_mask`` returns it; None = every step).

    The reference toolkit built its pooling weights by comparing a 0/1 tensor with -inf, so padded steps were
    averaged in; here padded steps get weight exactly 0 (``base.masked_mean``).
    """
    return masked_mean(h, None if pad is None else ~pad, dim=1)


class EHRLSTMEncoder(nn.Module):
    """``[B,T,n_inputs]`` -> last hidden state of the top LSTM layer (both directions concatenated).

    ``project_input`` adds the reference toolkit's ``Linear(n_inputs -> hidden)`` before the LSTM; MedFuse feeds
    the inputs to the LSTM directly. Initialisation follows MedFuse (Xavier input weights, orthogonal recurrent
    weights, zero biases), which keeps the recurrent dynamics well conditioned at the start of training.
    ``lengths`` (optional ``[B]``) packs the sequences so padded steps never enter the state.
    """

    def __init__(
        self,
        n_inputs: int,
        hidden: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        project_input: bool = True,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(n_inputs, hidden) if project_input else nn.Identity()
        self.lstm = nn.LSTM(
            hidden if project_input else n_inputs,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.directions = 2 if bidirectional else 1
        self.out_dim = hidden * self.directions
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(param)
            else:
                nn.init.zeros_(param)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = self.proj(x)
        if lengths is not None:
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(x)
        return torch.cat(list(h_n[-self.directions :]), dim=-1)


class LearnedPositions(nn.Module):
    """Learned absolute position embedding (initialised U(-0.1, 0.1), as in DrFuse and the reference)."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.empty(1, max_len, d_model).uniform_(-0.1, 0.1))

    def forward(self, x: Tensor) -> Tensor:
        if x.size(1) > self.pe.size(1):
            raise ModelConfigError(f"sequence of {x.size(1)} steps exceeds max_len={self.pe.size(1)}")
        return x + self.pe[:, : x.size(1)]


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position encoding (Vaswani et al. 2017); no parameters, any length up to max_len."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * freq)
        pe[:, 1::2] = torch.cos(position * freq[: d_model // 2])
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.size(1) > self.pe.size(1):
            raise ModelConfigError(f"sequence of {x.size(1)} steps exceeds max_len={self.pe.size(1)}")
        return x + self.pe[:, : x.size(1)].to(x.dtype)


def positions(kind: str, d_model: int, max_len: int) -> nn.Module:
    if kind == "learned":
        return LearnedPositions(d_model, max_len)
    if kind == "sinusoidal":
        return SinusoidalPositions(d_model, max_len)
    raise ModelConfigError(f"positional encoding must be 'learned' or 'sinusoidal', got {kind!r}")


def transformer_stack(
    d_model: int, n_heads: int, n_layers: int, ff_dim: int, dropout: float
) -> nn.TransformerEncoder:
    """Post-LN ``nn.TransformerEncoder`` (ReLU, batch_first). Nested tensors are disabled so padded and unpadded
    batches follow the same numerical path (needed for bit-exact invariance tests)."""
    if d_model % n_heads:
        raise ModelConfigError(f"d_model={d_model} must be divisible by the number of heads ({n_heads})")
    layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class EHRTransformerEncoder(nn.Module):
    """``[B,T,n_inputs]`` -> ``Linear`` + positions -> ``nn.TransformerEncoder`` -> masked mean over valid steps.

    ``lengths`` (optional ``[B]``) becomes the ``src_key_padding_mask`` and the pooling mask, so padded steps are
    neither attended to nor averaged.
    """

    def __init__(
        self,
        n_inputs: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        dropout: float,
        ff_dim: int,
        positional: str = "learned",
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(n_inputs, d_model)
        self.pos = positions(positional, d_model, max_len)
        self.encoder = transformer_stack(d_model, n_heads, n_layers, ff_dim, dropout)
        self.out_dim = d_model

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        pad = padding_mask(lengths, x.size(1))
        h = self.encoder(self.pos(self.proj(x)), src_key_padding_mask=pad)
        return pool_steps(h, pad)


EHR_ENCODERS = ("lstm", "transformer")


def build_ehr_encoder(
    kind: str, n_inputs: int, hidden: int, layers: int, heads: int, dropout: float
) -> EHRLSTMEncoder | EHRTransformerEncoder:
    """The EHR encoder a fusion method asks for by name ("lstm" unidirectional, or "transformer" with 4x FFN)."""
    if kind == "lstm":
        return EHRLSTMEncoder(n_inputs, hidden, num_layers=layers, dropout=dropout)
    if kind == "transformer":
        return EHRTransformerEncoder(n_inputs, hidden, heads, layers, dropout, ff_dim=4 * hidden)
    raise ModelConfigError(f"EHR encoder must be one of {list(EHR_ENCODERS)}, got {kind!r}")


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..layer4 of ``BasicBlock``, avgpool, fc) with
    widths 8/16/32/64 and one block per stage (~0.1 M parameters).

    Not a published architecture and without pretrained weights: it exists so contract tests and CPU smoke runs
    exercise exactly the code path of the real ResNets (stages, stem sharing, state_dict loading) in milliseconds.
    """

    def __init__(self, weights: Any = None, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != width:
                down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, width, stride, down)))
            inplanes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# arch -> (constructor, torchvision ImageNet weights or None, feature width, stage widths)
_RESNETS: dict[str, tuple[Any, Any, int, list[int]]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512, [64, 64, 128, 256, 512]),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 512, [64, 64, 128, 256, 512]),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 2048, [64, 256, 512, 1024, 2048]),
    "resnet_tiny": (TinyResNet, None, 64, [8, 8, 16, 32, 64]),
    "resnet_small": (
        functools.partial(TinyResNet, widths=(16, 32, 64, 128)),
        None,
        128,
        [16, 16, 32, 64, 128],
    ),
}
RESNET_ARCHS = tuple(_RESNETS)


def _grayscale_state(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Adapt a torchvision ResNet state_dict to a 1-channel input and no classifier.

    The RGB filters of conv1 are summed: a grayscale image repeated over three channels gives exactly the same
    conv1 response as the summed filter on one channel, so the pretrained features are preserved.
    """
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in state:
        raise PretrainedWeightsError(
            f"{source}: no 'conv1.weight' key; expected a torchvision ResNet state_dict"
        )
    w = state["conv1.weight"]
    if w.dim() != 4 or w.size(1) not in (1, 3):
        raise PretrainedWeightsError(
            f"{source}: conv1.weight has shape {tuple(w.shape)}; expected [64, 1|3, 7, 7]"
        )
    if w.size(1) == 3:
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    return state


class ResNetEncoder(nn.Module):
    """Grayscale torchvision ResNet-18/34/50 (or ``TinyResNet``) -> global-average-pooled features ``[B, out_dim]``.

    pretrained: ``"none"`` (random init), ``"imagenet"`` (torchvision's ImageNet weights via its weights API:
    ResNet-50 ``IMAGENET1K_V2``, ResNet-18/34 ``IMAGENET1K_V1``; downloaded once into the torch hub cache) or a path
    to a local torchvision-style ``state_dict`` (``.pt``/``.pth``; 1- or 3-channel conv1, ``fc.*`` ignored), e.g.
    a radiograph-pretrained model. ``stages()`` gives the stem and layer1..layer4 for intermediate fusion.
    """

    def __init__(self, arch: str = "resnet50", pretrained: str = "none") -> None:
        super().__init__()
        if arch not in _RESNETS:
            raise ModelConfigError(f"CXR backbone must be one of {list(_RESNETS)}, got {arch!r}")
        ctor, weights, self.out_dim, self._stage_channels = _RESNETS[arch]
        net = ctor(weights=None)
        net.conv1 = nn.Conv2d(1, net.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.arch = arch
        if pretrained == "imagenet" and weights is None:
            raise PretrainedWeightsError(f"pretrained='imagenet': there are no ImageNet weights for {arch!r}")
        if pretrained == "imagenet":
            try:
                state = weights.get_state_dict(progress=False, check_hash=True)
            except Exception as err:  # network, cache or hash failure: the user must act, say how
                raise PretrainedWeightsError(
                    f"pretrained='imagenet': could not load torchvision {weights} from {weights.url} ({err}); "
                    "use pretrained='none' or a path to a local state_dict"
                ) from err
            self._load(_grayscale_state(state, str(weights)), str(weights))
        elif pretrained != "none":
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise PretrainedWeightsError(
                    f"pretrained={pretrained!r}: no such file; expected 'none', 'imagenet' or a state_dict path"
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise PretrainedWeightsError(
                    f"{path}: expected a state_dict (dict of tensors), got {type(state)}"
                )
            self._load(_grayscale_state(state, str(path)), str(path))

    def _load(self, state: dict[str, Tensor], source: str) -> None:
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise PretrainedWeightsError(
                f"{source}: does not fit a grayscale {self.arch}: {' '.join(x.strip() for x in first[:3])[:300]}"
            ) from None

    def stem(self) -> nn.Sequential:
        """conv1 -> bn1 -> relu -> maxpool (a view on this encoder's modules, no new parameters)."""
        n = self.net
        return nn.Sequential(n.conv1, n.bn1, n.relu, n.maxpool)

    def body(self) -> nn.Sequential:
        """layer1..layer4 -> global average pool -> flatten (a view, no new parameters)."""
        n = self.net
        return nn.Sequential(n.layer1, n.layer2, n.layer3, n.layer4, n.avgpool, nn.Flatten(1))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``[("stem", ...), ("layer1", ...), ..., ("layer4", ...)]`` applied in order; follow with ``pool``.

        Intermediate-fusion methods (MMTM, DAFT) run these one at a time and modulate the feature maps in between.
        """
        n = self.net
        return [
            ("stem", self.stem()),
            ("layer1", n.layer1),
            ("layer2", n.layer2),
            ("layer3", n.layer3),
            ("layer4", n.layer4),
        ]

    @property
    def stage_channels(self) -> list[int]:
        """Channels after each of ``stages()``."""
        return list(self._stage_channels)

    def pool(self, fmap: Tensor) -> Tensor:
        return torch.flatten(self.net.avgpool(fmap), 1)

    def feature_map(self, x: Tensor, n_stages: int = 5) -> Tensor:
        """The feature map ``[n, C, H', W']`` after the first ``n_stages`` of ``stages()`` (5: layer4, before
        pooling), for methods whose X-ray tokens are its cells (HEALNet, UMSE)."""
        with batchnorm_safe(self, x):
            for _, stage in self.stages()[:n_stages]:
                x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        with batchnorm_safe(self, x):
            return self.net(x)


def transformer_resnet_encoders(model: Any) -> tuple[EHRLSTMEncoder | EHRTransformerEncoder, ResNetEncoder]:
    """The EHR and X-ray encoders of a method whose hyper-parameters hold the `TRANSFORMER_RESNET_DEFAULTS` keys
    (``model`` is the ``BaseModel`` being built: its ``hparams``, ``n_features`` and ``choice`` are read).

    The EHR encoder is built first and the ResNet second, always: with a seeded initialisation the order in which
    parameters are created is part of a run's result.
    """
    h = model.hparams
    ehr = build_ehr_encoder(
        model.choice("ehr_encoder", EHR_ENCODERS),
        2 * model.n_features,
        h["ehr_hidden"],
        h["ehr_layers"],
        h["ehr_heads"],
        h["ehr_dropout"],
    )
    cxr = ResNetEncoder(model.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
    return ehr, cxr


@contextmanager
def batchnorm_safe(module: nn.Module, images: Tensor) -> Iterator[None]:
    """Let a training-mode CNN take a batch of one small image.

    Batch norm in training needs more than one value per channel; a single image of <= 32 px ends layer4 at 1x1
    and would raise. Such a step (one X-ray in the batch, tiny test-size images) normalises with the running
    statistics instead, as in evaluation; larger images or batches are untouched.
    """
    frozen = []
    if module.training and images.size(0) == 1 and min(images.shape[-2:]) <= 32:
        frozen = [
            m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
    for m in frozen:
        m.eval()
    try:
        yield
    finally:
        for m in frozen:
            m.train()


def encode_present(encoder: nn.Module, images: Tensor, present: Tensor, out_dim: int) -> Tensor:
    """Features ``[B, out_dim]`` of the present images, exact zeros for missing ones.

    Only the present images go through the encoder, so a missing image's pixels cannot leak into other samples
    through batch-norm statistics in training, and no compute is spent on blank images.
    """
    if not bool(present.any()):
        return images.new_zeros(images.size(0), out_dim)
    feats = encoder(images[present])
    out = feats.new_zeros(images.size(0), feats.size(1))
    out[present] = feats
    return out
