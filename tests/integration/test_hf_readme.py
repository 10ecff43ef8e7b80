"""The README's Hugging Face code runs as printed, on a tiny Llama saved to disk.

The blocks are read from README.md (the one under "## Hugging Face models" and the compiled
decoding one); only the model path is swapped for the tiny model's, so a README edit that
breaks the code breaks this test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nmfx.lowering.cpu import NMLinear

T = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install 'nmfx[hf]'"
)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(after: str, first_line: str) -> str:
    """The first ```python block after the heading ``after`` whose code starts with
    ``first_line``."""
    text = README.read_text()
    section = text[text.index(after) :]
    for code in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        if code.startswith(first_line):
            return code
    raise AssertionError(f"README has no python block starting {first_line!r} after {after!r}")


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    cfg = T.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny-llama")
    return tmp_path / "tiny-llama"


def test_readme_hf_block_runs_as_printed(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    code = readme_block("## Hugging Face models", "import torch, transformers, nmfx")
    assert code.count('"path/to/llama"') == 1
    monkeypatch.chdir(tmp_path)  # save_pretrained("llama-2of4") writes here
    monkeypatch.setenv("NMFX_CALIBRATE", "0")  # the built-in dispatch table, no timing
    ns: dict = {}
    exec(compile(code.replace("path/to/llama", str(tiny_llama_dir)), "README.md", "exec"), ns)
    fast, tokens, ids = ns["fast"], ns["tokens"], ns["ids"]
    assert sum(isinstance(m, NMLinear) for m in fast.modules()) == 14  # 7 per layer, lm_head dense
    assert tokens.shape == (1, ids.shape[1] + 32) and torch.equal(tokens[:, :32], ids)
    with torch.no_grad():  # the saved finalized model decodes to the same tokens, dense
        saved = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama-2of4")
        dense = saved.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(dense, tokens)


@pytest.mark.slow
def test_readme_compiled_decoding_block_runs_as_printed(tiny_llama_dir: Path) -> None:
    import nmfx

    code = readme_block("**Compiled decoding.**", "model = nmfx.finalize(model)")
    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    nmfx.sparsify(model)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    ns = {"torch": torch, "nmfx": nmfx, "model": model, "ids": ids}
    exec(compile(code.replace("max_new_tokens=256", "max_new_tokens=8"), "README.md", "exec"), ns)
    eager = nmfx.lower(model, "cpu")  # the compiled step gives the eager lowered model's tokens
    with torch.no_grad():
        want = eager.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ns["out"], want)


@pytest.mark.slow
def test_readme_lower_then_compile_block_runs_as_printed(tiny_llama_dir: Path) -> None:
    import nmfx
    from nmfx.lowering.cpu import NMLinear

    code = readme_block("**Memory.**", "fast = nmfx.lower(nmfx.finalize(model)")
    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    nmfx.sparsify(model)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    eager = nmfx.lower(nmfx.finalize(model), "cpu")  # a lowered copy, not compiled
    with torch.no_grad():
        want = eager.generate(ids, max_new_tokens=8, do_sample=False)
    ns = {"torch": torch, "nmfx": nmfx, "model": model, "ids": ids}
    exec(compile(code.replace("max_new_tokens=256", "max_new_tokens=8"), "README.md", "exec"), ns)
    assert ns["fast"] is model and any(isinstance(m, NMLinear) for m in model.modules())
    assert torch.equal(ns["out"], want)


@pytest.mark.slow
def test_readme_fastest_decoding_block_runs_as_printed(tiny_llama_dir: Path) -> None:
    import nmfx

    code = readme_block("**The fastest way to decode", "from nmfx.hf import fast_generate")
    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    nmfx.sparsify(model)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    eager = nmfx.lower(nmfx.finalize(model), "cpu")  # a lowered copy decoded by generate
    with torch.no_grad():
        want = eager.generate(ids, max_new_tokens=8, do_sample=False)
    ns = {"torch": torch, "nmfx": nmfx, "model": model, "ids": ids}
    exec(compile(code.replace("max_new_tokens=256", "max_new_tokens=8"), "README.md", "exec"), ns)
    assert ns["fast"] is model and any(isinstance(m, NMLinear) for m in model.modules())
    assert torch.equal(ns["out"], want)
