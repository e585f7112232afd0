"""The backend registry, and the flash-attn and xformers adapters' contracts, on CPU.

flash-attn: the adapter runs against a pure-torch emulation of `flash_attn_varlen_func` and
`flash_attn_with_kvcache` written from their documented semantics; the emulation records every
call and asserts the documented argument contract (int32 cu_seqlens and block tables, page size a
multiple of 256 when paging, bottom-right causal masks, window_size=(left, right), softcap), and
its results must equal the reference backend's, with and without soft-capping.

xformers: the adapter runs against an emulation of `memory_efficient_attention` that materialises
the real xformers attention-bias objects (pure Python, they work without CUDA) into dense masks;
xformers cannot soft-cap, and says so.
These tests skip when xformers is not installed (`pip install --no-deps xformers` is enough).

Tests marked `cuda` run the real kernels against the reference; they skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.fast import registry
from engine.fast.flash_attn import FlashAttnBackend, FlashAttnKernels, window_size
from engine.fast.torch_native import TorchNativeAttention
from engine.reference.attention import ReferenceAttention
from engine.testing.strategies import make_batch, mixed_batches, run_backend, softcaps

# ---- registry ---------------------------------------------------------------------------------


def test_registry_resolves_names_on_cpu():
    assert isinstance(registry.get_attention_backend("auto", "cpu"), TorchNativeAttention)
    assert isinstance(registry.get_attention_backend("torch", "cpu"), TorchNativeAttention)
    assert isinstance(registry.get_attention_backend("reference", "cpu"), ReferenceAttention)


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"attention_backend must be one of .*got 'flash'"):
        registry.get_attention_backend("flash", "cpu")


@pytest.mark.parametrize("name", ["flash-attn", "xformers"])
def test_registry_rejects_cuda_backends_without_cuda(name):
    with pytest.raises(ValueError, match=f"attention_backend '{name}' needs a CUDA device"):
        registry.get_attention_backend(name, "cpu")


def test_registry_rejects_cuda_backends_without_the_package(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(registry, "_build", missing)
    with pytest.raises(ValueError, match=r"needs the flash-attn package.*pip install flash-attn"):
        registry.get_attention_backend("flash-attn", torch.device("cuda"))


def test_auto_on_cuda_prefers_flash_attn_then_xformers_then_torch(monkeypatch):
    available: set[str] = set()

    def build(name):
        if name not in available:
            raise ImportError(name)
        return name  # stands in for the backend object

    monkeypatch.setattr(registry, "_build", build)
    cuda = torch.device("cuda")
    assert isinstance(registry.get_attention_backend("auto", cuda), TorchNativeAttention)
    available.add("xformers")
    assert registry.get_attention_backend("auto", cuda) == "xformers"
    available.add("flash-attn")
    assert registry.get_attention_backend("auto", cuda) == "flash-attn"


def test_auto_skips_backends_that_cannot_softcap(monkeypatch):
    class NoSoftcap:
        supports_softcap = False

    monkeypatch.setattr(
        registry, "_build", lambda name: NoSoftcap() if name == "xformers" else _missing(name)
    )
    cuda = torch.device("cuda")
    assert isinstance(registry.get_attention_backend("auto", cuda), NoSoftcap)
    backend = registry.get_attention_backend("auto", cuda, needs_softcap=True)
    assert isinstance(backend, TorchNativeAttention)


def _missing(name):
    raise ImportError(name)


def test_engine_reports_a_cuda_backend_on_cpu(llama_path):
    from engine import LLM

    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLM(str(llama_path), attention_backend="flash-attn", kv_cache_memory_bytes=2**20)


# ---- flash-attn contract ------------------------------------------------------------------------


def dense_attention(q, k, v, scale, causal, window, softcap=0.0):
    """flash-attn's documented semantics for one sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D].

    Query i sees keys j <= i + Sk - Sq when causal, and with window (left, right) only keys in
    [i + Sk - Sq - left, i + Sk - Sq + right]; head h reads KV head h // (Hq / Hkv); softcap > 0
    turns scaled scores s into softcap * tanh(s / softcap)."""
    sq, sk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    diag = torch.arange(sq)[:, None] + sk - sq  # [Sq, 1]
    j = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible &= j <= diag
    left, right = window
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class FlashEmulation:
    """flash_attn_varlen_func / flash_attn_with_kvcache in plain torch, asserting the contract."""

    def __init__(self, paged_block_multiple: int = 256) -> None:
        self.paged_block_multiple = paged_block_multiple
        self.calls: list[tuple[str, dict]] = []

    def kernels(self, supported=(torch.float64,)) -> FlashAttnKernels:
        return FlashAttnKernels(
            varlen=self.varlen,
            with_kvcache=self.with_kvcache,
            supported_dtypes=supported,
            paged_block_multiple=self.paged_block_multiple,
        )

    def _paged_keys(self, cache, block_table, b, length):
        assert block_table.dtype == torch.int32
        assert cache.shape[1] % self.paged_block_multiple == 0, "page_block_size constraint"
        return cache[block_table[b].long()].flatten(0, 1)[:length]

    def varlen(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        block_table=None,
    ):
        self.calls.append(("varlen", dict(locals())))
        assert q.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert len(cu_seqlens_q) == len(cu_seqlens_k)
        assert cu_seqlens_q[-1] == q.shape[0]
        q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        assert max_seqlen_q == max(q_lens) and max_seqlen_k == max(k_lens)
        if block_table is None:
            assert k.dim() == 3 and cu_seqlens_k[-1] == k.shape[0]
        out = torch.empty_like(q)
        for b in range(len(q_lens)):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            if block_table is None:
                k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
                kb, vb = k[k0:k1], v[k0:k1]
            else:
                kb = self._paged_keys(k, block_table, b, k_lens[b])
                vb = self._paged_keys(v, block_table, b, k_lens[b])
            out[q0:q1] = dense_attention(
                q[q0:q1], kb, vb, softmax_scale, causal, window_size, softcap
            )
        return out

    def with_kvcache(
        self,
        q,
        k_cache,
        v_cache,
        k=None,
        v=None,
        cache_seqlens=None,
        block_table=None,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
    ):
        self.calls.append(("with_kvcache", dict(locals())))
        assert k is None and v is None  # the engine writes the cache itself
        assert q.dim() == 4 and cache_seqlens.dtype == torch.int32
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            length = int(cache_seqlens[b])
            kb = self._paged_keys(k_cache, block_table, b, length)
            vb = self._paged_keys(v_cache, block_table, b, length)
            out[b] = dense_attention(q[b], kb, vb, softmax_scale, causal, window_size, softcap)
        return out


def test_window_size_follows_hf_convention():
    assert window_size(None) == (-1, -1)
    assert window_size(4) == (3, 0)  # sees p-3..p: four keys, as HF's p - j < 4


@settings(max_examples=60, deadline=None)
@given(
    mixed_batches(),
    st.one_of(st.none(), st.integers(1, 20)),
    st.sampled_from([1, 256]),
    softcaps,
)
def test_flash_adapter_equals_reference(params, sliding_window, paged_block_multiple, softcap):
    """paged_block_multiple=1 lets the emulation page over any block size (the adapter's paged
    path); 256 is the real constraint, which small blocks miss (the gathered path)."""
    emulation = FlashEmulation(paged_block_multiple)
    backend = FlashAttnBackend(emulation.kernels())
    batch = make_batch(**params)
    expected, _, _ = run_backend(ReferenceAttention(), batch, sliding_window, softcap)
    out, _, _ = run_backend(backend, batch, sliding_window, softcap)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    (kind, args), *_ = emulation.calls
    decode_only = batch.meta.max_query_len == 1
    paged = params["block_size"] % paged_block_multiple == 0
    assert kind == ("with_kvcache" if decode_only and paged else "varlen")
    assert args["causal"] is True and args["softmax_scale"] == batch.scale
    assert args["window_size"] == window_size(sliding_window)
    assert args["softcap"] == (0.0 if softcap is None else softcap)
    if kind == "varlen":
        assert torch.equal(args["cu_seqlens_q"], batch.meta.query_start_loc)
        seq_lens = torch.tensor(batch.meta.seq_lens_cpu)
        assert args["cu_seqlens_k"].tolist() == [0, *torch.cumsum(seq_lens, 0).tolist()]
        assert (args["block_table"] is not None) == paged
    else:
        assert args["q"].shape == (batch.meta.num_requests, 1, *batch.q.shape[1:])
        assert torch.equal(args["cache_seqlens"], batch.meta.seq_lens)
        assert torch.equal(args["block_table"], batch.meta.block_table)


def test_flash_adapter_pages_over_256_token_blocks():
    emulation = FlashEmulation()  # the real constraint
    backend = FlashAttnBackend(emulation.kernels())
    for requests in ([(300, 1), (40, 1)], [(300, 44), (600, 1), (3, 3)]):
        batch = make_batch(requests, 256, 2, 2, 8, seed=5, spare_blocks=1)
        expected, _, _ = run_backend(ReferenceAttention(), batch, None)
        out, _, _ = run_backend(backend, batch, None)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert emulation.calls[-1][1]["block_table"] is batch.meta.block_table


def test_flash_adapter_refuses_softcap_on_an_old_flash_attn():
    emulation = FlashEmulation(1)
    kernels = emulation.kernels()
    old = FlashAttnKernels(
        varlen=kernels.varlen,
        with_kvcache=kernels.with_kvcache,
        supported_dtypes=kernels.supported_dtypes,
        paged_block_multiple=1,
        supports_softcap=False,
    )
    backend = FlashAttnBackend(old)
    assert backend.supports_softcap is False
    batch = make_batch([(10, 10), (17, 1)], 4, 2, 2, 8, seed=0)
    with pytest.raises(ValueError, match=r"needs flash-attn >= 2.6"):
        run_backend(backend, batch, None, softcap=30.0)
    out, _, _ = run_backend(backend, batch, None)  # models without a cap still run
    expected, _, _ = run_backend(ReferenceAttention(), batch, None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert all("softcap" not in args or args["softcap"] == 0.0 for _, args in emulation.calls)


def test_flash_adapter_runs_unsupported_dtypes_on_the_torch_backend():
    emulation = FlashEmulation()
    backend = FlashAttnBackend(emulation.kernels(supported=(torch.float16, torch.bfloat16)))
    batch = make_batch([(10, 10), (17, 1)], 4, 2, 2, 8, seed=0, dtype=torch.float32)
    expected, _, _ = run_backend(ReferenceAttention(), batch, None)
    out, _, _ = run_backend(backend, batch, None)
    assert emulation.calls == []
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---- xformers contract --------------------------------------------------------------------------


def paged_mask(bias, m_q: int, m_k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense [m_q, m_k] mask of a paged bias over physical key slots.

    The bias's own materialize() also maps the block table's padding entries (pages past a
    request's length, which the kernels never read) and so can hide a real page that shares their
    block id; map only the pages that hold keys, from the unpaged mask of the same class."""
    page, table = bias.page_size, bias.block_tables
    row = table.shape[1] * page
    unpaged = bias._UNPAGED_TYPE(q_seqinfo=bias.q_seqinfo, k_seqinfo=bias.k_seqinfo)
    logical = unpaged.materialize((m_q, table.shape[0] * row), dtype=dtype)
    mask = torch.full((m_q, m_k), float("-inf"), dtype=dtype)
    for b, (q0, q1) in enumerate(bias.q_seqinfo.intervals()):
        for j in range(-(-bias.k_seqinfo.seqlen_py[b] // page)):
            phys = int(table[b, j])
            start = b * row + j * page
            mask[q0:q1, phys * page : (phys + 1) * page] = logical[q0:q1, start : start + page]
    return mask


def xformers_ops(paged_block_multiple: int):
    attn_bias = pytest.importorskip(
        "xformers.ops.fmha.attn_bias", reason="xformers is not installed"
    )
    from engine.fast.xformers import XformersOps

    calls: list[dict] = []

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        """The documented computation, on the dense mask the bias object materialises."""
        calls.append(dict(locals()))
        assert query.dim() == 5 and query.shape[0] == 1  # [1, M, G, H, D] (GQA form)
        assert key.shape[2:4] == query.shape[2:4]
        assert key.shape[3] == 1 or key.stride(3) == 0  # one KV head expanded over its H
        assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
        m_q, m_k = query.shape[1], key.shape[1]
        if hasattr(attn_bias, "block_tables"):
            mask = paged_mask(attn_bias, m_q, m_k, query.dtype)
        else:
            mask = attn_bias.materialize((m_q, m_k), dtype=query.dtype)
        scores = torch.einsum("qghd,kghd->ghqk", query[0], key[0]) * scale + mask
        return torch.einsum("ghqk,kghd->qghd", scores.softmax(-1), value[0])[None]

    ops = XformersOps(
        attention=memory_efficient_attention,
        attn_bias=attn_bias,
        supported_dtypes=(torch.float64,),
        paged_block_multiple=paged_block_multiple,
    )
    return ops, calls


@settings(max_examples=40, deadline=None)
@given(
    mixed_batches(max_len=30), st.one_of(st.none(), st.integers(1, 12)), st.sampled_from([1, 256])
)
def test_xformers_adapter_equals_reference(params, sliding_window, paged_block_multiple):
    from engine.fast.xformers import XformersBackend

    ops, calls = xformers_ops(paged_block_multiple)
    batch = make_batch(**params)
    expected, _, _ = run_backend(ReferenceAttention(), batch, sliding_window)
    out, _, _ = run_backend(XformersBackend(ops), batch, sliding_window)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    bias = calls[0]["attn_bias"]
    paged = sliding_window is None and params["block_size"] % paged_block_multiple == 0
    expected_type = (
        "PagedBlockDiagonalCausalWithOffsetPaddedKeysMask"
        if paged
        else "BlockDiagonalCausalWithOffsetPaddedKeysMask"
        if sliding_window is None
        else "BlockDiagonalCausalLocalAttentionPaddedKeysMask"
    )
    assert type(bias).__name__ == expected_type
    assert calls[0]["scale"] == batch.scale
    qsl = batch.meta.query_start_loc_cpu
    assert bias.q_seqinfo.seqstart_py == list(qsl)
    assert bias.k_seqinfo.seqlen_py == list(batch.meta.seq_lens_cpu)


def test_xformers_adapter_refuses_softcap():
    from engine.fast.xformers import XformersBackend

    ops, calls = xformers_ops(256)
    backend = XformersBackend(ops)
    assert backend.supports_softcap is False
    batch = make_batch([(10, 10), (17, 1)], 4, 2, 2, 8, seed=0)
    with pytest.raises(ValueError, match=r"'xformers' cannot soft-cap.*'flash-attn' or 'torch'"):
        run_backend(backend, batch, None, softcap=50.0)
    assert calls == []


def test_xformers_adapter_runs_float64_on_the_torch_backend():
    from engine.fast.xformers import XformersBackend

    ops, calls = xformers_ops(256)
    ops = type(ops)(attention=ops.attention, attn_bias=ops.attn_bias)  # real dtype list
    batch = make_batch([(10, 10), (17, 1)], 4, 2, 2, 8, seed=0)
    expected, _, _ = run_backend(ReferenceAttention(), batch, None)
    out, _, _ = run_backend(XformersBackend(ops), batch, None)
    assert calls == []
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---- the real kernels (CUDA only) -------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_CASES = [
    ([(300, 1), (40, 1), (520, 1)], 256, None),  # decode-only, paged
    ([(300, 44), (600, 1), (3, 3)], 256, None),  # mixed, paged
    ([(37, 37), (90, 1), (64, 20)], 16, None),  # mixed, gathered
    ([(37, 37), (90, 1), (64, 20)], 16, 24),  # sliding window
]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", ["flash-attn", "xformers"])
@pytest.mark.parametrize(("requests", "block_size", "sliding_window"), CUDA_CASES)
def test_real_kernels_match_reference(name, requests, block_size, sliding_window):
    pytest.importorskip("flash_attn" if name == "flash-attn" else "xformers.ops")
    backend = registry.get_attention_backend(name, "cuda")
    for dtype in (torch.float16, torch.bfloat16):
        batch = make_batch(requests, block_size, 2, 4, 64, seed=0, dtype=dtype, device="cuda")
        expected, _, _ = run_backend(ReferenceAttention(), batch, sliding_window)
        out, _, _ = run_backend(backend, batch, sliding_window)
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@requires_cuda
def test_torch_backend_on_cuda_matches_reference():
    batch = make_batch([(37, 37), (90, 1), (64, 20)], 16, 2, 4, 64, seed=0, device="cuda")
    expected, _, _ = run_backend(ReferenceAttention(), batch, 24)
    out, _, _ = run_backend(TorchNativeAttention(), batch, 24)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize(("requests", "block_size", "sliding_window"), CUDA_CASES)
def test_real_flash_attn_softcap_matches_reference(requests, block_size, sliding_window):
    pytest.importorskip("flash_attn")
    backend = registry.get_attention_backend("flash-attn", "cuda")
    if not backend.supports_softcap:
        pytest.skip("this flash-attn has no softcap (needs >= 2.6)")
    batch = make_batch(requests, block_size, 2, 4, 64, seed=0, dtype=torch.bfloat16, device="cuda")
    expected, _, _ = run_backend(ReferenceAttention(), batch, sliding_window, softcap=5.0)
    out, _, _ = run_backend(backend, batch, sliding_window, softcap=5.0)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ---- bench/kernels.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--softcap", "30", "--query-len", "5"]])
def test_kernels_bench_quick(extra, capsys, monkeypatch):
    """The kernel bench runs (and checks torch == reference on every cell) in seconds."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))  # for its `from common import ...`
    spec = importlib.util.spec_from_file_location("bench_kernels", bench_dir / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", module)
    spec.loader.exec_module(module)
    assert module.main(["--quick", *extra]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and out.count("x |") == 4  # 2 batch sizes x 2 contexts
