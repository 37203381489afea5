"""Quantization for SDSAT decoding, apart from loading (model.py chooses one and applies it).

This module knows nothing of decoding; it hands the engine an eval-mode model. SDSAT's "same
output as greedy" needs a token's logits not to depend on the other tokens fed in the same pass
(a token verified in a pass of 20 must get the logits it would get alone). fp32/bf16 and NF4
(weights dequantized, activations untouched) have that up to float noise (~1e-5 in the logits).
Quantizing activations to int8 does not:
- torch's dynamic int8 quantizes each Linear's input with ONE scale for the whole (tokens, hidden)
  tensor, so the adaptive tokens' activations coarsen the real tokens' (tiny model: logits moved
  by 0.4, greedy outputs diverged). `RowwiseInt8Linear` scales every row to max |x| = 1 and pins
  the range with one extra row, so each row's int8 GEMM is bit-identical whatever rides with it.
- bitsandbytes LLM.int8 computes "outlier" columns (|x| > threshold) in fp16 for all rows if any
  row has one; threshold 0 leaves pure per-row quantization.
Both then pass the identity tests on a 2-layer model, but on a real 30-layer one (SmolLM2-135M)
the ~1e-7 differences of fp32 attention over different pass lengths push some activations across
an int8 rounding step, and that grows layer by layer: fused SDSAT matched greedy on 1-2 of 4
prompts (32 tokens), diverging after 5-18 tokens. Measured on SmolLM2 over 400 tokens of code,
top-1 agreement with fp32 / KL: rowwise int8 0.83 / 0.16, plain torch dynamic int8 0.55 / 1.22
(it also diverged within 1-4 tokens), bitsandbytes int8 0.93 / 0.03, NF4 0.78 / 0.22 (NF4 stayed
identical on all 4 prompts). So on CPU, "dynamic-int8" is fast but only nearly lossless.

"dynamic-fp16" (torch's fbgemm Linear with fp16 weights, fp32 activations) quantizes no
activation: on SmolLM2 it agreed with fp32 on 400/400 tokens (KL 0.0000) and fused SDSAT matched
greedy on 4/4 prompts; it halves weight memory and is about as fast as int8 at one token, so it
is the CPU default.

Measured on 2 AVX2 cores (Llama, hidden 768, 12 layers, 512 cached), ms per pass of 1 / 8 / 16
tokens: fp32 74 / 195 / 163, torch dynamic int8 32 / 48 / 67, RowwiseInt8Linear 39 / 59 / 69.
bitsandbytes runs on CPU but is slower than fp32 there: it is the GPU path.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------
# CPU int8 with a per-row scale.


class RowwiseInt8Linear(nn.Module):
    """torch's fbgemm dynamic int8 Linear (int8 per-channel weights, fast on CPU), fed rows scaled
    to max |x| = 1 plus one pinned row [1, -1, 0, ...]: the per-tensor activation range is then
    always [-1, 1], so each row's quantization (and output) is independent of the other rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        bare = nn.Linear(linear.in_features, linear.out_features, bias=False)
        bare.weight = linear.weight
        bare.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            # torch.ao is deprecated in favour of torchao, which breaks transformers' imports here.
            warnings.simplefilter("ignore")
            self.inner = DynamicLinear.from_float(bare)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        pin = torch.zeros(1, linear.in_features)
        pin[0, 0], pin[0, 1] = 1.0, -1.0
        self.register_buffer("pin", pin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()  # (N, in)
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # (N, 1)
        out = self.inner(torch.cat([rows / scale, self.pin]))[:-1] * scale  # (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def quantize_rowwise_int8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear, lm_head included (for small models it is the largest matrix), in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, RowwiseInt8Linear(child))
    return model


def quantize_fp16_weights(model: nn.Module) -> nn.Module:
    """Every nn.Linear, lm_head included, to fbgemm fp16 weights with float32 activations, in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, see RowwiseInt8Linear
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.float16, inplace=True)


def packed_bytes(module: nn.Module) -> int:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if not isinstance(module, DynamicLinear):
        return 0
    return module.weight().numel() * (1 if module._packed_params.dtype == torch.qint8 else 2)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def quiet_bitsandbytes() -> None:
    # LLM.int8 logs this at WARNING on every matmul when activations are not fp16: it would flood
    # the server's log. The cast is expected (bitsandbytes quantizes from fp16).
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("inputs will be cast from"))


# ----------------------------------------------------------------------------------------------
# NF4 and awkward shapes.

# bitsandbytes (0.50) quantizes a 4-bit weight (out, in) in blocks of 64 values (Params4bit's
# default blocksize), which any shape allows; but on a CPU with AVX-512 bf16 Linear4bit repacks
# the weight on its first forward (functional._convert_weight_packed_for_cpu), which asserts
# out % block_n == 0 (block_n 32) and reshapes the absmax to (out, in / blocksize), so it needs
# in % 64 == 0 too. The rule is applied on every machine, whatever its CPU or GPU: a model then
# loads the same way everywhere, and a kernel that another machine picks cannot crash mid-request.
_NF4_BLOCKSIZE = 64


def nf4_shape_rule() -> tuple[int, int]:
    """(out multiple, in multiple) that a Linear's weight needs to be quantized to NF4."""
    import inspect

    block_n = 32
    try:
        from bitsandbytes import functional as bnb_functional

        block_n = int(inspect.signature(bnb_functional._convert_weight_packed_for_cpu).parameters["block_n"].default)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        pass  # another bitsandbytes: keep 0.50's figure, the stricter side is harmless
    return block_n, _NF4_BLOCKSIZE


def nf4_skip_modules(folder: Path, config) -> tuple[list[str], list[str]]:
    """(modules bitsandbytes should not convert, the subset left out for their shapes alone).

    The first list is transformers' own default (the output head, tied weights) plus every Linear
    whose weight the rule of `nf4_shape_rule` rejects: passing `llm_int8_skip_modules` replaces the
    default, so it is computed here on a weightless (meta) copy of the model."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    default = sorted(get_keys_to_not_convert(skeleton))
    rows, cols = nf4_shape_rule()
    unfit = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear) and (module.out_features % rows or module.in_features % cols)
        and not any(name == d or name.startswith(d + ".") for d in default)
    ]
    return default + unfit, unfit
