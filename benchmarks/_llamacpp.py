"""llama.cpp beside nmfx in ``decode.py``: the same HF model, converted by llama.cpp's own
converter, decoding the same token ids greedily with the same threads.

What a CPU user would pick instead of PyTorch is llama.cpp, so ``decode.py`` runs it as
contenders ``llama.cpp-F32``, ``-F16``, ``-BF16`` and ``-Q8_0`` where it can. Optional: it needs
``llama-cpp-python`` (``pip install -e ".[bench]"``; that builds llama.cpp from source) and a
llama.cpp source tree for ``convert_hf_to_gguf.py`` (``--llama-cpp-dir``, or ``LLAMA_CPP_DIR``;
the llama-cpp-python sdist holds one under ``vendor/llama.cpp``). The benchmark model has no
tokenizer, so the converter gets a placeholder vocabulary of ``vocab_size`` tokens (SentencePiece
style: unknown, BOS, EOS, the 256 byte tokens, then ``<tN>``); token ids are fed directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

FORMATS = ("f32", "f16", "bf16", "q8_0")
DIR_ENV = "LLAMA_CPP_DIR"

# Runs llama.cpp's converter with its SentencePiece vocabulary reader replaced by a placeholder
# one (the model directory has no tokenizer.model). argv: llama.cpp dir, converter arguments.
_CONVERT = r"""
import runpy, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "gguf-py")]
from conversion import base
T = base.SentencePieceTokenTypes

def placeholder_vocab(self):
    n = self.hparams["vocab_size"]
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    tokens += [b"<t%d>" % i for i in range(len(tokens), n)]
    types += [T.NORMAL] * (n - len(types))
    return tokens[:n], [0.0] * n, types[:n]

base.TextModel._create_vocab_sentencepiece = placeholder_vocab
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")
"""


def converter_dir(arg: str | None) -> Path | None:
    path = arg or os.environ.get(DIR_ENV)
    return Path(path) if path else None


def unavailable(llama_dir: Path | None) -> str | None:
    """Why the llama.cpp contenders cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp is not importable ({exc}); pip install -e '.[bench]' to add it"
    if llama_dir is None:
        return (
            f"no llama.cpp source tree for convert_hf_to_gguf.py: pass --llama-cpp-dir or set "
            f"{DIR_ENV} (the llama-cpp-python sdist's vendor/llama.cpp is one)"
        )
    if not (llama_dir / "convert_hf_to_gguf.py").is_file():
        return f"{llama_dir} holds no convert_hf_to_gguf.py; point --llama-cpp-dir at llama.cpp"
    return None


def convert(hf_dir: Path, llama_dir: Path, fmt: str) -> Path:
    """``hf_dir`` (a ``save_pretrained`` folder) as GGUF of ``fmt``, next to it; reused."""
    out = hf_dir.parent / f"{hf_dir.name}-{fmt}.gguf"
    if not out.is_file():
        cmd = [sys.executable, "-c", _CONVERT, str(llama_dir), str(hf_dir), "--outtype", fmt,
               "--outfile", str(out)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"convert_hf_to_gguf.py --outtype {fmt} failed:\n{tail}")
    return out


class LlamaCpp:
    """One GGUF file loaded by llama-cpp-python; greedy decoding of token ids."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=512, n_ubatch=512, logits_all=False, verbose=False,
        )  # fmt: skip
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(
            np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()
        )

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return self.last_logits()

    def generate(self, ids: list[int], new: int) -> list[int]:
        """Like HF's greedy ``generate``: the prompt's forward gives the first new token, each
        of ``new - 1`` one-token steps the next."""
        tokens = [int(self.prefill(ids).argmax())]
        for _ in range(new - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(int(self.last_logits().argmax()))
        return tokens


def contenders(
    pruned: torch.nn.Module, workdir: Path, llama_dir: Path, formats: list[str], threads: int,
    n_ctx: int,
) -> dict[str, Any]:  # fmt: skip
    """``{"llama.cpp-F32": LlamaCpp, ...}`` for the (fp32, dense-format) pruned model."""
    hf_dir = workdir / "hf"
    if not (hf_dir / "config.json").is_file():
        pruned.save_pretrained(hf_dir)
    return {
        f"llama.cpp-{fmt.upper()}": LlamaCpp(convert(hf_dir, llama_dir, fmt), threads, n_ctx)
        for fmt in formats
    }


def logits_check(model: torch.nn.Module, runner: LlamaCpp, ids: torch.Tensor) -> dict[str, Any]:
    """The prompt's last-position logits of HF ``model`` against llama.cpp's (batch row 0)."""
    with torch.no_grad():
        ref = model(ids[:1]).logits[0, -1].float()
    got = runner.prefill(ids[0].tolist())
    return {
        "max_abs_diff": round(float((got - ref).abs().max()), 6),
        "max_abs_ref": round(float(ref.abs().max()), 6),
        "same_argmax": bool(got.argmax() == ref.argmax()),
    }
