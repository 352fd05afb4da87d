"""GGUF quantized weights kept in their blocks: the native kernels of ``csrc/gguf_matmul.c`` on every
instruction-set build this CPU runs (AVX-512, AVX2, generic), the product ops, the layers, and a
GGUF file loaded with its blocks kept.

The oracle is the ``gguf`` package: its dequantization must come back bit for bit, and every
product must equal ``x @ dequantized(W).T`` at float32 rounding: elementwise within ``1e-5`` of
``|x| @ |W|.T`` (the scale of the rounding error of any float32 summation order), on random
blocks of every format (quantized random weights for the 32-weight formats, random bytes with small
finite scales for the K-quants, which the package cannot produce).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gguf_files import T, gguf, random_blocks, tiny_config, tiny_model, write_gguf
from real_models import GEMMA3, needs_gemma3
from attnkit.kernels import native_build, quant_native, quant_ops
from attnkit.kernels.quant_native import (ACTIVATION_BLOCK, ACTIVATIONS, FORMATS, kernel_threads, quant_dequantize,
                                          quant_format, quant_matmul, quantize_activations, set_kernel_threads,
                                          to_gguf_layout, to_kernel_layout)
from attnkit.kernels.quant_ops import NATIVE_ROWS, quant_embedding, quant_linear
from attnkit.models.llama.gguf_checkpoint import load_gguf
from attnkit.models.quant import QuantizedEmbedding, QuantizedLinear, is_quantized, set_quant_activations

IN_FEATURES = 512  # whole blocks of every format (256 for the K-quants)
OUT_FEATURES = 67  # several chunks of work, and an odd last one


def _isa_params() -> list:
    params = []
    for isa in ("auto", "avx512", "avx2", "generic"):
        built = native_build.load_native("gguf_matmul", isa)
        params.append(pytest.param(isa, marks=pytest.mark.skipif(built.library is None, reason=built.message)))
    return params


ISAS = _isa_params()


def file_rows(fmt: str, out_features: int = OUT_FEATURES, in_features: int = IN_FEATURES, seed: int = 0):
    """``(rows, weight)``: GGUF rows ``(out, row_bytes)`` uint8 of format ``fmt`` and their float32
    values by the ``gguf`` package."""
    kind, rng = T[fmt], np.random.default_rng(seed)
    if kind in (T.Q4_K, T.Q6_K):
        raw = random_blocks(kind, out_features, in_features, rng)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((out_features, in_features)).astype(np.float32), kind)
    weight = gguf.quants.dequantize(raw, kind).astype(np.float32).reshape(out_features, in_features)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(weight)


def assert_float32_product(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """``y`` equals ``x @ weight.T`` within float32 rounding (see the module docstring)."""
    exact = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    assert y.dtype == torch.float32 and y.shape == exact.shape
    error = ((y.double() - exact).abs() / scale.clamp_min(1e-30)).max().item()
    assert error <= 1e-5, error


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_equals_the_gguf_package_bit_for_bit(isa, fmt):
    rows, weight = file_rows(fmt)
    blocks = to_kernel_layout(rows, FORMATS[fmt])
    assert torch.equal(quant_dequantize(blocks, FORMATS[fmt], isa=isa), weight)
    ids = torch.tensor([[5, 0], [OUT_FEATURES - 1, 5]])
    assert torch.equal(quant_dequantize(blocks, FORMATS[fmt], ids, isa=isa), weight[ids])


def assert_int8_product(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """``y`` equals ``x @ weight.T`` within the error of int8 activations: per block of 32, the
    block's scale ``d`` over 2 times ``sum |w|`` of the block (``|x - xq d| <= d / 2``), plus float32
    rounding. Returns the largest error as a fraction of that bound."""
    _, d = quantize_activations(x)
    per_block = weight.double().abs().reshape(weight.shape[0], -1, ACTIVATION_BLOCK).sum(-1)
    bound = (d.double() / 2) @ per_block.T + 1e-5 * (x.double().abs() @ weight.double().abs().T)
    error = (y.double() - x.double() @ weight.double().T).abs()
    assert y.dtype == torch.float32 and y.shape == bound.shape
    assert bool((error <= bound).all()), float((error / bound).max())
    return float((error / bound).max())


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_matmul_equals_x_times_the_dequantized_weight(isa, fmt, threads, activations):
    """One row (decoding), a row block and a ragged last block, on one thread and on the pool.
    float32 activations: ``x @ W.T`` at float32 rounding. int8 ones (VNNI, AVX2's maddubs, plain
    C): the product of the rounded activations at float32 rounding, so within the bound of their
    rounding, and not the float32 product."""
    rows, weight = file_rows(fmt, seed=threads)
    blocks = to_kernel_layout(rows, FORMATS[fmt])
    generator = torch.Generator().manual_seed(3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (1, 2, 4, 7):
            x = torch.randn(m, IN_FEATURES, generator=generator) * torch.rand(m, 1, generator=generator) * 10
            x[0, :ACTIVATION_BLOCK] = 0  # a block of zeros (d = 0 for int8)
            y = quant_matmul(x, blocks, FORMATS[fmt], activations=activations, isa=isa)
            if activations == "float32":
                assert_float32_product(y, x, weight)
                continue
            assert assert_int8_product(y, x, weight) > 1e-3  # the activations were rounded
            xq, d = quantize_activations(x)
            rounded = (xq.float().reshape(m, -1, ACTIVATION_BLOCK) * d.unsqueeze(-1)).reshape(m, -1)
            assert_float32_product(y, rounded, weight)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_one_row_over_channel_groups_and_long_rows(isa, fmt, activations):
    """One row (decoding) takes channels four at a time: 4k + 1..3 channels leave a remainder,
    rows longer than 256 groups convert their scales in several slices; each output is checked
    on its own (a kernel that mixed up the channels of a group or dropped a slice is off by far
    more than rounding)."""
    in_features = 256 * 33  # 264 groups of 32 (528 of Q6_K's 16): two slices of scales
    generator = torch.Generator().manual_seed(5)
    for out_features in (4, 9, 14):
        rows, weight = file_rows(fmt, out_features=out_features, in_features=in_features, seed=out_features)
        blocks = to_kernel_layout(rows, FORMATS[fmt])
        x = torch.randn(1, in_features, generator=generator)
        y = quant_matmul(x, blocks, FORMATS[fmt], activations=activations, isa=isa)
        if activations == "float32":
            assert_float32_product(y, x, weight)
        else:
            assert_int8_product(y, x, weight)


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("isa", ISAS)
def test_rows_of_no_weights_give_zeros(isa, activations):
    """in_features 0: an empty sum (the kernel once divided the work by the row's zero bytes)."""
    for fmt in ("Q4_1", "Q6_K"):
        y = quant_matmul(torch.ones(2, 0), torch.zeros(3, 0, dtype=torch.uint8), FORMATS[fmt],
                         activations=activations, isa=isa)
        assert torch.equal(y, torch.zeros(2, 3))


@pytest.mark.parametrize("isa,dot", [("avx512", "vpdpbusd"), ("avx2", "vpmaddubsw"), ("generic", "plain C")])
def test_each_build_says_which_integer_dot_product_it_runs(isa, dot):
    """The int8 tests above run each path: VNNI in the AVX-512 build of a CPU that has it, AVX2's
    maddubs, plain C."""
    built = native_build.load_native("gguf_matmul", isa)
    if built.library is None:
        pytest.skip(built.message)
    if isa == "avx512" and "avx512_vnni" not in native_build.cpu_identity():
        dot = "vpmaddubsw"
    assert f"int8 x: {dot}" in built.isa


@pytest.mark.parametrize("isa", ISAS)
def test_int8_activations_carry_nan_and_infinity(isa):
    rows, weight = file_rows("Q4_1")
    blocks = to_kernel_layout(rows, FORMATS["Q4_1"])
    x = torch.randn(2, IN_FEATURES)
    x[0, 40], x[1, 100] = float("nan"), float("inf")
    y = quant_matmul(x, blocks, FORMATS["Q4_1"], activations="int8", isa=isa)
    assert bool(y.isnan().all())  # as in float32: NaN, and inf times weights of both signs


def test_quantized_activations_round_half_to_even_per_block():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 127.0, 0.5, 1.5, -2.5  # d = 1 in the first block
    x[0, 32] = -254.0  # d = 2 in the second
    xq, d = quantize_activations(x)
    assert d.tolist() == [[1.0, 2.0]]
    assert xq[0, :4].tolist() == [127, 0, 2, -2] and xq[0, 32] == -127 and xq.dtype == torch.int8


@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
def test_int8_activations_without_the_library_are_the_same_product(fmt, monkeypatch):
    """The fallback multiplies the rounded activations by the dequantized weight, as the kernel."""
    rows, weight = file_rows(fmt)
    blocks = to_kernel_layout(rows, FORMATS[fmt])
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(10))
    native = quant_matmul(x, blocks, FORMATS[fmt], activations="int8")
    monkeypatch.setattr(quant_native, "_library", lambda isa=None: None)
    fallback = quant_matmul(x, blocks, FORMATS[fmt], activations="int8")
    assert assert_int8_product(fallback, x, weight) > 1e-3
    scale = x.abs() @ weight.abs().T
    assert float(((fallback - native).abs() / scale).max()) <= 2e-5


@pytest.mark.parametrize("out_features", [121, 181, 301, 3001])
def test_products_on_the_pool_do_not_depend_on_the_thread_count(out_features):
    """The pool splits a product's chunks (60 channels of 256 Q8_0 weights here) into one stretch
    per thread and the threads take what is left of the others' from the back: with 3, 4, 6 and 51
    chunks on 1, 2, 3 and 5 threads (stretches of unequal length, more threads than chunks), every
    output is computed once, as on one thread, bit for bit, and equals x @ W.T at float32 rounding."""
    rows, weight = file_rows("Q8_0", out_features=out_features, in_features=256, seed=out_features)
    blocks = to_kernel_layout(rows, FORMATS["Q8_0"])
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5))
    products = []
    try:
        for threads in (1, 2, 3, 5):
            set_kernel_threads(threads)
            products.append(quant_matmul(x, blocks, FORMATS["Q8_0"]))
    finally:
        set_kernel_threads(None)
    assert_float32_product(products[0], x, weight)
    for product in products[1:]:
        assert torch.equal(product, products[0])


def test_the_pool_runs_in_a_forked_child():
    """A child forked after the pool has run (its workers are not copied) makes its own workers and
    gives the same product on two threads."""
    rows, _ = file_rows("Q8_0", out_features=3001, in_features=256)
    blocks = to_kernel_layout(rows, FORMATS["Q8_0"])
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6))
    try:
        set_kernel_threads(2)
        expected = quant_matmul(x, blocks, FORMATS["Q8_0"])
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child: send its product and leave at once (no pytest teardown)
            try:
                os.write(write, quant_matmul(x, blocks, FORMATS["Q8_0"]).numpy().tobytes())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            got = pipe.read()
        os.waitpid(child, 0)
    finally:
        set_kernel_threads(None)
    assert got == expected.numpy().tobytes()


def test_kernel_threads_apart_from_torchs():
    """The pool may run more threads than torch's ops (torch on one, the kernels on two)."""
    rows, weight = file_rows("Q4_1", out_features=3000)  # enough chunks for two threads
    blocks = to_kernel_layout(rows, FORMATS["Q4_1"])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert kernel_threads() == 1
        set_kernel_threads(2)
        assert kernel_threads() == 2 and torch.get_num_threads() == 1
        x = torch.randn(1, IN_FEATURES, generator=torch.Generator().manual_seed(11))
        for activations, check in (("float32", assert_float32_product), ("int8", assert_int8_product)):
            check(quant_matmul(x, blocks, FORMATS["Q4_1"], activations=activations), x, weight)
    finally:
        set_kernel_threads(None)
        torch.set_num_threads(previous)
    assert kernel_threads() == previous
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive int or None"):
            set_kernel_threads(bad)


def test_generate_cli_sets_the_activations_and_threads(tmp_path):
    import argparse

    from attnkit.cli.generate import add_model_options, load

    path = write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config()), T.Q4_1)
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    previous = torch.get_num_threads()
    try:
        for flags, expected in (([], "float32"), (["--activations", "int8"], "int8")):
            torch.set_num_threads(2)
            model, _ = load(parser.parse_args(flags), path)
            assert {m.activations for m in model.modules() if isinstance(m, QuantizedLinear)} == {expected}
            # without --threads: torch's ops on one thread, the kernels on torch's two
            assert (torch.get_num_threads(), kernel_threads()) == (1, 2)
        load(parser.parse_args(["--threads", "3"]), path)
        assert (torch.get_num_threads(), kernel_threads()) == (1, 3)
        set_kernel_threads(None)
        load(parser.parse_args(["--threads", "2", "--dtype", "fp32"]), path)  # blocks dequantized: torch's threads
        assert torch.get_num_threads() == 2
    finally:
        set_kernel_threads(None)
        torch.set_num_threads(previous)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "Q6_K"])
def test_quant_linear_for_every_row_count_and_tile(fmt, monkeypatch):
    """The native kernel up to NATIVE_ROWS rows, dequantized tiles (whole, and several) beyond."""
    rows, weight = file_rows(fmt)
    blocks = to_kernel_layout(rows, FORMATS[fmt])
    generator = torch.Generator().manual_seed(4)
    for m in (1, NATIVE_ROWS, NATIVE_ROWS + 1, 40):
        x = torch.randn(m, IN_FEATURES, generator=generator)
        assert_float32_product(quant_linear(x, blocks, fmt), x, weight)
    monkeypatch.setattr(quant_ops, "TILE_BYTES", 4 * IN_FEATURES * 10)  # tiles of 10 rows, a last one of 7
    x = torch.randn(33, IN_FEATURES, generator=generator)
    assert_float32_product(quant_linear(x, blocks, fmt), x, weight)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q4_K"])
def test_without_the_library_the_values_are_the_same(fmt, monkeypatch):
    rows, weight = file_rows(fmt)
    blocks = to_kernel_layout(rows, FORMATS[fmt])
    monkeypatch.setattr(quant_native, "_library", lambda isa=None: None)
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(5))
    assert_float32_product(quant_matmul(x, blocks, FORMATS[fmt]), x, weight)
    assert torch.equal(quant_dequantize(blocks, FORMATS[fmt], torch.tensor([2, 0])), weight[[2, 0]])
    with pytest.raises(IndexError, match=r"\[0, 67\)"):
        quant_dequantize(blocks, FORMATS[fmt], torch.tensor([OUT_FEATURES]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_layout_keeps_rows_and_round_trips(fmt):
    """A row of the kernel layout is a row of the file: row permutations commute with it."""
    rows, _ = file_rows(fmt, out_features=5)
    quant = FORMATS[fmt]
    blocks = to_kernel_layout(rows, quant)
    assert blocks.shape == rows.shape and torch.equal(to_gguf_layout(blocks, quant), rows)
    order = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(to_kernel_layout(rows[order].contiguous(), quant), blocks[order])


def test_bad_inputs_are_rejected_with_the_reason():
    rows, _ = file_rows("Q8_0", out_features=4)
    blocks, quant = to_kernel_layout(rows, FORMATS["Q8_0"]), FORMATS["Q8_0"]
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        quant_matmul(torch.randn(2, IN_FEATURES, dtype=torch.float64), blocks, quant)
    with pytest.raises(ValueError, match=r"x must be .*\(rows, 512\)"):
        quant_matmul(torch.randn(2, IN_FEATURES - 32), blocks, quant)
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        quant_matmul(torch.randn(2, IN_FEATURES), blocks[:, :-1], quant)
    with pytest.raises(ValueError, match="2-D uint8"):
        quant_matmul(torch.randn(2, IN_FEATURES), blocks.float(), quant)
    with pytest.raises(ValueError, match="'Q3_K' is not supported"):
        quant_format("Q3_K")
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        quant_embedding(torch.tensor([0, 4]), blocks, "Q8_0")
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        quant_embedding(torch.tensor([-1]), blocks, "Q8_0")
    with pytest.raises(ValueError, match="ids must be integers"):
        QuantizedEmbedding(blocks, "Q8_0")(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="x has 480 features, the layer takes 512"):
        QuantizedLinear(blocks, "Q8_0")(torch.randn(1, 480))
    with pytest.raises(ValueError, match="whole Q4_1 blocks"):
        QuantizedLinear(blocks, "Q4_1")
    with pytest.raises(ValueError, match="activations must be one of float32, int8, got 'int4'"):
        quant_matmul(torch.randn(2, IN_FEATURES), blocks, quant, activations="int4")
    with pytest.raises(ValueError, match="activations must be one of float32, int8, got 'fp8'"):
        set_quant_activations(QuantizedLinear(blocks, "Q8_0"), "fp8")


def test_layers_keep_the_input_dtype_and_a_tied_head_shares_the_blocks():
    rows, weight = file_rows("Q8_0")
    embedding = QuantizedEmbedding.from_gguf_rows(rows, "Q8_0")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(embedding(ids), weight[ids])
    head = embedding.as_linear()
    assert head.blocks.data_ptr() == embedding.blocks.data_ptr()
    assert torch.equal(head.dequantized(), weight) and torch.equal(embedding.dequantized(), weight)
    x = torch.randn(2, 3, IN_FEATURES, generator=torch.Generator().manual_seed(6))
    assert_float32_product(head(x).reshape(6, -1), x.reshape(6, -1), weight)
    assert head(x.bfloat16()).dtype == torch.bfloat16
    assert "fmt=Q8_0" in repr(head) and "fmt=Q8_0" in repr(embedding)
    set_quant_activations(head, "int8")
    assert "activations=int8" in repr(head)
    assert_int8_product(head(x).reshape(6, -1), x.reshape(6, -1), weight)
    many = torch.randn(NATIVE_ROWS + 1, IN_FEATURES)  # a prefill: dequantized tiles, float32 activations
    assert_float32_product(head(many), many, weight)


@pytest.mark.parametrize("kind,tied", [(T.Q8_0, True), (T.Q4_1, False), (T.Q4_K, False), (T.Q6_K, True)],
                         ids=["Q8_0-tied", "Q4_1", "Q4_K", "Q6_K-tied"])
def test_a_gguf_file_loads_with_its_blocks_kept(tmp_path, kind, tied):
    """Every matrix stays quantized (Q/K rows restored as for floats), a tied head shares the
    embedding's blocks, and the model computes what the dequantized float32 model computes."""
    path = write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config(tie_embeddings=tied)), kind)
    reference, quantized = load_gguf(path), load_gguf(path, quantized=True)
    assert is_quantized(quantized) and not is_quantized(reference)
    assert isinstance(quantized.embed_tokens, QuantizedEmbedding)
    if tied:
        assert quantized.lm_head.blocks.data_ptr() == quantized.embed_tokens.blocks.data_ptr()
    floats = reference.state_dict()
    for name, module in quantized.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            assert module.fmt == kind.name
            assert torch.equal(module.dequantized(), reference.head_weight if name == "lm_head" else floats[f"{name}.weight"])
    tokens = torch.randint(0, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = reference(tokens), quantized(tokens)
        caches = quantized.make_caches(2, 9)
        stepped = torch.cat([quantized(tokens[:, i:i + 1], caches=caches) for i in range(9)], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    torch.testing.assert_close(stepped, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_quantized_loading_refuses_another_dtype_or_saving(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config()), T.Q8_0)
    with pytest.raises(ValueError, match="float32 activations.*bfloat16"):
        load_gguf(path, quantized=True, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="keeps GGUF quantized weights"):
        load_gguf(path, quantized=True).save_pretrained(tmp_path / "out")


@pytest.mark.slow  # parsing the file's 262k-token vocabulary takes most of a minute on 2 loaded cores
@needs_gemma3
def test_the_blocks_of_gemma_3s_file():
    """Real rows of every format Gemma 3 270M ships (Q8_0 of the 262k-row tied embedding, Q5_0,
    Q4_K, Q6_K) through the gguf-row loader: the same values and products as the gguf package."""
    from attnkit.models.gguf_file import open_gguf
    from attnkit.models.quant import gguf_rows

    seen = set()
    for tensor in open_gguf(GEMMA3).tensors:
        kind = tensor.tensor_type.name
        if kind not in FORMATS or kind in seen:
            continue
        seen.add(kind)
        rows, fmt = gguf_rows(tensor)
        rows = rows[:300]  # the embedding has 262,144 rows: a slice is enough
        weight = torch.from_numpy(gguf.quants.dequantize(rows.numpy(), T[fmt]).astype(np.float32))
        layer = QuantizedLinear.from_gguf_rows(rows, fmt)
        assert torch.equal(layer.dequantized(), weight), tensor.name
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(8))
        assert_float32_product(layer(x), x, weight)
    assert seen == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}
