"""`python -m engine.diff`: agreement passes the gate, a broken fast path fails it."""

from __future__ import annotations

import json
import math

import pytest

from engine import diff
from engine.diff import Trace, compare
from engine.fast.torch_native import TorchNativeAttention


def test_compare_identical_traces():
    trace = Trace([5, 6], [{5: -0.1, 9: -2.0}, {6: -0.3}])
    other = Trace([5, 6], [{5: -0.1 + 1e-12, 9: -2.0}, {6: -0.3}])
    result = compare(trace, other)
    assert result.first_divergence is None and result.gap == 0.0
    assert result.max_logprob_diff == pytest.approx(1e-12, abs=1e-15)
    assert result.agrees(1e-9) and not result.agrees(1e-13)


def test_compare_near_tie_and_real_divergence():
    reference = Trace([5, 6, 7], [{5: -0.1}, {6: -0.70, 8: -0.71}, {7: -0.2}])
    near_tie = Trace([5, 8, 1], [{5: -0.1}, {8: -0.700, 6: -0.705}, {1: -0.3}])
    result = compare(reference, near_tie)
    assert result.first_divergence == 1
    assert result.gap == pytest.approx(0.01)  # the larger of the two sides' gaps
    assert result.agrees(0.02) and not result.agrees(1e-3)
    unrelated = Trace([5, 3, 3], [{5: -0.1}, {3: -0.1}, {3: -0.1}])  # 6 not in its top-k
    assert compare(reference, unrelated).gap == math.inf


def test_compare_length_mismatch_is_a_divergence():
    result = compare(Trace([1, 2], [{1: 0.0}, {2: 0.0}]), Trace([1], [{1: 0.0}]))
    assert result.first_divergence == 1 and result.gap == math.inf


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt_token_ids": [5, 17, 300, 41, 9, 77, 12]}),
        json.dumps({"prompt": "Once upon a time"}),
        "plain text line",
        json.dumps({"prompt_token_ids": list(range(10, 45))}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_diff_agrees_in_float64_with_hf(llama_path, prompts_file, capsys):
    argv = ["--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float64"]
    code = diff.main([*argv, "--max-tokens", "10", "--hf", "--block-size", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4/4 requests agree" in out and "hf vs reference" in out
    assert out.count(" ok") == 4


def test_diff_fails_on_a_broken_fast_path(llama_path, prompts_file, capsys, monkeypatch):
    real_forward = TorchNativeAttention.forward

    def broken(self, q, k_cache, v_cache, meta, scale, sliding_window=None):
        return real_forward(self, q, k_cache, v_cache, meta, scale * 1.5, sliding_window)

    monkeypatch.setattr(TorchNativeAttention, "forward", broken)
    argv = ["--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float64"]
    code = diff.main([*argv, "--max-tokens", "10", "--attention-backend", "torch"])
    out = capsys.readouterr().out
    assert code == 1
    assert "DISAGREE" in out and "0/4 requests agree" in out


def test_diff_reports_bad_prompt_files(llama_path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert diff.main(["--model", str(llama_path), "--prompts", str(bad)]) == 2
    assert "needs 'prompt' or 'prompt_token_ids'" in capsys.readouterr().err


# ---- --layers ----------------------------------------------------------------------------------


def layers(argv, capsys):
    code = diff.main(["--layers", *argv])
    return code, capsys.readouterr()


def test_layers_healthy_paths_agree_at_rounding_level(llama_path, prompts_file, capsys):
    common = ["--model", str(llama_path), "--prompts", str(prompts_file), "--block-size", "4"]
    code, out = layers([*common, "--dtype", "float64", "--candidate", "backend=torch"], capsys)
    assert code == 0, out.out
    assert "every sub-step within tolerance" in out.out and "| 1 | mlp |" in out.out
    # fp32 fast vs fp64 reference, machine-readable
    argv = [*common, "--reference", "dtype=float64", "--candidate", "backend=torch,dtype=float32"]
    code, out = layers([*argv, "--json"], capsys)
    report = json.loads(out.out)
    assert code == 0 and report["agree"] and report["first_beyond_tolerance"] is None
    rels = [row["max_rel"] for row in report["rows"]]
    assert len(rels) == 1 + 3 * 2 + 2  # embedding, 3 per layer, final norm, logits
    assert 0 < max(rels) < 1e-5  # float32 rounding, not zero and not more
    # HF transformers in float64: the same activations to ~1e-15
    argv = [*common, "--dtype", "float64", "--candidate", "hf", "--json"]
    code, out = layers(argv, capsys)
    report = json.loads(out.out)
    assert code == 0 and max(row["max_rel"] for row in report["rows"]) < 1e-12
    assert report["candidate"].startswith("hf transformers")


def test_layers_name_the_perturbed_layer_and_sub_step(llama_path, prompts_file, capsys):
    argv = [
        "--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float64",
        "--candidate", "backend=tests.kit_plugins:PerturbLayer1", "--json",
    ]  # fmt: skip
    code, out = layers(argv, capsys)
    report = json.loads(out.out)
    assert code == 1 and not report["agree"]
    first = report["first_beyond_tolerance"]
    assert (first["layer"], first["step"]) == (1, "attention")
    assert first["max_abs"] > 1e-4  # o_proj of the backend's +1e-3
    rows = {(r["step"], r["layer"]): r for r in report["rows"]}
    assert all(rows[(s, 0)]["ok"] for s in ("attention", "mlp", "layer"))
    assert not rows[("logits", None)]["ok"]  # the fault propagates to the output
    code, out = layers(argv[:-1], capsys)  # the table says it too
    assert code == 1 and "first beyond tolerance: layer 1 attention" in out.out


def test_layers_quantized_vs_not(llama_path, prompts_file, capsys):
    argv = [
        "--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float32",
        "--reference", "backend=torch", "--candidate", "backend=torch,quantization=int8", "--json",
    ]  # fmt: skip
    code, out = layers(argv, capsys)
    report = json.loads(out.out)
    rels = [row["max_rel"] for row in report["rows"]]
    assert report["tolerance"] == 0.2 and "quantization=int8" in report["candidate"]
    assert max(rels) > 1e-5 and (code == 0) == report["agree"]


def test_layers_plot(llama_path, prompts_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "layers.png"
    argv = ["--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float64"]
    code, out = layers([*argv, "--plot", str(out_png)], capsys)
    assert code == 0 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {out_png}" in out.out
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # not installed
    code, out = layers([*argv, "--plot", str(tmp_path / "x.png")], capsys)
    assert (
        code == 2 and "--plot needs matplotlib" in out.err and "pip install matplotlib" in out.err
    )


def test_layers_bad_sides_are_named(llama_path, capsys):
    code, out = layers(["--model", str(llama_path), "--candidate", "colour=red"], capsys)
    assert code == 2 and "--candidate: 'colour=red'" in out.err


@pytest.mark.parametrize(
    "key", list(__import__("tests.family_checkpoints").family_checkpoints.FAMILY_VARIANTS)
)
def test_layers_engine_equals_hf_on_every_family(key, tokenizer, tmp_path_factory, capsys):
    """The per-family module names line up (Gemma's embedding scale and sandwich norms, Phi-3,
    MoE blocks): engine float64 vs HF float64, every sub-step at rounding level.

    Two known differences are HF's, not the mapping's: Gemma 2's soft-capped attention runs
    HF's eager path, whose softmax is float32 even in float64 models (errors ~1e-7); and
    Phi-3's longrope picks short or long factors by sequence length in HF, by max_model_len in
    the engine, so prompts stay within original_max_position_embeddings (32) and the engine
    gets max_model_len 32 (as tests/test_families.py does)."""
    from tests.family_checkpoints import family_checkpoint

    root = tmp_path_factory.getbasetemp() / "layer-diff-families"
    path = family_checkpoint(root, key, tokenizer)
    prompts = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    lengths = (9, 17, 31)  # across block boundaries and the 8-12 token windows
    prompts.write_text(
        "\n".join(json.dumps({"prompt_token_ids": list(range(5, 5 + n))}) for n in lengths)
    )
    argv = ["--model", str(path), "--prompts", str(prompts), "--dtype", "float64"]
    if key.startswith("phi3"):
        argv += ["--max-model-len", "32"]
    bound = 1e-5 if key.startswith("gemma2") else 1e-10
    argv += ["--tolerance", str(bound)]
    code, out = layers([*argv, "--candidate", "hf", "--json"], capsys)
    report = json.loads(out.out)
    assert code == 0, report["first_beyond_tolerance"]
    assert max(row["max_rel"] for row in report["rows"]) < bound


def test_diff_with_hf_reads_a_gguf_file(llama_path, prompts_file, tmp_path, capsys):
    """`--model x.gguf --hf`: HF loads the same file (folder + gguf_file), float64 agrees."""
    pytest.importorskip("gguf")
    from tests.gguf_factory import write_gguf

    path = write_gguf(llama_path, tmp_path / "tiny.gguf", lambda name: "Q8_0")
    argv = ["--model", str(path), "--tokenizer", str(llama_path), "--prompts", str(prompts_file)]
    code = diff.main(
        [*argv, "--dtype", "float64", "--max-tokens", "6", "--hf", "--block-size", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4/4 requests agree" in out and "hf vs reference" in out
