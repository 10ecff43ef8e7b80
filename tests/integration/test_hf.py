"""Hugging Face ``transformers`` models end to end: random init from tiny configs, no downloads.

sparsify (whole model captured by torch.export) -> a few training steps -> finalize ->
lower("cpu") -> the same logits -> greedy ``generate`` identical to the dense finalized
model; save_pretrained/from_pretrained round-trips; tied and odd-sized layers stay dense
with their reasons. Widths of 512 put the MLP weights (1024x512) above the CPU lowering's
size floor, so the packed kernel really runs.
"""

from __future__ import annotations

import pytest
import torch

import nmfx
from nmfx.lowering.cpu import NMLinear

T = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install 'nmfx[hf]'"
)

VOCAB = 1024
DECODER_CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    ),
    "qwen2": lambda: T.Qwen2Config(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    ),
    "mistral": lambda: T.MistralConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    ),
    "gpt2": lambda: T.GPT2Config(
        n_embd=512, n_layer=2, n_head=8, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    ),
    "opt": lambda: T.OPTConfig(
        hidden_size=512, ffn_dim=1024, num_hidden_layers=2, num_attention_heads=8,
        vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=512,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    ),
}  # fmt: skip
TIED = {"gpt2": "transformer.wte.weight", "opt": "model.decoder.embed_tokens.weight"}


def decoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(DECODER_CONFIGS[name]()).eval()


def train_steps(model: torch.nn.Module, batch: dict, steps: int = 2) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        out = model(**batch)
        assert isinstance(out, T.utils.ModelOutput) and out.loss is not None
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name", list(DECODER_CONFIGS))
def test_decoder_sparsify_train_finalize_lower_generate(name):
    model = decoder(name)
    keys = list(model.state_dict())
    nmfx.sparsify(model)
    text = str(nmfx.summary(model))
    assert "whole model captured by torch.export (non-strict)" in text
    assert "registration order" not in text  # the output layer is known, not guessed
    plan = nmfx.summary(model).plan
    by_name = {c.name: c for c in plan.candidates}
    head = by_name["lm_head"]
    assert head.verdict == "dense"
    if name in TIED:
        assert f"weight shared with {TIED[name]} (tied)" in head.reason
    else:
        assert "produces the model output" in head.reason
    if name in ("llama", "qwen2", "mistral"):  # GQA: k/v have 2 heads of 8
        k = by_name["model.layers.0.self_attn.k_proj"]
        assert k.shape == (128, 512) and k.sparse
    if name == "gpt2":  # Conv1D: weight is (in, out), reduced along dim 0
        c_fc = by_name["transformer.h.0.mlp.c_fc.weight"]
        assert c_fc.op == "addmm" and c_fc.reduce_dim == 0 and c_fc.sparse
    assert list(model.state_dict()) == keys

    ids = torch.randint(2, VOCAB, (2, 16))
    train_steps(model, {"input_ids": ids, "labels": ids})
    nmfx.finalize(model)
    assert list(model.state_dict()) == keys
    prompt = ids[:1, :8]
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        fast = nmfx.lower(model, "cpu")
        out = fast(ids)
        assert isinstance(out, T.utils.ModelOutput)
        torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
        tokens = fast.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, ref_tokens)
    decisions = nmfx.lowering_decisions(fast)
    packed = [m for m in fast.modules() if isinstance(m, NMLinear)]
    assert len(packed) == sum(d.verdict == "sparse" for d in decisions)
    if name == "llama":
        assert packed, "the 1024x512 MLP weights should run the packed kernel"


@pytest.mark.parametrize("name", ["bert", "vit", "resnet"])
def test_encoder_sparsify_train_finalize_lower(name):
    torch.manual_seed(0)
    if name == "bert":
        cfg = T.BertConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                           num_labels=3)  # fmt: skip
        model = T.BertForSequenceClassification(cfg)
        x = {"input_ids": torch.randint(0, VOCAB, (2, 16))}
    elif name == "vit":
        cfg = T.ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, image_size=32, patch_size=8, num_labels=3)  # fmt: skip
        model = T.ViTForImageClassification(cfg)
        x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        cfg = T.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                             num_labels=3)  # fmt: skip
        model = T.ResNetForImageClassification(cfg)
        x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    nmfx.sparsify(model)
    text = str(nmfx.summary(model))
    assert "whole model captured by torch.export" in text
    assert nmfx.summary(model).plan.sparse
    train_steps(model, {**x, "labels": torch.tensor([0, 2])})
    nmfx.finalize(model)
    with torch.no_grad():
        ref = model(**x).logits
        out = nmfx.lower(model, "cpu")(**x)
    assert isinstance(out, T.utils.ModelOutput)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)


def test_classifier_head_is_the_output_layer():
    cfg = T.BertConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=VOCAB, num_labels=4)  # fmt: skip
    model = nmfx.sparsify(T.BertForSequenceClassification(cfg))
    by_name = {c.name: c for c in nmfx.summary(model).plan.candidates}
    assert "produces the model output" in by_name["classifier"].reason
    assert by_name["bert.pooler.dense"].sparse  # pooler feeds the head: not the output


def test_keep_output_dense_false_sparsifies_untied_lm_head_but_never_a_tied_one():
    llama = nmfx.sparsify(decoder("llama"), keep_output_dense=False)
    assert {c.name: c for c in nmfx.summary(llama).plan.candidates}["lm_head"].sparse
    gpt2 = nmfx.sparsify(decoder("gpt2"), keep_output_dense=False)
    head = {c.name: c for c in nmfx.summary(gpt2).plan.candidates}["lm_head"]
    assert not head.sparse and "(tied)" in head.reason


def test_sizes_not_divisible_by_m_stay_dense_with_their_reason():
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=130, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    model = nmfx.sparsify(T.LlamaForCausalLM(cfg))
    by_name = {c.name: c for c in nmfx.summary(model).plan.candidates}
    down = by_name["model.layers.0.mlp.down_proj"]
    assert not down.sparse
    assert "in_features=130 is not a multiple of M=4" in down.reason
    assert by_name["model.layers.0.mlp.up_proj"].sparse  # 130x64: reduces along 64


def test_save_pretrained_round_trip_sparsified_and_finalized(tmp_path):
    model = decoder("llama")
    keys = set(model.state_dict())
    nmfx.sparsify(model)
    ids = torch.randint(0, VOCAB, (1, 12))
    train_steps(model, {"input_ids": ids, "labels": ids}, steps=1)
    model.save_pretrained(tmp_path / "sparse")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "sparse").eval()
    assert set(loaded.state_dict()) == keys
    nmfx.finalize(model)
    model.save_pretrained(tmp_path / "final")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert set(again.state_dict()) == keys
    nmfx.finalize(again)  # by detection: the saved weights are exactly 2:4
    assert nmfx.nm_weights(again).keys() == nmfx.nm_weights(model).keys()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_trainer_trains_a_sparsified_model(tmp_path):
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    model = nmfx.sparsify(T.LlamaForCausalLM(cfg), mask_mode="fixed")
    ids = torch.randint(0, VOCAB, (8, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = T.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    T.Trainer(model=model, args=args, train_dataset=data).train()
    after = model.model.layers[0].mlp.up_proj.weight.detach()
    assert not torch.equal(before, after)
    assert nmfx.is_nm(after, nmfx.parse_pattern("2:4"), 1)  # fixed mask: still 2:4


@pytest.mark.slow
def test_backend_nmfx_with_static_cache_generates_the_eager_tokens():
    # HF's static cache writes K/V with cache.index_copy_(...) and ignores the result: the
    # backend's dead-code cleanup once dropped those writes (wrong tokens from the first).
    model = decoder("llama")
    nmfx.finalize(nmfx.sparsify(model))
    prompt = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
        model.forward = torch.compile(model.forward, backend="nmfx", options={"inner": "eager"})
        out = model.generate(
            prompt, max_new_tokens=6, do_sample=False, cache_implementation="static"
        )
    assert torch.equal(out, ref)
    # q/k/v and gate/up ran as one packed call each (fuse_shared_input_linears)
    reasons = {d.name: d.reason for d in nmfx.lowering_decisions(model)}
    assert (
        "fused with model.layers.0.self_attn.k_proj" in reasons["model.layers.0.self_attn.q_proj"]
    )
    assert "fused with model.layers.0.mlp.gate_proj" in reasons["model.layers.0.mlp.up_proj"]


@pytest.mark.slow
def test_torch_compile_backend_nmfx_on_finalized_llama():
    model = decoder("llama")
    nmfx.sparsify(model)
    nmfx.finalize(model)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        model.forward = torch.compile(model.forward, backend="nmfx")
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from nmfx.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_inspect_hf_config_and_save_pretrained_dir(tmp_path, capsys):
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                        architectures=["LlamaForCausalLM"])  # fmt: skip
    cfg.to_json_file(tmp_path / "config.json")
    code, out, _ = _cli(["inspect", "--hf-config", str(tmp_path / "config.json")], capsys)
    assert code == 0 and "whole model captured by torch.export" in out
    assert "model.layers.0.self_attn.k_proj" in out
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "saved")
    code, out, _ = _cli(["inspect", "--hf", str(tmp_path / "saved"), "--sparsify-output"], capsys)
    assert code == 0 and "lm_head" in out and "produces the model output" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hf", "{tmp}/missing"], "--hf {tmp}/missing: no such directory"),
        (["--hf", "{tmp}"], "--hf {tmp}: no config.json in it"),
        (["--hf-config", "{tmp}/missing.json"], "--hf-config {tmp}/missing.json: no such file"),
        (["--hf-config", "{tmp}/bad.json"], "no 'model_type' in it"),
        ([], "give one model"),
        (["mlp", "--hf", "{tmp}"], "give one model"),
    ],
    ids=["no-dir", "no-config", "no-config-file", "no-model-type", "none", "two"],
)
@pytest.mark.parametrize("command", ["inspect", "report"])
def test_cli_hf_bad_paths_are_usage_errors_naming_the_path(
    tmp_path, capsys, command, argv, message
):
    (tmp_path / "bad.json").write_text('{"hidden_size": 64}')
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = _cli([command, *argv], capsys)
    assert code == 2
    assert err.startswith("nmfx: error: ") and message.format(tmp=tmp_path) in err
