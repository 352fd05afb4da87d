"""Sparse Transformer patterns (Strided, Fixed), their parts, BlockSparse: definitions and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import BlockSparse, Causal, Fixed, PerHead, SlidingWindow, Strided, attention
from attnkit.patterns import BlockLocal, Periodic, Summary


def _brute_mask(rule, n_q, n_k):
    offset = n_k - n_q
    return torch.tensor([[bool(rule(r + offset, c)) for c in range(n_k)] for r in range(n_q)])


def _strided_rule(stride):  # Child et al. 2019, section 4.2: local band of stride + 1 keys
    return lambda i, j: j <= i and (i - j <= stride or (i - j) % stride == 0)


def _fixed_rule(stride, summary):
    return lambda i, j: j <= i and (j // stride == i // stride or j % stride >= stride - summary)


sizes = st.tuples(st.integers(1, 60), st.integers(1, 60))


@given(stride=st.integers(1, 12), n=sizes)
def test_strided_mask_is_the_papers_definition(stride, n):
    n_q, n_k = n
    assert torch.equal(Strided(stride).mask(n_q, n_k), _brute_mask(_strided_rule(stride), n_q, n_k))


@given(stride=st.integers(1, 12), data=st.data(), n=sizes)
def test_fixed_mask_is_the_papers_definition(stride, data, n):
    summary = data.draw(st.integers(1, stride))
    n_q, n_k = n
    expected = _brute_mask(_fixed_rule(stride, summary), n_q, n_k)
    assert torch.equal(Fixed(stride, summary).mask(n_q, n_k), expected)


def test_strided_band_holds_stride_plus_one_keys_as_in_the_paper():
    row = Strided(4).mask(13, 13)[12]
    assert row.nonzero().flatten().tolist() == [0, 4, 8, 9, 10, 11, 12]  # 5 = stride + 1 local keys


@given(stride=st.integers(1, 10), data=st.data(), n=st.integers(1, 50))
def test_parts_are_named_sub_patterns_whose_union_is_the_whole(stride, data, n):
    summary = data.draw(st.integers(1, stride))
    local, periodic = Strided(stride).parts
    assert local == SlidingWindow(stride + 1) and periodic == Periodic(stride)
    assert torch.equal(local.mask(n, n) | periodic.mask(n, n), Strided(stride).mask(n, n))
    block, summaries = Fixed(stride, summary).parts
    assert block == BlockLocal(stride) and summaries == Summary(stride, summary)
    assert torch.equal(block.mask(n, n) | summaries.mask(n, n), Fixed(stride, summary).mask(n, n))


@given(stride=st.integers(1, 10), n=st.integers(1, 60))
def test_strided_parts_connect_every_earlier_key_in_two_steps(stride, n):
    local, periodic = (p.mask(n, n).double() for p in Strided(stride).parts)
    two_steps = (periodic @ local) > 0  # i -> k by a multiple of the stride, then k -> j locally
    assert torch.equal(two_steps, Causal().mask(n, n))


def test_parts_can_be_given_to_heads():
    per_head = PerHead([*Strided(4).parts, *Fixed(4, 1).parts])
    masks = per_head.mask(9, 9)
    assert masks.shape == (4, 9, 9)
    assert torch.equal(masks[0] | masks[1], Strided(4).mask(9, 9))
    assert torch.equal(masks[2] | masks[3], Fixed(4, 1).mask(9, 9))


@given(layout=st.lists(st.booleans(), min_size=16, max_size=16), block=st.integers(1, 6), data=st.data())
def test_block_sparse_allows_whole_blocks_of_the_layout(layout, block, data):
    layout = torch.tensor(layout).view(4, 4)
    n_k = data.draw(st.integers(3 * block + 1, 4 * block))
    n_q = data.draw(st.integers(1, n_k + 3))
    pattern = BlockSparse(layout, block)
    rule = lambda i, j: i >= 0 and bool(layout[i // block, j // block])  # noqa: E731
    assert torch.equal(pattern.mask(n_q, n_k), _brute_mask(rule, n_q, n_k))


def test_block_sparse_hides_negative_query_and_key_positions():
    pattern = BlockSparse(torch.ones(2, 2, dtype=torch.bool), 2)
    positions = torch.tensor([-5, -1, 0, 3])
    allowed = pattern.rows_mask(positions, positions)
    assert torch.equal(allowed, (positions >= 0)[:, None] & (positions >= 0)[None, :])
    assert not pattern.rows_mask(torch.tensor([0]), torch.tensor([-5])).any()


def test_per_head_block_sparse_has_a_head_dimension():
    layout = torch.stack([torch.eye(3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool)])
    pattern = BlockSparse(layout, 2)
    assert pattern.n_heads == 2
    mask = pattern.mask(6, 6)
    assert mask.shape == (2, 6, 6) and mask[1].all() and mask[0].sum() == 12


@given(pattern=st.sampled_from([Strided(3), Fixed(5, 2), Periodic(4), BlockLocal(3), Summary(4, 1)]),
       n=st.integers(1, 70))
def test_count_and_density_agree_with_the_mask(pattern, n):
    mask = pattern.mask(n, n)
    assert pattern.count(n, n) == int(mask.sum())
    assert pattern.density(n) == pytest.approx(mask.double().mean().item())


def test_strided_is_far_sparser_than_causal_at_long_lengths():
    assert Strided(128).density(2048) < 0.08 < Causal().density(2048)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Strided(0), ValueError, "Strided: stride must be a positive integer, got 0"),
        (lambda: Strided(-3), ValueError, "stride must be a positive integer, got -3"),
        (lambda: Strided(2.5), TypeError, "Strided: stride must be an int"),
        (lambda: SlidingWindow(0), ValueError, "SlidingWindow: size must be a positive integer"),
        (lambda: Fixed(0, 1), ValueError, "Fixed: stride must be a positive integer"),
        (lambda: Fixed(8, 0), ValueError, "Fixed: summary must be a positive integer, got 0"),
        (lambda: Fixed(8, 9), ValueError, r"Fixed: summary must be at most stride \(8\), got 9"),
        (lambda: Summary(4, 5), ValueError, "Summary: summary must be at most stride"),
        (lambda: Periodic(0), ValueError, "Periodic: stride must be a positive integer"),
        (lambda: BlockLocal(-1), ValueError, "BlockLocal: stride must be a positive integer"),
        (lambda: BlockSparse(torch.ones(2, 2), 0), ValueError, "BlockSparse: block_size must be a positive"),
        (lambda: BlockSparse(torch.ones(2, 3), 4), ValueError, r"square .* got shape \(2, 3\)"),
        (lambda: BlockSparse(torch.ones(4), 4), ValueError, r"got shape \(4,\)"),
        (lambda: BlockSparse([[True]], 4), TypeError, "layout must be a torch.Tensor, got list"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("backend", ["auto", "reference", "dense", "blockwise", "sparse"])
def test_a_block_layout_for_another_length_is_rejected(backend):
    pattern = BlockSparse(torch.ones(4, 4, dtype=torch.bool), 16)  # covers 49..64 keys
    q = torch.randn(1, 1, 100, 8)
    with pytest.raises(ValueError, match=r"layout of shape \(4, 4\) with block_size 16 does not match 100 keys"):
        attention(q, q, q, pattern, backend=backend)
    with pytest.raises(ValueError, match="needs 2 x 2 blocks"):
        pattern.mask(20, 20)


def test_allows_compiles_as_a_flexattention_mask_mod():
    """`attnkit bench` hands `pattern.allows` to compiled FlexAttention as its mask_mod: inductor
    lowers it as a pointwise subgraph, where an in-place op (a buffer) cannot be created."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = SlidingWindow(24) | Strided(16) | Fixed(16, 2)
    n = 128
    block_mask = flex.create_block_mask(lambda b, h, i, j: pattern.allows(i, j), None, None, n, n, device="cpu")
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    out = torch.compile(flex.flex_attention)(q, k, v, block_mask=block_mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(n, n))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_block_sparse_names_a_position_past_its_layout_even_when_the_other_index_is_empty():
    pattern = BlockSparse(torch.ones(2, 2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="covers positions below 8, got position 9"):
        pattern.allows(torch.tensor([9]), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="got position 12"):
        pattern.allows(torch.tensor([3]), torch.tensor([12]))
    assert pattern.allows(torch.tensor([7]), torch.tensor([0])).item()
