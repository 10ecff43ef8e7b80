"""How long ``nmfx.sparsify`` takes on a TinyLlama-sized Hugging Face model (22 layers).

FX cannot trace HF models as a whole, so sparsify captures them with ``torch.export``
(non-strict) for the whole-model facts; that capture is most of the time. Each run is the
first sparsify call in a fresh process (lazy imports paid), model construction not timed
(random init on ``meta`` then ``to_empty``: values do not matter here). Wall and CPU time
are both reported: on a shared machine wall time mostly measures the other jobs. Target:
< 5 s.

    PYTHONPATH=. python benchmarks/hf_sparsify_time.py [--layers 22] [--runs 3]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing

CHILD = """
import json, time, torch, transformers as tf, nmfx
from nmfx import capture
cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers={layers},
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
with torch.device("meta"):
    model = tf.LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu")
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
spent = {{}}
inner = capture.capture_whole_model
def timed(m):
    t, c = time.perf_counter(), time.process_time()
    out = inner(m)
    spent["capture_wall_s"], spent["capture_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    return out
import sys
for mod in [m for name, m in sys.modules.items() if name.startswith("nmfx")]:
    if getattr(mod, "capture_whole_model", None) is inner:  # wherever sparsify imported it
        mod.capture_whole_model = timed
t, c = time.perf_counter(), time.process_time()
nmfx.sparsify(model)
wall, cpu = time.perf_counter() - t, time.process_time() - c
plan = nmfx.summary(model).plan
print(json.dumps({{"wall_s": wall, "cpu_s": cpu, **spent, "capture": plan.capture,
                  "whole_model_captured": plan.whole_model_traced,
                  "sparse": len(plan.sparse), "candidates": len(plan.candidates)}}))
"""


def main() -> None:
    parser = _timing.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with _timing.LoadMonitor() as load:
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, "-c", CHILD.format(layers=args.layers)],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1])
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "capture_cpu_s")}
    print(f"sparsify, {args.layers}-layer TinyLlama-sized HF model, first call in a fresh process: "
          f"median wall {med['wall_s']:.2f} s, CPU {med['cpu_s']:.2f} s (capture CPU "
          f"{med['capture_cpu_s']:.2f} s) by {runs[0]['capture']}; target < 5 s")  # fmt: skip
    print(_timing.describe(_timing.machine_info(), load.result))
    payload = {"machine": _timing.machine_info(), "load": load.result, "runs": runs, "median": med}
    print(
        f"wrote {_timing.write_json('hf_sparsify_time', payload, args.out or Path('out/hf_sparsify_time.json'))}"
    )


if __name__ == "__main__":
    main()
